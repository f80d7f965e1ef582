"""Multi-query associative recall (MQAR) with Mamba-1, Mamba-2 and attention at equal width and budget — the
Mamba-2 paper's synthetic result (§9.1, Figure 8), scaled to a CPU.

    python -m experiments.mqar                      # the default run: 4 models in 2 processes (≈ 28 min)
    python -m experiments.mqar --quick              # tiny sizes, a few steps (the test suite's run, seconds)
    python -m experiments.mqar --models mamba,mamba_n64 --jobs 1
    python -m experiments.mqar --report-only        # table, plot and README again from results.json
    python -m experiments.mqar --time-steps 5       # no run: each model's training steps per second here

Models (--n-layer layers of width --d-model each, the same for all):
    mamba        Mamba-1, N = 16 (its default state size)
    mamba_n64    Mamba-1, N = 64 (not in the default run: separates "more state" from "the Mamba-2 layer")
    mamba2_n64   Mamba-2, N = 64, heads of --headdim channels
    mamba2_n128  Mamba-2, N = 128 (its default state size)
    attention    Transformer++ (rotary, SwiGLU, RMSNorm, no biases), 4 heads, MLP width chosen so that its
                 parameters match Mamba-1's (N = 16)
Every model sees the same batches (fresh sequences each step, seeded by the step) for the same number of steps:
equal budget. Each batch mixes the --train-pairs pair counts (equal shares), so that the easy counts teach the
lookup that the hard ones need. The test: fixed held-out sets of --test-size sequences per pair count in
--test-pairs, accuracy over every query. Writes results.json, accuracy.png and README.md into --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from mambakit import MambaConfig, MambaLM
from mambakit.baselines.transformer import TransformerConfig, TransformerLM

from experiments._common import (Report, budget_seconds, choices, closest_by_params, command_line, evaluate,
                                 fresh_models, machine_conditions, new_results, pyplot, report_throughput,
                                 require_positive, run_experiment, save_figure, save_results, train,
                                 write_readme_keeping_notes)
from experiments.mqar.task import mqar

HERE = Path(__file__).resolve().parent
MODELS = {  # name → (label, mixer, d_state); attention: (label, None, None)
    "mamba": ("Mamba-1 (N=16)", "Mamba", 16),
    "mamba_n64": ("Mamba-1 (N=64)", "Mamba", 64),
    "mamba2_n64": ("Mamba-2 (N=64)", "Mamba2", 64),
    "mamba2_n128": ("Mamba-2 (N=128)", "Mamba2", 128),
    "attention": ("Attention (Transformer++)", None, None),
}
DEFAULT_MODELS = "mamba,mamba2_n64,mamba2_n128,attention"
# Relative cost of a training step: steps/s at the defaults (`--time-steps 100`, 1 thread, 2026-12-07 22:58 UTC,
# load average 0.9 rising to 4.0 during the timing): Mamba-1 8.79, Mamba-1 N=64 5.83, Mamba-2 N=64 7.02, N=128 5.42,
# attention 11.11. --jobs balances its processes by these.
COST = {"mamba": 1 / 8.79, "mamba_n64": 1 / 5.83, "mamba2_n64": 1 / 7.02, "mamba2_n128": 1 / 5.42,
        "attention": 1 / 11.11}
# The paper's setting (Mamba-2 §9.1 / Figure 8, after Zoology), for the README's comparison. From secondary
# summaries (the PDF was not reachable here): lengths, widths, the state sizes and the claim; Zoology's vocabulary.
PAPER = {"seq_len": "256, 512, 1024", "n_pairs": "16 … 256", "vocab": "8192 (Zoology's)",
         "d_model": "32 … 256", "layers": "2",
         "models": "Attention, Mamba-1 (N=16), Mamba-2 (N=16, 64, 256)",
         "claim": "Mamba-2 solves MQAR across the tested settings, clearly beating Mamba-1 (N=16), and its accuracy "
                  "rises with N = 16 → 64 → 256"}
QUICK = dict(seq_len=32, vocab=32, d_model=16, headdim=8, train_pairs="2,4", test_pairs="2,4,8", batch_size=8,
             steps=4, warmup=2, eval_every=2, val_size=16, test_size=16, jobs=1, progress=False)


# ------------------------------------------------------------------------------------------------ models
def mamba_config(name: str, args) -> MambaConfig:
    _, mixer, n = MODELS[name]
    extra = dict(headdim=args.headdim, chunk_size=64) if mixer == "Mamba2" else {}  # chunk_size: speed only
    return MambaConfig(layer=mixer, d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab, d_state=n,
                       **extra)


def attention_config(args) -> TransformerConfig:
    """Transformer++ of the same width and depth whose SwiGLU width makes its parameters closest to Mamba-1's."""
    def cfg(d_ff: int) -> TransformerConfig:
        return TransformerConfig(d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                                 vocab_size=args.vocab, max_seq_len=args.seq_len, positions="rotary", mlp="swiglu",
                                 norm="rmsnorm", bias=False, d_ff=d_ff)

    def build(d_ff: int) -> TransformerLM:
        return TransformerLM(cfg(d_ff))

    target = sum(p.numel() for p in MambaLM(mamba_config("mamba", args)).parameters())
    # parameters are linear in d_ff: two probes give the line, then the multiples of 8 around its solution
    (_, p8), (_, p16) = closest_by_params(build, [8], 0), closest_by_params(build, [16], 0)
    guess = 8 + (target - p8) * 8 / (p16 - p8)
    d_ff, _ = closest_by_params(build, [m for m in range(int(guess) // 8 * 8 - 16, int(guess) + 24, 8) if m >= 8],
                                target)
    return cfg(d_ff)


def build_model(name: str, args) -> torch.nn.Module:
    if name == "attention":
        return TransformerLM(attention_config(args))
    return MambaLM(mamba_config(name, args))


def state_size(name: str, args) -> int | None:
    """Recurrent state per layer (numbers carried from token to token): E·D·N for Mamba-1, S·N for Mamba-2 (all
    its heads' (p, N) states); None for attention, whose KV cache grows with the sequence (2·D per token)."""
    if name == "attention":
        return None
    c = mamba_config(name, args)
    return (c.d_ssm if c.layer == "Mamba2" else c.d_inner) * c.d_state


# ------------------------------------------------------------------------------------------------- data
def mixed_batch(args, pairs: list[int], batch: int, generator: torch.Generator):
    """One batch of `batch` sequences of length --seq-len, split in equal shares among the pair counts."""
    share = -(-batch // len(pairs))
    parts = [mqar(min(share, batch - i * share), args.seq_len, n, args.vocab, args.power_a, generator)
             for i, n in enumerate(pairs) if batch - i * share > 0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_set(args, n_pairs: int) -> list:
    """The fixed held-out sequences of one pair count (seeded by it, never a training seed), in batches."""
    g = torch.Generator().manual_seed(1_000_000 + 1000 * args.seed + n_pairs)
    out, left = [], args.test_size
    while left > 0:
        out.append(mqar(min(args.batch_size, left), args.seq_len, n_pairs, args.vocab, args.power_a, g))
        left -= args.batch_size
    return out


# -------------------------------------------------------------------------------------------------- args
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.mqar", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (seconds; the test suite's run)")
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--seq-len", type=int, default=128, help="paper: 256, 512, 1024")
    p.add_argument("--vocab", type=int, default=128, help="paper (Zoology): 8192; keys are the lower half")
    p.add_argument("--train-pairs", default="4,8,16,32", help="pair counts mixed in every training batch")
    p.add_argument("--test-pairs", default="4,8,16,24,32", help="pair counts of the held-out test sets")
    p.add_argument("--power-a", type=float, default=0.01, help="query gaps ∝ g^(a − 1) (Zoology's 0.01)")
    p.add_argument("--d-model", type=int, default=64, help="width of every model (paper: 32 … 256)")
    p.add_argument("--n-layer", type=int, default=2, help="paper: 2")
    p.add_argument("--headdim", type=int, default=32, help="Mamba-2 head size P (must divide 2·d_model)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per step. Why 16: on this CPU a step of 16 costs far less than a quarter of a "
                        "step of 64 (Mamba-2 N=64 at length 128, in probes beside other jobs: 13.5 steps/s at 16, "
                        "1.8 at 64), and the task is learned by many updates: probes at 600 steps × 64 stayed "
                        "within 3× chance")
    p.add_argument("--steps", type=int, default=6000,
                   help="optimizer steps, the same for every model (6000: ≈ 28 min in 2 processes at the rates in "
                        "COST; more steps learn more, see the README's notes)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak lr (Adam, no weight decay), every model")
    p.add_argument("--lr-min", type=float, default=0.1, help="cosine decay to this fraction of the lr at the end")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--val-size", type=int, default=256, help="validation sequences (the training mix)")
    p.add_argument("--test-size", type=int, default=256, help="held-out sequences per tested pair count")
    p.add_argument("--time-budget-min", type=float, default=0.0, help="per-model training limit (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=2, help="train the models in this many processes side by side")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--report-only", action="store_true", help="no training: the report again from results.json")
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar with the ETA")
    p.add_argument("--time-steps", type=int, default=0, help="no run: time this many training steps per model")
    pre, _ = p.parse_known_args(argv)
    if pre.quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    args.command = command_line("python -m experiments.mqar", argv)
    args.models = choices(p, args.models, MODELS, "model")
    try:
        args.train_pairs = sorted({int(x) for x in args.train_pairs.split(",") if x.strip()})
        args.test_pairs = sorted({int(x) for x in args.test_pairs.split(",") if x.strip()})
    except ValueError:
        p.error("--train-pairs and --test-pairs are comma-separated integers")
    require_positive(p, args, ("seq_len", "vocab", "d_model", "n_layer", "headdim", "n_head", "batch_size", "steps",
                               "eval_every", "val_size", "test_size", "jobs", "threads"))
    if not args.train_pairs or not args.test_pairs:
        p.error("--train-pairs and --test-pairs need at least one pair count")
    for n in args.train_pairs + args.test_pairs:
        if not 1 <= n <= min(args.seq_len // 4, args.vocab // 2 - 1):
            p.error(f"pair count {n}: must be in 1 … min(seq_len / 4, vocab / 2 − 1) = "
                    f"{min(args.seq_len // 4, args.vocab // 2 - 1)} (room for the queries, distinct keys)")
    if (2 * args.d_model) % args.headdim:
        p.error(f"--headdim ({args.headdim}) must divide 2·d_model = {2 * args.d_model} (Mamba-2's heads)")
    if args.d_model % args.n_head or (args.d_model // args.n_head) % 2:
        p.error(f"--n-head ({args.n_head}) must divide d_model into even head sizes (rotary positions)")
    if not 0 < args.lr_min <= 1:
        p.error("--lr-min must be in (0, 1]")
    return args


# --------------------------------------------------------------------------------------------------- run
def run(args, log=print) -> dict:
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(500_000 + args.seed)  # validation: the training mix, held out
    val = [mixed_batch(args, args.train_pairs, min(args.batch_size, args.val_size - i), g)
           for i in range(0, args.val_size, args.batch_size)]
    tests = {n: test_set(args, n) for n in args.test_pairs}

    def batch_fn(step: int):  # the same batches for every model: seeded by the step
        return mixed_batch(args, args.train_pairs, args.batch_size,
                           torch.Generator().manual_seed(args.seed * 1_000_003 + step))

    log(f"MQAR: length {args.seq_len}, vocab {args.vocab}, train pairs {args.train_pairs}, test pairs "
        f"{args.test_pairs}, width {args.d_model} × {args.n_layer} layers, {args.steps} steps × batch "
        f"{args.batch_size}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    results = new_results("mqar", args)
    merged = results
    for name, model, n_params in fresh_models(args, lambda m: build_model(m, args)):
        conditions = machine_conditions()
        log(f"{MODELS[name][0]} ({name}): {n_params:,} parameters")
        res = train(model, batch_fn, val, args.vocab, steps=args.steps, lr=args.lr, warmup=args.warmup,
                    eval_every=args.eval_every, time_budget_s=budget_seconds(args.time_budget_min), name=name,
                    stop_file=args.out / f"STOP_{name}", lr_min_frac=args.lr_min, log=log, progress=args.progress)
        t0 = time.perf_counter()
        accuracy = {str(n): round(evaluate(model, tests[n], args.vocab), 4) for n in args.test_pairs}
        eval_s = time.perf_counter() - t0
        log(f"  {name}: test accuracy " + ", ".join(f"{n} pairs {100 * a:.1f}%" for n, a in accuracy.items()))
        conditions.update(end=machine_conditions()["start"], load_end=round(os.getloadavg()[0], 2))
        results["models"][name] = {"label": MODELS[name][0], "params": n_params, "d_state": MODELS[name][2],
                                   "state_per_layer": state_size(name, args), "lr": args.lr, "steps": res.steps,
                                   "stopped": res.stopped, "train_seconds": round(res.seconds, 1),
                                   "eval_seconds": round(eval_s, 1), "accuracy": accuracy,
                                   "test_queries": {str(n): n * args.test_size for n in args.test_pairs},
                                   "curve": res.curve, "conditions": conditions}
        if name == "attention":
            results["models"][name]["d_ff"] = model.config.d_ff
        merged = save_results(args.out / "results.json", results, list(MODELS), log)
    return REPORT.write(args, merged, log)


# ------------------------------------------------------------------------------------------------ report
def table_rows(results: dict) -> list[str]:
    pairs = sorted({int(n) for r in results["models"].values() for n in r["accuracy"]})
    rows = ["| model | params | state per layer | " + " | ".join(f"{n} pairs" for n in pairs) + " |",
            "|---|---:|---:|" + "---:|" * len(pairs)]
    for r in results["models"].values():
        state = f"{r['state_per_layer']:,}" if r["state_per_layer"] else "KV cache, 2·D per token"
        rows.append(f"| {r['label']} | {r['params']:,} | {state} | "
                    + " | ".join(f"{100 * r['accuracy'][str(n)]:.1f}" if str(n) in r["accuracy"] else ""
                                 for n in pairs) + " |")
    return rows


def log_table(results: dict) -> list[str]:
    return ["test accuracy (%) over every query, by number of key-value pairs", *table_rows(results)]


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    style = {"mamba": "o-", "mamba_n64": "o--", "mamba2_n64": "s-", "mamba2_n128": "D-", "attention": "^:"}
    for name, r in results["models"].items():
        pts = sorted((int(n), a) for n, a in r["accuracy"].items())
        ax.plot([n for n, _ in pts], [100 * a for _, a in pts], style.get(name, "o-"), ms=4,
                label=f"{r['label']}, {r['params'] / 1e3:.0f}K")
    s = results["settings"]
    ax.set_xscale("log", base=2)
    ax.set(xlabel="key-value pairs", ylabel="test accuracy (%)", ylim=(0, 102),
           title=f"MQAR, length {s['seq_len']}, vocab {s['vocab']}, width {s['d_model']}, {s['steps']} steps × "
                 f"{s['batch_size']}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def verdict(results: dict) -> str:
    """The paper's claim checked on this run: at the largest tested pair count, the best Mamba-2 against
    Mamba-1 (N=16); and whether Mamba-2's accuracy rises with its state size."""
    m = results["models"]
    if "mamba" not in m or not any(k.startswith("mamba2") for k in m):
        return "The claim needs Mamba-1 (N=16) and a Mamba-2 model in the same run."
    top = str(max(int(n) for n in m["mamba"]["accuracy"]))
    m2 = {k: r for k, r in m.items() if k.startswith("mamba2")}
    best = max(m2, key=lambda k: m2[k]["accuracy"][top])
    a1, a2 = m["mamba"]["accuracy"][top], m2[best]["accuracy"][top]
    text = (f"At {top} pairs, {m2[best]['label']} reaches {100 * a2:.1f}% against Mamba-1 (N=16)'s {100 * a1:.1f}%: "
            f"Mamba-2 {'wins' if a2 > a1 else 'does not win'} here ({100 * (a2 - a1):+.1f} points).")
    chance = 1 / (results["settings"]["vocab"] - results["settings"]["vocab"] // 2)
    if max(a1, a2) < 5 * chance:
        text += " Both are within 5× chance: at this budget neither has learned the recall at that count."
    if {"mamba2_n64", "mamba2_n128"} <= set(m2):
        d = m2["mamba2_n128"]["accuracy"][top] - m2["mamba2_n64"]["accuracy"][top]
        text += f" Mamba-2 N=128 − N=64 at {top} pairs: {100 * d:+.1f} points."
    if "mamba_n64" in m:
        text += (f" Mamba-1 with N=64 (the same state per layer as Mamba-2 N=64): "
                 f"{100 * m['mamba_n64']['accuracy'][top]:.1f}%.")
    return text


STOPPED = {"steps": "all of them", "time": "stopped by the time budget", "stop file": "stopped by hand"}


def conditions_text(results: dict) -> str:
    conds = [r["conditions"] for r in results["models"].values() if r.get("conditions")]
    if not conds:
        return ""
    loads = [x for c in conds for x in (c.get("load_start"), c.get("load_end")) if x is not None]
    first, last = min(c["start"] for c in conds), max(c.get("end", c["start"]) for c in conds)
    return (f"Models trained from {first} to {last} on a machine with {conds[0]['cpus']} CPUs "
            f"(1-minute load average {min(loads):.1f}–{max(loads):.1f} at the models' starts and ends; nice "
            f"{conds[0]['nice']}); {results['settings']['jobs']} process(es) side by side, one thread each. "
            f"Per model:")


def write_readme(results: dict, path: Path) -> None:
    s = results["settings"]
    m = results["models"]
    per_model = "\n".join(
        f"- {r['label']}: {r['params']:,} parameters, {r['steps']} steps ({STOPPED.get(r['stopped'], r['stopped'])}) in "
        f"{r['train_seconds'] / 60:.1f} min, test {r['eval_seconds']:.0f} s" + (f"; SwiGLU width {r['d_ff']}"
                                                                             if "d_ff" in r else "") + "."
        for r in m.values())
    cmds = "\n    ".join(dict.fromkeys(r.get("command", results["command"]) for r in m.values()))
    text = f"""# MQAR: Mamba-1 vs Mamba-2 vs attention (Mamba-2 paper §9.1, Figure 8)

Multi-query associative recall (Zoology, Arora et al. 2023): {s['train_pairs'][-1]} or fewer key-value pairs open a
sequence, then every key comes back once as a query among filler tokens and the model must answer its value.
Generator: `experiments/mqar/task.py` (its docstring gives the layout and the one change from Zoology's).
Generated from `results.json` by the run:

    {cmds}

## Setting: the paper's and this run's

| | paper (Mamba-2 §9.1, Fig. 8) | this run | why |
|---|---|---|---|
| sequence length | {PAPER['seq_len']} | {s['seq_len']} | CPU budget: the cost of a step grows with it |
| key-value pairs | {PAPER['n_pairs']} | train on {', '.join(map(str, s['train_pairs']))} (mixed in every batch), test on {', '.join(map(str, s['test_pairs']))} | at most length / 4 (room for the queries) |
| vocabulary | {PAPER['vocab']} | {s['vocab']} | learning speed: at 512 no model left chance within a CPU budget (probes: the notes below); fillers never repeat a key (task.py) |
| width, layers | {PAPER['d_model']}; {PAPER['layers']} | {s['d_model']}; {s['n_layer']} | one width: each model is one run |
| models | {PAPER['models']} | {', '.join(r['label'] for r in m.values())} | Mamba-2 at N = 16 left out for time; `--models mamba_n64` runs Mamba-1 at N = 64 |
| budget | a learning-rate sweep per model, long training | {s['steps']} steps × {s['batch_size']} sequences, the same batches for every model; Adam, lr {s['lr']:g}, {s['warmup']} warm-up steps, cosine to {s['lr_min']:g}×; gradient norm clipped at 1 | one lr for all (no sweep: 30 minutes) |

"Equal size" is the paper's: the same width and depth. The parameter counts differ because the state does:
Mamba-2's in_proj makes B and C of size N for every token, so N = 128 costs more parameters than N = 64; the
attention model's MLP width is chosen to match Mamba-1 (N=16) in parameters.

## Results: test accuracy (%) over every query ({s['test_size']} held-out sequences per pair count)

{chr(10).join(table_rows(results))}

{verdict(results)} Chance: 1/{s['vocab'] - s['vocab'] // 2} ({100 / (s['vocab'] - s['vocab'] // 2):.1f}%), a
guess among the values.

{conditions_text(results)}

{per_model}

![accuracy vs pairs](accuracy.png)

The paper's claim: {PAPER['claim']}. Its setting and claim above come from secondary summaries of the paper (its
exact accuracies are in its Figure 8 only, not checked here).
Raw numbers, training curves (validation accuracy on the training mix) and machine conditions: `results.json`.
"""
    write_readme_keeping_notes(path, text)


REPORT = Report(log_table, plot, write_readme)


def time_models(args) -> int:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    report_throughput(fresh_models(args, lambda m: build_model(m, args)),
                      lambda step: mixed_batch(args, args.train_pairs, args.batch_size, g), args.vocab,
                      args.time_steps, lambda name: args.steps)
    return 0


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    args = parse_args(argv)
    if args.time_steps:
        return time_models(args)
    return run_experiment(args, argv, "experiments.mqar", COST, run, REPORT)


if __name__ == "__main__":
    raise SystemExit(main())
