"""Autoregressive waveform modelling (paper §4.4.1, Figure 7 pattern): bits per sample on held-out audio vs
training context, Mamba vs the S4D baseline (the Mamba block with its selective SSM replaced by the LTI
S4D-Lin SSM: `MambaLM(config, mixer_cls=MambaS4D)`, the complex "S4" the paper's audio models use) at
(nearly) equal parameter count.

Data: 8-bit μ-law (256 tokens) of real 8 kHz recordings — by default the asterisk music-on-hold tracks
(18 min of music, the stand-in for YouTubeMix), one whole track held out for evaluation.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

from mambakit.baselines.s4d import MambaS4D
from mambakit.config import MambaConfig
from mambakit.data.audio import AudioWindows, mu_law_encode, read_audio, resample
from mambakit.model import MambaLM

from experiments._common import (eval_at_context, log2_axes, merge_tail, plan_text, plot_loss_by_position, pyplot,
                                 save_figure, seq_len_warmup, train_stages)

MOH = Path("/usr/share/asterisk/moh")
HELD_OUT_TRACK = "manolo_camp-morning_coffee"
VOCAB = 256  # 8-bit μ-law


def load_tracks(directory: Path, rate: int) -> dict[str, np.ndarray]:
    """Every audio file (*.wav, *.flac, *.ogg) under directory, mono, at `rate` (resampled when needed), float32."""
    files = sorted(f for ext in ("wav", "flac", "ogg") for f in directory.glob(f"*.{ext}"))
    if not files:
        raise FileNotFoundError(f"no .wav, .flac or .ogg files in {directory} (run experiments/audio/setup.sh)")
    out = {}
    for f in files:
        x, r = read_audio(f)
        out[f.stem] = resample(x, r, rate) if r != rate else x
    return out


def build(kind: str, d_model: int, n_layer: int) -> MambaLM:
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB)
    return MambaLM(cfg) if kind == "mamba" else MambaLM(cfg, mixer_cls=MambaS4D)


def matched_width(d_model: int, n_layer: int) -> int:
    """The S4D model's d_model whose parameter count is closest to the Mamba model's (equal size)."""
    target = build("mamba", d_model, n_layer).num_parameters()
    return min(range(max(8, d_model - 16), d_model + 33),
               key=lambda d: abs(build("s4d", d, n_layer).num_parameters() - target))


def run(args) -> dict:
    tracks = load_tracks(args.moh_dir, args.rate)
    held = args.held_out if args.held_out in tracks else sorted(tracks)[-1]
    train = [mu_law_encode(x).astype(np.uint8) for k, x in tracks.items() if k != held]
    val = mu_law_encode(tracks[held]).astype(np.int64)
    print(f"[waveform] {len(train)} training tracks ({sum(len(t) for t in train) / args.rate / 60:.1f} min), "
          f"held out {held!r} ({len(val) / args.rate:.0f} s) at {args.rate} Hz", file=sys.stderr, flush=True)
    # the same held-out segments for every context: each cut into L-long windows (+ 1 target)
    seg = max(args.contexts) + 1
    starts = np.linspace(0, len(val) - seg, args.eval_segments).astype(int)
    segs = [val[s:s + seg] for s in starts]
    widths = {"mamba": args.d_model, "s4d": matched_width(args.d_model, args.n_layer)}
    # every (model, context) runs the same steps of the same samples per step (a multiple of the longest context)
    total_steps = max(1, args.waveform_tokens // args.tokens_per_step)
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    results = {}
    for kind in args.models:
        for L in args.contexts:
            torch.manual_seed(args.seed)
            model = build(kind, widths[kind], args.n_layer)
            stages = seq_len_warmup(L, args.tokens_per_step, total_steps, args.warmup_start, args.warmup_stage_frac)
            windows = {st.length: AudioWindows(train, st.length) for st in stages}
            rng = np.random.default_rng(args.seed)
            print(f"[waveform] {kind} (d_model {widths[kind]}, {model.num_parameters():,} params), context {L}: "
                  f"{total_steps} steps; length × batch: {plan_text(stages)}", file=sys.stderr, flush=True)
            r = train_stages(model, stages, lambda st: windows[st.length].sample(st.batch, rng), args.waveform_s,
                             args.lr, label=f"{kind} L={L}")
            nll, buckets, n_tokens = eval_at_context(model, segs, L, args.eval_batch_tokens)
            results[f"{kind}/{L}"] = {"model": kind, "context": L, "d_model": widths[kind],
                                      "params": model.num_parameters(), "batch": stages[-1].batch,
                                      "stages": [vars(st) for st in stages],
                                      "val_bits_per_sample": nll / math.log(2), "val_nats": nll,
                                      "val_tokens": n_tokens, "position_buckets": buckets,
                                      **{k: v for k, v in r.items() if k != "loss_curve"}}
            print(f"[waveform] {kind} L={L}: {r['steps']} steps, held-out {nll / math.log(2):.4f} bits/sample; by "
                  "position: " + ", ".join(f"{b['lo']}: {b['bits']:.3f}" for b in buckets), file=sys.stderr, flush=True)
    return {"held_out": held, "rate": args.rate, "results": results}


def plot(res: dict, png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind, style in (("mamba", "o-"), ("s4d", "s--")):
        pts = sorted((v["context"], v["val_bits_per_sample"], v["params"]) for v in res["results"].values()
                     if v["model"] == kind)
        if pts:
            label = {"mamba": "Mamba (S6)", "s4d": "Mamba block with S4D-Lin"}[kind]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{label}, {pts[0][2] / 1e3:.0f}K")
    log2_axes(ax, "training context (samples)", "bits per sample, held-out track",
              f"μ-law waveform modelling at {res['rate']} Hz (cf. paper Fig. 7)")
    fig.tight_layout()
    save_figure(fig, png)


def plot_positions(res: dict, png: Path) -> None:
    """Held-out loss by position in the window, every (model, context)."""
    name = {"mamba": "Mamba", "s4d": "S4D-Lin"}
    rows = sorted(res["results"].values(), key=lambda v: (v["model"], v["context"]))
    series = {f"{name[v['model']]}, context {v['context']}": merge_tail(v["position_buckets"])
              for v in rows if "position_buckets" in v}
    if not series:
        return
    plot_loss_by_position(series, "bits/sample", min(64, min(v["context"] for v in rows)),
                          f"Held-out track: loss by position in the window ({res['rate']} Hz μ-law)", png)
