"""Experiment 5: Mamba (Mamba-1 and Mamba-2) vs a Transformer of equal parameter count, trained on the same
tokens, on the main job's Shakespeare corpus (three whole plays held out), validation loss curves on one plot.

The paper's language-modelling comparison (§4.2.1, Figure 4, App. E.2.1) trains Mamba and Transformer++
(rotary positions, SwiGLU, RMSNorm, no biases) at equal parameters with the same recipe and token budget on
the Pile. The CPU version: the main job's byte-level setting (configs/shakespeare.toml: seq_len 256, batch
16, AdamW β = (0.9, 0.95), weight decay 0.1, clip 1.0, warmup + cosine, bf16 autocast), the Mamba `mini`
preset (4 × 128, the main job's model), and a Transformer++ of 2 layers × 128 (a Transformer layer costs
about two Mamba blocks, paper §3.4) whose MLP width is chosen so that the two parameter counts agree to
within 1%. Both see exactly the same batches (windows drawn from (seed, step)) for the same number of steps.
Mamba-2 (the Mamba-2 paper's §9.2 comparison, issue 25): the same width and depth as the Mamba preset
(`mamba2-mini`: 4 × 128, heads of 64), with its state size N the multiple of 16 that brings its parameters
closest to Mamba's (N = 48, 64, 80 for tiny, mini, small: −1.0%, +0.7%, +0.5%; the official N = 128 would add
14% to mini), on the same batches for the same steps at the same learning rate.

    python -m experiments.language                  # Mamba and Transformer++, 2000 steps each (8.2 M tokens): ≈ 20 min
    python -m experiments.language --models mamba,mamba2,transformer   # all three (longer than 30 min at 2000 steps)
    python -m experiments.language --models mamba2 --steps 800 --merge # Mamba-2 added to the runs in results.json
    python -m experiments.language --quick          # tiny sizes, 30 steps: checks that everything runs
    python -m experiments.language --steps 3000 --lr-transformer 2e-3

Writes results.json and val_loss.png into experiments/language/ (or --out) and prints the table.

Why not `mambakit.train`? It builds a `MambaLM` itself (`build_model`), saves checkpoints with
`save_pretrained` and samples with `mambakit.generate`, all Mamba-specific. This loop reuses everything else
from it: the data (`prepare_data`: same corpus, split, byte tokenizer and token cache), the batches
(`TokenWindows.random_starts`), the schedule (`lr_at`), the weight-decay groups (`param_groups`), the loss
(`next_token_loss`) and the evaluation (`evaluate`: nats/token, nats/char, bits/char). The hook that would
remove it: a `model_factory(vocab_size) -> nn.Module` in `train()` (and checkpoints / samples skipped or
delegated when the model is not a MambaLM).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from mambakit._io import atomic_write
from mambakit.baselines.transformer import TransformerConfig, TransformerLM
from mambakit.config import MambaConfig
from mambakit.data.text import TokenWindows
from mambakit.model import MambaLM
from mambakit.train import Dist, TrainConfig, evaluate, hms, lr_at, next_token_loss, param_groups, prepare_data

from experiments._common import cli_args, closest_by_params, command_line, pyplot, save_figure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MAIN_JOB = ROOT / "configs" / "shakespeare.toml"
SIZES = {  # --size → (Mamba preset, Transformer d_model, n_layer, n_head)
    "mini": ("mini", 128, 2, 4),
    "small": ("small", 256, 4, 8),
    "tiny": ("tiny", 64, 1, 2),
}
MODELS = ("mamba", "mamba2", "transformer")
# The keys of results.json that must agree for runs to share one table (--merge): the same data and budget
SAME_RUN = ("steps", "seq_len", "batch_size", "precision", "recipe", "final_windows", "size")


# ------------------------------------------------------------------------------------------------ models
def mamba_model(size: str, vocab_size: int) -> MambaLM:
    return MambaLM(MambaConfig.from_preset(SIZES[size][0], vocab_size=vocab_size))


def transformer_config(size: str, vocab_size: int, seq_len: int, target_params: int) -> TransformerConfig:
    """Transformer++ (the paper's strong recipe) whose MLP width d_ff makes its parameter count closest to
    target_params; parameters are linear in d_ff, so two probes give the line."""
    _, d, n_layer, n_head = SIZES[size]

    def cfg(d_ff: int) -> TransformerConfig:
        return TransformerConfig(d_model=d, n_layer=n_layer, n_head=n_head, vocab_size=vocab_size,
                                 max_seq_len=seq_len, positions="rotary", mlp="swiglu", norm="rmsnorm", bias=False,
                                 d_ff=d_ff)

    def count(c):
        with torch.device("meta"):
            return TransformerLM(c).num_parameters()

    p16, p32 = count(cfg(16)), count(cfg(32))
    per_unit = (p32 - p16) / 16
    d_ff = max(8, round((16 + (target_params - p16) / per_unit) / 8) * 8)  # a multiple of 8
    return cfg(d_ff)


def mamba2_config(size: str, vocab_size: int, target_params: int) -> MambaConfig:
    """The Mamba-2 preset of the same width and depth as the Mamba one (`mamba2-<size>`), with the state size N
    (a multiple of 16, up to the official 128) whose parameter count is closest to target_params: Mamba-2's
    in_proj makes B and C (N each) for every token, so N is where its parameters differ from Mamba's."""
    preset = "mamba2-" + SIZES[size][0]
    n, _ = closest_by_params(lambda n: MambaLM(MambaConfig.from_preset(preset, vocab_size=vocab_size, d_state=n)),
                             range(16, 129, 16), target_params)
    return MambaConfig.from_preset(preset, vocab_size=vocab_size, d_state=n)


# ----------------------------------------------------------------------------------------- the loop
def train_one(name: str, model: torch.nn.Module, cfg: TrainConfig, lr: float, steps: int, data, eval_every: int,
              log_every: int = 50, final_windows: int = 0) -> dict:
    """`steps` optimizer steps on the main job's batches with the main job's recipe at peak `lr`; the
    validation loss on a fixed subset of cfg.eval_windows windows every eval_every steps, and on the whole
    held-out set at the end."""
    cfg = cfg.replace(lr=lr)
    d = Dist()
    train_w, val_w = TokenWindows(data.train.tokens, cfg.seq_len), TokenWindows(data.val.tokens, cfg.seq_len)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    curve, train_curve = [], []
    ev = evaluate(model, val_w, data.val, cfg, d, cfg.eval_windows)
    curve.append(dict(step=0, tokens=0, **ev))
    model.train()
    from tqdm import tqdm

    bar = tqdm(total=steps, desc=name, unit="step", disable=None, file=sys.stderr)  # on a terminal only
    t0, train_s, window = time.perf_counter(), 0.0, []
    for step in range(steps):
        ts = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg, steps)
        batch = train_w.batch(train_w.random_starts(cfg.seed, step, cfg.batch_size))  # (b, seq_len + 1)
        with autocast:
            loss = next_token_loss(model, batch)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"{name}: non-finite training loss at step {step + 1} (lr {lr:g}); lower the lr")
        window.append(value)
        train_s += time.perf_counter() - ts
        done = step + 1
        bar.update(1)
        if done % log_every == 0 or done == steps:
            rate = done * tokens_per_step / train_s
            elapsed = time.perf_counter() - t0
            eta = elapsed / done * (steps - done)
            train_curve.append(dict(step=done, tokens=done * tokens_per_step, loss=sum(window) / len(window)))
            bar.write(f"  {name}: step {done}/{steps} loss {train_curve[-1]['loss']:.4f} | {rate:,.0f} tok/s | "
                      f"{hms(elapsed)} elapsed, ETA {hms(eta)}", file=sys.stderr)
            window = []
        if done % eval_every == 0 and done < steps:
            ev = evaluate(model, val_w, data.val, cfg, d, cfg.eval_windows)
            curve.append(dict(step=done, tokens=done * tokens_per_step, **ev))
    bar.close()
    ev_subset = evaluate(model, val_w, data.val, cfg, d, cfg.eval_windows)
    curve.append(dict(step=steps, tokens=steps * tokens_per_step, **ev_subset))
    final = evaluate(model, val_w, data.val, cfg, d, final_windows)  # 0: the whole held-out set
    return dict(name=name, params=model.num_parameters(), lr=lr, steps=steps, tokens=steps * tokens_per_step,
                train_s=train_s, wall_s=time.perf_counter() - t0, tokens_per_s=steps * tokens_per_step / train_s,
                final=final, curve=curve, train_curve=train_curve)


