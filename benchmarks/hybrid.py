"""A hybrid (Mamba-2 layers with attention layers and MLPs, the official MixerModel's options) against a pure
Mamba-2 of the same d_model and depth: the decoding state per sequence as the context grows, and decode speed.

Models (random weights; the mamba2-130m shape: d_model 768, 24 layers, d_state 128, headdim 64, vocab 50280):
    hybrid   attention at layers 8 and 16 (12 heads of 64, rotary on 32 dims, conv of width 4, no biases: the
             mamba2attn-2.7b attention settings scaled down), Mamba-2 elsewhere; no MLPs (d_intermediate 0), as in
             mamba2attn-2.7b
    mamba2   every layer Mamba-2

Table 1, state per sequence: after a prefill of L tokens (one sequence, float32), the bytes of the state tensors
the decoder holds: the Mamba layers' conv + SSM states, and the hybrid's KV caches (`state.attn.nbytes()`: the
allocated capacity, which is the prompt length after a prefill and grows by doubling while decoding) — counted
from the tensors themselves, plus `kv_bytes_per_token` (the growth per token).

Table 2, decode: prompt 128, then 128 greedy steps, batch 1 and 8, float32; decode tok/s = batch / median step
time. Rows: the hybrid through MambaLM.step (the fused CPU steps do not cover hybrids), the pure Mamba-2 through
MambaLM.step (the same reference path) and through the engine's fused Mamba-2 step (what generate uses for it).
The three are timed step for step in turn (step k of each before step k + 1 of any), in two runs a batch size;
the table gives the median over both runs' steps. Run it with the machine otherwise quiet:

    python benchmarks/hybrid.py                          # both tables, 2 threads
    python benchmarks/hybrid.py --quick                  # tiny sizes: checks that it runs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mambakit import MambaConfig, MambaLM
from mambakit.attention import kv_bytes_per_token
from mambakit.engine import step_function
from mambakit.generate import prefill

ATTN = dict(num_heads=12, head_dim=64, causal=True, d_conv=4, rotary_emb_dim=32, qkv_proj_bias=False,
            out_proj_bias=False)


def build(kind: str, quick: bool) -> MambaLM:
    sizes = dict(d_model=64, n_layer=4, vocab_size=256, headdim=16, d_state=16) if quick else dict(
        d_model=768, n_layer=24, vocab_size=50280, pad_vocab_size_multiple=16)
    extra = {}
    if kind == "hybrid":
        at = [1, 2] if quick else [8, 16]
        extra = dict(attn_layer_idx=at, attn_cfg=dict(ATTN, num_heads=4, head_dim=16, rotary_emb_dim=8) if quick
                     else ATTN)
    torch.manual_seed(0)
    return MambaLM(MambaConfig(layer="Mamba2", **sizes, **extra)).eval()


def state_bytes(state) -> tuple[int, int]:
    """(Mamba layers' conv + SSM bytes, KV cache bytes) of a MambaState."""
    fixed = state.conv.numel() * state.conv.element_size() + state.ssm.numel() * state.ssm.element_size()
    return fixed, 0 if state.attn is None else state.attn.nbytes()


def memory_table(models: dict[str, MambaLM], lengths: list[int]) -> None:
    print("\n| context L | hybrid: Mamba state MiB | hybrid: KV cache MiB | hybrid total MiB | Mamba-2 total MiB |")
    print("|---:|---:|---:|---:|---:|")
    for L in lengths:
        ids = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(L)).tolist()
        row = []
        for name in ("hybrid", "mamba2"):
            with torch.inference_mode():
                state, _ = prefill(models[name], ids)
            row.append(state_bytes(state))
        (hf, hk), (mf, mk) = row
        mib = 2 ** 20
        print(f"| {L} | {hf / mib:.2f} | {hk / mib:.2f} | {(hf + hk) / mib:.2f} | {(mf + mk) / mib:.2f} |")
    per = kv_bytes_per_token(models["hybrid"].config)
    print(f"\nKV cache growth of the hybrid: {per} bytes ({per / 1024:.1f} KiB) per token and sequence (float32)")


def time_decode(runs: list[tuple[MambaLM, bool | None]], batch: int, prompt: int, new: int) -> list[list[float]]:
    """Prefills each (model, fused) run with the same prompts, then times their greedy steps in turn, step k of
    every run before step k + 1 of any (so a change in the machine's load hits them alike): the step times of each."""
    ids = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(batch)).tolist()
    live = []
    with torch.inference_mode():
        for model, fused in runs:
            state, logits = prefill(model, ids)
            live.append((step_function(model, fused), state, logits.argmax(-1), []))
        for _ in range(new):
            for i, (step, state, tok, times) in enumerate(live):
                t0 = time.perf_counter()
                logits = step(tok, state)
                times.append(time.perf_counter() - t0)
                live[i] = (step, state, logits.argmax(-1), times)
    return [times for *_, times in live]


def decode_table(models: dict[str, MambaLM], batches: list[int], prompt: int, new: int) -> None:
    rows = [("hybrid, MambaLM.step", "hybrid", False), ("Mamba-2, MambaLM.step", "mamba2", False),
            ("Mamba-2, fused step", "mamba2", None)]
    runs = [(models[name], fused) for _, name, fused in rows]
    time_decode(runs, 1, 8, 4)  # warm-up: compiles, packs weights
    results = {(label, b): [] for label, _, _ in rows for b in batches}
    for _ in range(2):  # two runs
        for b in batches:
            for (label, _, _), times in zip(rows, time_decode(runs, b, prompt, new)):
                results[label, b] += times
    print("\n| model, decode path | batch | ms/step (median) | decode tok/s |")
    print("|---|---:|---:|---:|")
    for b in batches:
        for label, _, _ in rows:
            ms = statistics.median(results[label, b]) * 1e3
            print(f"| {label} | {b} | {ms:.1f} | {b / ms * 1e3:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (a smoke run)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", default="256,1024,4096")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    lengths = [32, 64] if a.quick else [int(x) for x in a.lengths.split(",")]
    batches = [1, 2] if a.quick else [int(x) for x in a.batches.split(",")]
    prompt, new = (8, 8) if a.quick else (a.prompt, a.new)
    models = {k: build(k, a.quick) for k in ("hybrid", "mamba2")}
    for k, m in models.items():
        print(f"{k}: {m.num_parameters():,} parameters")
    print(f"threads {a.threads}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    memory_table(models, lengths)
    decode_table(models, batches, prompt, new)


if __name__ == "__main__":
    main()