# ------------------------------------------------------------------------------------------------ report
def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"mamba": ["tab:blue", "tab:cyan", "navy"], "mamba2": ["tab:green", "olive", "darkgreen"],
              "transformer": ["tab:red", "tab:orange", "darkred"]}
    for key, r in results["runs"].items():
        color = colors[r["model"]].pop(0) if colors[r["model"]] else None
        label = f"{r['label']} ({r['params'] / 1e6:.2f} M params)"
        chars = results["chars_per_token"]
        ax.plot([p["tokens"] / 1e6 for p in r["curve"]], [p["val_bpc"] for p in r["curve"]], "o-", ms=3,
                color=color, label=f"{label}: validation")
        ax.plot([p["tokens"] / 1e6 for p in r["train_curve"]], [p["loss"] / chars / math.log(2)
                                                               for p in r["train_curve"]],
                color=color, alpha=0.35, lw=1, label=f"{r['label']}: training")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("bits per character")
    ax.set_ylim(top=min(4.5, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Shakespeare (held-out plays), byte level, seq {results['seq_len']}, same batches", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def table(results: dict) -> str:
    lines = ["| run | params | lr | steps | tokens | val nats/token | val nats/char | val bits/char | tok/s | "
             "train time |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"].values():
        f = r["final"]
        lines.append(f"| {r['label']} | {r['params']:,} | {r['lr']:g} | {r['steps']} | {r['tokens'] / 1e6:.2f} M | "
                     f"{f['val_loss']:.4f} | {f['val_nats_per_char']:.4f} | {f['val_bpc']:.4f} | "
                     f"{r['tokens_per_s']:,.0f} | {hms(r['train_s'])} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main
def parse_runs(models: str, lr_mamba: str, lr_transformer: str, lr_mamba2: str | None = None
               ) -> list[tuple[str, float]]:
    """(model, peak lr) for every run: each model once per lr in its comma-separated list (Mamba-2: lr_mamba2,
    by default Mamba's)."""
    lrs = {"mamba": lr_mamba, "mamba2": lr_mamba2 or lr_mamba, "transformer": lr_transformer}
    runs = []
    for m in [m for m in models.split(",") if m]:
        if m not in MODELS:
            raise ValueError(f"--models takes mamba2, mamba and/or transformer, got {m!r}")
        for lr in lrs[m].split(","):
            try:
                value = float(lr)
            except ValueError:
                raise ValueError(f"learning rates must be numbers, got {lr!r}") from None
            if not value > 0:
                raise ValueError(f"learning rates must be > 0, got {lr!r}")
            runs.append((m, value))
    if not runs:
        raise ValueError("nothing to run: --models is empty")
    return runs


def run_key(model: str, lr: float) -> str:
    return f"{model}@{lr:g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, seq 64, 30 steps each (seconds)")
    p.add_argument("--size", choices=SIZES, default="mini", help="Mamba preset (the Transformer is matched to it)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per model (the same token budget)")
    p.add_argument("--lr-mamba", default="", help="peak lr(s) for Mamba, comma-separated (default: the recipe's)")
    p.add_argument("--lr-transformer", default="",
                   help="peak lr(s) for the Transformer, comma-separated (default: the recipe's, as in the paper, "
                        "where Transformer++ and Mamba share the improved recipe)")
    p.add_argument("--lr-mamba2", default="", help="peak lr(s) for Mamba-2 (default: Mamba's)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--final-windows", type=int, default=0, help="windows of the final evaluation (0: all)")
    p.add_argument("--models", default="mamba,transformer",
                   help="comma-separated subset of mamba, mamba2, transformer (all three at the default 2000 steps "
                        "take longer than 30 minutes: run mamba2 on its own with --merge)")
    p.add_argument("--merge", action="store_true",
                   help="keep the runs already in --out/results.json (made with the same steps, batches and recipe) "
                        "beside this command's: one table and one plot for all")
    p.add_argument("--parallel", action="store_true", help="every run in its own process, all at once")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's choice)")
    p.add_argument("--config", type=Path, default=MAIN_JOB, help="the recipe (default: the main job's)")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # model, lr, partial-results path
    args = p.parse_args(argv)
    overrides = {}
    if args.quick:
        args.size, args.steps, args.eval_every, args.final_windows = "tiny", 30, 10, 16
        overrides = dict(seq_len=64, batch_size=4, warmup_steps=5, eval_windows=4)
    if args.steps < 1 or args.eval_every < 1 or args.final_windows < 0:
        p.error("--steps and --eval-every must be >= 1, --final-windows >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig.from_file(args.config).replace(**overrides)
    try:
        runs = parse_runs(args.models, args.lr_mamba or str(cfg.lr), args.lr_transformer or str(cfg.lr),
                          args.lr_mamba2 or None)
    except ValueError as e:
        p.error(str(e))
    data = prepare_data(cfg, Dist(), args.out, None)  # byte tokenizer: nothing is written to out
    vocab = data.tokenizer.vocab_size
    mamba_params = mamba_model(args.size, vocab).num_parameters()
    tcfg = transformer_config(args.size, vocab, cfg.seq_len, mamba_params)
    m2cfg = mamba2_config(args.size, vocab, mamba_params)
    labels = {"mamba": f"Mamba {SIZES[args.size][0]}", "transformer": f"Transformer++ {tcfg.n_layer}×{tcfg.d_model}, "
              f"d_ff {tcfg.d_ff}", "mamba2": f"Mamba-2 {SIZES[args.size][0]} (N={m2cfg.d_state})"}
    builders = {"mamba": lambda: mamba_model(args.size, vocab), "mamba2": lambda: MambaLM(m2cfg),
                "transformer": lambda: TransformerLM(tcfg)}

    def one(model_name: str, lr: float) -> dict:
        torch.manual_seed(cfg.seed)
        model = builders[model_name]()
        key = run_key(model_name, lr)
        print(f"# {labels[model_name]}: {model.num_parameters():,} parameters, peak lr {lr:g}", flush=True)
        r = train_one(key, model, cfg, lr, args.steps, data, args.eval_every, final_windows=args.final_windows)
        print(f"# {key}: val {r['final']['val_loss']:.4f} nats/token, {r['final']['val_bpc']:.4f} bits/char "
              f"after {hms(r['wall_s'])}", flush=True)
        return dict(model=model_name, label=f"{labels[model_name]}, lr {lr:g}", **r)

    results = dict(steps=args.steps, seq_len=cfg.seq_len, batch_size=cfg.batch_size, precision=cfg.precision,
                   size=args.size, config=str(args.config), transformer_config=tcfg.to_dict(),
                   mamba2_config=m2cfg.to_dict(),
                   recipe={k: getattr(cfg, k) for k in ("lr", "warmup_steps", "min_lr_ratio", "weight_decay", "beta1",
                                                        "beta2", "grad_clip", "seed", "eval_windows")},
                   final_windows=args.final_windows, load_average_start=os.getloadavg()[0],
                   command=command_line("python -m experiments.language", argv),
                   runs={})
    if args.worker:
        model_name, lr, path = args.worker
        part = one(model_name, float(lr))
        atomic_write(path, json.dumps(part))
        return 0
    chars_per_token = data.val.n_chars / len(data.val)
    print(f"# Shakespeare, {data.tokenizer!r}: {len(data.train):,} train / {len(data.val):,} held-out tokens; "
          f"{args.steps} steps × {cfg.batch_size} × {cfg.seq_len} = {args.steps * cfg.batch_size * cfg.seq_len:,} "
          f"tokens per run; {cfg.precision}; {torch.get_num_threads()} threads per run; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    results["chars_per_token"] = chars_per_token
    earlier = mergeable(results, args.out / "results.json") if args.merge else {}  # checked before training
    t0 = time.perf_counter()
    if args.parallel and len(runs) > 1:
        results["runs"] = run_parallel(args, argv, runs)
    else:
        for model_name, lr in runs:
            results["runs"][run_key(model_name, lr)] = one(model_name, lr)
    results.update(wall_s=time.perf_counter() - t0, load_average_end=os.getloadavg()[0])
    for r in results["runs"].values():
        r["command"] = results["command"]
    if earlier:
        merge_runs(results, earlier)
    results["best"] = best = {}
    for key, r in results["runs"].items():  # each model at its best learning rate
        if r["model"] not in best or r["final"]["val_loss"] < results["runs"][best[r["model"]]]["final"]["val_loss"]:
            best[r["model"]] = key
    print(table(results))
    names = {"mamba": "Mamba", "mamba2": "Mamba-2", "transformer": "Transformer"}
    for a, b in (("mamba", "transformer"), ("mamba2", "mamba"), ("mamba2", "transformer")):
        if a in best and b in best:
            x, y = (results["runs"][best[k]]["final"]["val_bpc"] for k in (a, b))
            results[f"bpc_difference_{a}_minus_{b}"] = x - y
            print(f"# best {names[a]} − best {names[b]}: {x - y:+.4f} bits/char on the held-out plays")
    atomic_write(args.out / "results.json", json.dumps(results, indent=1))
    plot(results, args.out / "val_loss.png")
    print(f"# wrote {args.out / 'results.json'} and {args.out / 'val_loss.png'} ({hms(results['wall_s'])})")
    return 0


def mergeable(results: dict, path: Path) -> dict:
    """--merge: the runs of the results.json at path (each with its own command), when they were made with the
    same data, budget and recipe as this command (SAME_RUN; files written before --size was recorded were all of
    the default size); {} when there is no file. Other settings are an error, raised before any training."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    old.setdefault("size", "mini")
    differ = [k for k in SAME_RUN if old.get(k) != results.get(k)]
    if differ:
        raise SystemExit(f"--merge: {path} holds runs made with other settings ("
                         + ", ".join(f"{k}: {old.get(k)!r} there, {results.get(k)!r} now" for k in differ)
                         + "); use the same ones, another --out, or no --merge")
    return {k: {**r, "command": r.get("command", old["command"])} for k, r in old["runs"].items()}


def merge_runs(results: dict, earlier: dict) -> None:
    """The earlier runs join this command's (a run of the same model and lr is replaced by this command's)."""
    runs = dict(earlier)
    runs.update(results["runs"])
    order = {m: i for i, m in enumerate(MODELS)}  # the table's order: model, then lr
    results["runs"] = dict(sorted(runs.items(), key=lambda kv: (order[kv[1]["model"]], kv[1]["lr"])))
    results["merged_commands"] = list(dict.fromkeys(r["command"] for r in results["runs"].values()))


def run_parallel(args, argv, runs) -> dict:
    """Each run in its own process (same flags), all at once; their results are collected in order."""
    import subprocess
    import tempfile

    base = [a for a in cli_args(argv) if a != "--parallel"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for model_name, lr in runs:
            path = Path(tmp) / f"{run_key(model_name, lr)}.json"
            cmd = [sys.executable, "-m", "experiments.language", *base, "--worker", model_name, repr(lr), str(path)]
            procs.append((model_name, lr, path, subprocess.Popen(cmd, cwd=ROOT)))
        for model_name, lr, path, proc in procs:
            if proc.wait() != 0 or not path.exists():
                raise RuntimeError(f"the run {run_key(model_name, lr)} failed (exit code {proc.returncode})")
            out[run_key(model_name, lr)] = json.loads(path.read_text())
    return out


if __name__ == "__main__":
    sys.exit(main())
