"""The code the experiments share: command lines and results files, plots, and their two training loops.

- Every experiment: its command line and settings (`command_line`, `settings`, `choices`), plots (`pyplot`,
  `log2_axes`, `save_figure`); results files go through `mambakit._io.atomic_write`, so an interrupted run
  never leaves half a file.
- Language-model pretraining on per-step batches (dna, audio): `run_budgeted` (AdamW, a budget of tokens,
  seconds or steps), a sweep over context lengths with the sequence-length warm-up (`check_contexts`,
  `seq_len_warmup`, `train_stages`), and the held-out loss by position in the window (`eval_at_context`,
  `position_buckets`, `plot_loss_by_position`, `position_table`).
- The synthetic tasks (selective_copying, induction_heads): `train` (Adam, scored positions only, evaluation
  and early stopping), `train_curriculum` (lengths in stages), `Checkpoint` (one model's state every few
  minutes; `--resume` continues bitwise), `steps_per_second` / `report_throughput` (`--time-steps`), their models
  trained in several processes that merge into one results.json (`fresh_models`, `save_results`,
  `run_experiment`), and their report (`Report`, `write_readme_keeping_notes`).

Why not `mambakit.train`? The trainer reads text documents through a text tokenizer and draws its own windows;
these experiments need per-step batches from their own samplers (genome windows with reverse-complement
augmentation, μ-law audio windows, synthetic tasks) and other losses (classification, scored positions). The
hook that would remove both loops: a `batch_fn(step)` and a `loss_fn` accepted by `mambakit.train.train`.
Both loops take their learning rate from `mambakit.train.warmup_cosine`.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit._io import atomic_write
from mambakit.data.synthetic import IGNORE_INDEX, scored_accuracy
from mambakit.train import hms, next_token_loss, param_groups, warmup_cosine


# ------------------------------------------------------------------------------------------ command and results
def cli_args(argv: list[str] | None) -> list[str]:
    """The command's arguments: argv where a caller (a test) passes them, else this process's own."""
    return list(sys.argv[1:] if argv is None else argv)


def command_line(prog: str, argv: list[str] | None) -> str:
    """'python -m experiments.x --flag value', the command a results file records."""
    return " ".join([prog, *cli_args(argv)])


def settings(args, skip: tuple[str, ...] = ()) -> dict:
    """The parsed arguments as results-file settings (paths as strings), without the names in skip."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}


def choices(p, text: str, allowed, what: str) -> list[str]:
    """A comma-separated list of an option (--models, --tasks, …) whose values must be among `allowed`; another
    value is a usage error naming the `what` (model, task, …)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    for v in values:
        if v not in allowed:
            p.error(f"unknown {what} {v!r} ({', '.join(allowed)})")
    return values


def require_positive(p, args, names) -> None:
    """A usage error for the first of the integer options `names` (dest names) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")


def check_contexts(p, a) -> None:
    """--contexts, --tokens_per_step and --warmup_start of a context sweep (dna, audio), parsed and checked:
    powers of two, and one step's tokens a multiple of the longest context (else the long context would see
    more tokens per step than the short ones). A 0 means the default: the longest / shortest context."""
    a.contexts = [int(x) for x in a.contexts.split(",") if x]
    if not a.contexts or any(c < 1 or c & (c - 1) for c in a.contexts):
        p.error(f"--contexts must be powers of two, got {a.contexts}")
    a.tokens_per_step = a.tokens_per_step or max(a.contexts)
    if a.tokens_per_step % max(a.contexts):
        p.error(f"--tokens_per_step {a.tokens_per_step} must be a multiple of the longest context {max(a.contexts)} "
                "(else the long context would see more tokens per step than the short ones)")
    a.warmup_start = a.warmup_start or min(a.contexts)
    if a.warmup_start & (a.warmup_start - 1):
        p.error(f"--warmup_start must be a power of two, got {a.warmup_start}")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (matplotlib is an optional dependency)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the plots need matplotlib: pip install mambakit[plot]") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log2_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """The experiments' plot of a quantity against a length: powers of two on the x axis, labels, grid, legend."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def save_figure(fig, path, dpi: int = 120) -> None:
    """Writes fig as a PNG atomically and closes it (the processes of one run may plot into the same path)."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)


# ------------------------------------------------------------------------------ LM pretraining (dna, audio)
@dataclass(frozen=True)
class Stage:
    """One stage of a sequence-length warm-up: `steps` optimizer steps of `batch` windows of `length` tokens."""

    length: int
    batch: int
    steps: int


def seq_len_warmup(target: int, tokens_per_step: int, total_steps: int, start: int | None = None,
                   stage_frac: float = 0.0) -> list[Stage]:
    """The stages of a sequence-length warm-up (paper §4.3.2 / App. E.3.3, after HyenaDNA): train at `start`,
    then at every power of two up to `target`, each shorter length for `stage_frac` of the steps (the paper:
    2 epochs per power of two), the rest at `target`. The batch is tokens_per_step / length, so every step
    sees the same number of tokens whatever the length ("the batch size halves as the length doubles").

    start None or >= target, or stage_frac 0: one stage at the target length (no warm-up). A warm-up stage
    gets at least one step.
    Errors when tokens_per_step is not a multiple of a stage's length (the steps would differ in tokens), or
    when the warm-up stages would leave the target length without steps."""
    if target < 1 or total_steps < 1:
        raise ValueError(f"seq_len_warmup: target ({target}) and total_steps ({total_steps}) must be >= 1")
    if not 0.0 <= stage_frac < 1.0:
        raise ValueError(f"seq_len_warmup: stage_frac must be in [0, 1), got {stage_frac}")
    lengths = []
    if start and stage_frac > 0 and start < target:
        if start & (start - 1) or target & (target - 1):
            raise ValueError(f"seq_len_warmup: start ({start}) and target ({target}) must be powers of two")
        lengths = [start << i for i in range(int(math.log2(target // start)))]
    for length in lengths + [target]:
        if tokens_per_step % length:
            raise ValueError(f"tokens per step ({tokens_per_step}) must be a multiple of every sequence length "
                             f"(got {length}); use a power of two >= the longest context")
    per_stage = max(1, int(round(stage_frac * total_steps))) if lengths else 0  # at least one step each
    last = total_steps - per_stage * len(lengths)
    if last < 1:
        raise ValueError(f"seq_len_warmup: {len(lengths)} warm-up stages of {per_stage} steps leave no step at "
                         f"the target length {target} (of {total_steps}); lower the stage fraction")
    return ([Stage(n, tokens_per_step // n, per_stage) for n in lengths]
            + [Stage(target, tokens_per_step // target, last)])


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that optimizer step `step` (0-based) belongs to; past the end, the last stage."""
    for st in stages:
        if step < st.steps:
            return st
        step -= st.steps
    return stages[-1]


def plan_text(stages: list[Stage]) -> str:
    """'1024×64 (7 st) → … → 65536×1 (50 st)': length × batch (steps) of each stage, for the progress log."""
    return " → ".join(f"{st.length}×{st.batch} ({st.steps} st)" for st in stages)


def run_budgeted(model: torch.nn.Module, loss_fn: Callable[[int], tuple[torch.Tensor, int]], budget_s: float,
                 lr: float, weight_decay: float = 0.1, grad_clip: float = 1.0, max_steps: int | None = None,
                 label: str = "", log_every: int = 10, min_steps: int = 1, budget_tokens: int = 0,
                 lr_mults: dict[int, float] | None = None) -> dict:
    """Runs AdamW steps until the first budget is spent: `budget_tokens` tokens, `budget_s` seconds or
    `max_steps` steps (a budget <= 0 / None is not used; at least one must be). loss_fn(step) returns (loss,
    tokens in the step's batch). Returns steps, tokens, seconds and the last logged losses.

    The learning rate follows the spent fraction of the budget: linear warmup over the first 10% (from 2% of
    lr, so the first steps learn), then cosine to 10% of lr at the end. A token budget gives every run of a
    sweep the same data, as the paper does (App. E.3.3); a time budget gives the same compute only on a machine
    whose load does not change during the sweep. lr_mults: {id(parameter): factor} scales those parameters'
    learning rate (discriminative fine-tuning: a pretrained backbone slower than its new head)."""
    if budget_s <= 0 and budget_tokens <= 0 and not max_steps:
        raise ValueError("run_budgeted needs budget_s > 0, budget_tokens > 0 or max_steps")
    groups = []
    for g in param_groups(model, weight_decay):  # each split by lr factor
        by_mult: dict[float, list] = {}
        for prm in g["params"]:
            by_mult.setdefault((lr_mults or {}).get(id(prm), 1.0), []).append(prm)
        groups += [{**g, "params": ps, "lr_mult": m} for m, ps in by_mult.items()]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    model.train()
    # a bar over the spent percentage of the budget (rate and ETA), on a terminal only
    from tqdm import tqdm

    bar = tqdm(total=100, desc=label or "train", unit="%", disable=None, file=sys.stderr)
    t0 = time.perf_counter()
    step, tokens, window, losses = 0, 0, [], []
    while True:
        elapsed = time.perf_counter() - t0
        progress = max(elapsed / budget_s if budget_s > 0 else 0.0,
                       tokens / budget_tokens if budget_tokens > 0 else 0.0,
                       step / max_steps if max_steps else 0.0)
        bar.update(min(100, int(progress * 100)) - bar.n)
        if step >= min_steps and progress >= 1.0:
            break
        factor = warmup_cosine(min(progress, 1.0), warmup=0.1, total=1.0, min_ratio=0.1, floor=0.02)
        for g in opt.param_groups:
            g["lr"] = lr * factor * g["lr_mult"]
        loss, n_tok = loss_fn(step)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{label}: non-finite loss at step {step + 1}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        tokens += n_tok
        window.append(loss.item())
        if step % log_every == 0:
            el = time.perf_counter() - t0
            losses.append((step, sum(window) / len(window)))
            eta = el / max(progress, 1e-9) - el  # progress = the largest spent fraction of a budget
            bar.write(f"  {label} step {step} loss {losses[-1][1]:.4f} | {tokens / el:,.0f} tok/s | "
                      f"{hms(el)} elapsed, ETA {hms(eta)}", file=sys.stderr)
            window = []
    bar.close()
    if window:
        losses.append((step, sum(window) / len(window)))
    model.eval()
    return {"steps": step, "tokens": tokens, "seconds": time.perf_counter() - t0, "train_loss": losses[-1][1],
            "loss_curve": losses}


def train_stages(model: torch.nn.Module, stages: list[Stage], batch_of: Callable[[Stage], Tensor], budget_s: float,
                 lr: float, label: str) -> dict:
    """run_budgeted of a next-token LM through the stages of a sequence-length warm-up: step s trains on
    batch_of(its stage), a (stage.batch, stage.length + 1) tensor of ids; as many steps as the stages hold."""

    def loss_fn(step):
        st = stage_at(stages, step)
        return next_token_loss(model, batch_of(st)), st.batch * st.length

    return run_budgeted(model, loss_fn, budget_s, lr, max_steps=sum(st.steps for st in stages), label=label)


@torch.no_grad()
def eval_lm(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, by_position: bool = False):
    """Mean next-token loss (nats) over fixed windows (n, l + 1), every target weighted equally.
    by_position=True returns (mean, per-position mean (l,) float64): entry t − 1 is the mean loss of the
    targets predicted after reading t tokens of the window (the same windows, no second pass)."""
    model.eval()
    pos_sum = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        b = windows[i:i + batch_size]
        logits = model(b[:, :-1]).logits  # (b, l, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), b[:, 1:], reduction="none")  # (b, l)
        pos_sum += nll.double().sum(0)
    per_pos = pos_sum / len(windows)
    mean = float(per_pos.mean())
    return (mean, per_pos) if by_position else mean


def eval_at_context(model: torch.nn.Module, segments: list[np.ndarray], context: int,
                    batch_tokens: int) -> tuple[float, list[dict], int]:
    """Held-out loss of a model at its own context: every segment cut into context-long windows (+ 1 for the
    last target), each scored once, about batch_tokens per forward pass. Returns (mean nats per token, the loss
    by position in the window (position_buckets), the number of scored tokens)."""
    L = context
    wins = torch.from_numpy(np.concatenate([np.stack([s[i:i + L + 1] for i in range(0, len(s) - L, L)])
                                            for s in segments]))
    nll, per_pos = eval_lm(model, wins, max(1, batch_tokens // L), by_position=True)
    return nll, position_buckets(per_pos), int(wins[:, 1:].numel())


def position_buckets(nll: torch.Tensor) -> list[dict]:
    """Loss by position inside the context window, bucketed by powers of two: nll (..., l) holds the loss of
    the target predicted after reading t = 1 … l tokens (last axis); bucket k averages the positions
    t ∈ [2^k, 2^(k+1)) over every leading index; the last bucket runs to l (for l a power of two it is
    [l/2, l], the second half of the window, not a bucket of the single position l). A model that uses its context has a
    lower loss in later buckets; one that uses only the last few tokens is flat after its first buckets.
    Returns [{"lo": first t, "hi": last t, "nats": mean loss, "bits": mean / ln 2}, ...]."""
    if nll.ndim < 1 or nll.shape[-1] < 1:
        raise ValueError(f"position_buckets needs a (..., l) loss tensor with l >= 1, got shape {tuple(nll.shape)}")
    flat = nll.double().reshape(-1, nll.shape[-1])  # (n, l)
    l = nll.shape[-1]
    starts = [2**k for k in range(int(math.log2(l)) + 1)]  # 1, 2, 4, … <= l
    if len(starts) > 2 and starts[-1] == l:  # no bucket of the single position l: it joins the one before
        starts.pop()
    out = []
    for lo, nxt in zip(starts, starts[1:] + [l + 1]):
        m = float(flat[:, lo - 1:nxt - 1].mean())
        out.append({"lo": lo, "hi": nxt - 1, "nats": m, "bits": m / math.log(2)})
    return out


def merge_tail(buckets: list[dict]) -> list[dict]:
    """Buckets as position_buckets makes them now: a last single-position bucket {l} (the form results from
    before this rule kept) merged into the one before, weighted by the number of positions."""
    if len(buckets) < 3 or buckets[-1]["lo"] != buckets[-1]["hi"]:
        return buckets
    a, b = buckets[-2], buckets[-1]
    na, nb = a["hi"] - a["lo"] + 1, 1
    m = (a["nats"] * na + b["nats"] * nb) / (na + nb)
    return buckets[:-2] + [{"lo": a["lo"], "hi": b["hi"], "nats": m, "bits": m / math.log(2)}]


def plot_loss_by_position(series: dict[str, list[dict]], unit: str, zoom_from: int, title: str, png: Path) -> None:
    """Loss-by-position curves (position_buckets output per label) on two axes: every bucket, and the
    buckets from `zoom_from` on (the first positions' loss is far higher and would flatten the rest)."""
    plt = pyplot()
    fig, (ax_full, ax_zoom) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, lo in ((ax_full, 1), (ax_zoom, zoom_from)):
        for (label, bs), style in zip(series.items(), ("o-", "s-", "^-", "D-", "v-", "o--", "s--", "^--")):
            pts = [(b["lo"], b["bits"]) for b in bs if b["lo"] >= lo]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position t in the window (bucket [t, 2t): tokens read before the target)")
        ax.set_ylabel(f"held-out loss ({unit})")
        ax.grid(alpha=0.3)
    ax_full.set_title("all positions")
    ax_zoom.set_title(f"positions ≥ {zoom_from}")
    ax_zoom.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, png)


def position_table(rows: list[tuple[list[str], int, list[dict]]], heads: list[str], token: str,
                   digits: int) -> list[str]:
    """The markdown section 'held-out loss by position': rows of (label cells, context, position_buckets), one
    column per bucket of the longest context; token names what the model reads ('base', 'sample')."""
    longest = merge_tail(max(rows, key=lambda r: r[1])[2])
    names = [str(b["lo"]) if b["lo"] == b["hi"] else f"{b['lo']}–{b['hi']}" for b in longest]
    lines = ["", f"### Held-out loss (bits/{token}) by position in the context window", "",
             f"Each model at its own context; column t = the targets predicted after reading t {token}s of the "
             "window (powers-of-two buckets; a row's last bucket runs to its own context). Lower at later positions = "
             "the model uses that much context.", "",
             "| " + " | ".join(heads + names) + " |",
             "|" + "---|" * (len(heads) + len(longest))]
    for cells, _, buckets in rows:
        bits = {b["lo"]: f"{b['bits']:.{digits}f}" for b in merge_tail(buckets)}
        lines.append("| " + " | ".join(cells + [bits.get(b["lo"], "") for b in longest]) + " |")
    return lines


# -------------------------------------------------------------- synthetic tasks (selective copying, induction heads)
# Any causal model whose forward(input_ids) returns an object with `.logits` (b, l, V) trains here: MambaLM
# (with any mixer), S4DLM, the Transformer baseline. The loss is the cross-entropy at the scored positions only
# (targets != −100, see mambakit/data/synthetic.py), the optimiser Adam without weight decay at a constant
# learning rate after a short linear warmup (paper App. E.1: "Adam, no weight decay, constant LR"). Each step
# draws a fresh batch from (seed, step), so a run is reproducible and every model of an experiment sees the
# same data.
BatchFn = Callable[[int], tuple[Tensor, Tensor]]  # step → (inputs, targets)


@dataclass
class TrainResult:
    steps: int = 0
    seconds: float = 0.0
    stopped: str = "steps"  # "steps", "time" (time budget hit) or "solved" (eval accuracy reached the target)
    curve: list[dict] = field(default_factory=list)  # {"step", "seconds", "loss", "accuracy"} per evaluation


def scored_loss(logits: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """Mean cross-entropy over the scored positions; logits of padded vocabulary entries are dropped."""
    logits = logits[..., :vocab_size].float()
    return F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model, batches: list[tuple[Tensor, Tensor]], vocab_size: int) -> float:
    """Accuracy (fraction) over the scored positions of fixed batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for inputs, targets in batches:
        c, n = scored_accuracy(model(inputs).logits, targets, vocab_size)
        correct, total = correct + c, total + n
    model.train(was_training)
    return correct / max(total, 1)


def lr_factor(step: int, *, warmup: int, steps: int, min_frac: float | None = None) -> float:
    """The lr multiplier after `step` optimizer steps (0-based): linear warm-up to 1 over `warmup` steps, then
    1 (min_frac None) or a cosine from 1 down to min_frac at step `steps`."""
    # mambakit's schedule at the position of the next step, counted as taken (step + 1)
    return warmup_cosine(step + 1, warmup=warmup, total=steps, min_ratio=min_frac)


def budget_seconds(minutes: float) -> float:
    """--time-budget-min in seconds; 0 (or less) is no limit."""
    return minutes * 60 if minutes > 0 else float("inf")


def new_results(task: str, args) -> dict:
    """The results of a synthetic-task run before its models: task, command, settings."""
    return {"task": task, "command": args.command, "settings": settings(args, skip=("command",)), "models": {}}


def fresh_models(args, build: Callable[[str], torch.nn.Module]):
    """(name, model, parameter count) for each of --models, each built by build(name) right after seeding torch
    with --seed, so that a model's initialisation does not depend on which models trained before it in this
    process. A stale STOP_<name> file in --out is removed first: it must not end this run."""
    for name in args.models:
        torch.manual_seed(args.seed)
        model = build(name)
        (args.out / f"STOP_{name}").unlink(missing_ok=True)
        yield name, model, sum(p.numel() for p in model.parameters())


def train(model, batch_fn: BatchFn, val_batches: list[tuple[Tensor, Tensor]], vocab_size: int, *, steps: int,
          lr: float, warmup: int = 100, eval_every: int = 100, time_budget_s: float = math.inf,
          stop_at: float | None = None, stop_patience: int = 1, grad_clip: float = 1.0, name: str = "model",
          stop_file=None, lr_min_frac: float | None = None, log=print, resume: dict | None = None,
          save: Callable[[dict], None] | None = None, save_every_s: float = 300.0,
          progress: bool = False) -> TrainResult:
    """Trains `model` for `steps` steps (or until time_budget_s, or until validation accuracy >= stop_at at
    stop_patience evaluations in a row: solved); evaluates every eval_every steps and at the end. Prints one
    progress line per evaluation. If the path `stop_file` comes to exist, training ends at the next step (a
    long run on a shared machine can be cut short by hand and still report its model). The lr warms up linearly
    over `warmup` steps, then stays constant (the paper's synthetic-task recipe, App. E.1), or with lr_min_frac
    decays along a cosine to lr · lr_min_frac at the last step.

    Long runs: every save_every_s seconds (at a step boundary, after that step's evaluation) save(loop state)
    receives everything the next steps depend on (loop_state: model, optimizer, schedule, torch's RNG, step, the
    curve so far); train(..., resume=that state) continues bitwise as if never stopped, because batch_fn(step)
    draws each batch from the step number alone. progress=True shows a tqdm bar with the ETA."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, warmup=warmup, steps=steps,
                                                                      min_frac=lr_min_frac))
    res = TrainResult()
    losses: list[float] = []
    solved_evals, first = 0, 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["torch_rng"])
        first, losses, solved_evals = resume["step"] + 1, list(resume["losses"]), resume["solved_evals"]
        res.curve = list(resume["curve"])
        res.steps, res.seconds = resume["step"], resume["seconds"]
    t0 = time.perf_counter() - res.seconds  # elapsed time carries over a resume

    def snapshot(step: int) -> dict:
        return {"step": step, "seconds": res.seconds, "losses": list(losses), "solved_evals": solved_evals,
                "curve": list(res.curve), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()}

    if save is not None and resume is None:  # a stage's start: a kill soon after must not fall back a stage
        save(snapshot(0))
    last_save = time.perf_counter()
    bar = _progress_bar(name, steps, first - 1) if progress else None
    model.train()
    for step in range(first, steps + 1):
        inputs, targets = batch_fn(step)
        loss = scored_loss(model(inputs).logits, targets, vocab_size)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
        elapsed = time.perf_counter() - t0
        out_of_time = elapsed >= time_budget_s or (stop_file is not None and Path(stop_file).exists())
        res.steps, res.seconds = step, elapsed
        if step % eval_every == 0 or step == steps or out_of_time:
            acc = evaluate(model, val_batches, vocab_size)
            mean_loss = sum(losses) / len(losses)
            losses.clear()
            elapsed = time.perf_counter() - t0
            res.curve.append({"step": step, "seconds": round(elapsed, 1), "loss": round(mean_loss, 4),
                              "accuracy": round(acc, 4)})
            rate = (step - first + 1) / max(elapsed - (resume or {}).get("seconds", 0.0), 1e-9)
            eta = (steps - step) / rate if rate > 0 else float("nan")
            line = (f"  {name:>12s} step {step:6d}/{steps}  loss {mean_loss:.4f}  val acc {100 * acc:5.1f}%  "
                    f"{rate:.1f} steps/s  elapsed {elapsed:5.0f}s  ETA {min(eta, time_budget_s - elapsed):5.0f}s")
            if bar is not None:
                bar.write(line)
            else:
                log(line)
            res.seconds = elapsed
            solved_evals = solved_evals + 1 if stop_at is not None and acc >= stop_at else 0
            if stop_at is not None and solved_evals >= stop_patience:
                res.stopped = "solved"
                break
            if out_of_time:
                res.stopped = "time" if elapsed >= time_budget_s else "stop file"
                break
        if save is not None and step < steps and time.perf_counter() - last_save >= save_every_s:
            save(snapshot(step))
            last_save = time.perf_counter()
    if bar is not None:
        bar.close()
    return res


def steps_per_second(model, batch_fn: BatchFn, vocab_size: int, steps: int, warm: int = 2) -> float:
    """Training throughput: Adam steps (forward, scored loss, backward, update) per second over `steps` steps
    after `warm` untimed ones (kernel compilation, allocator); the model is trained by them."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    for i in range(warm + steps):
        if i == warm:
            t0 = time.perf_counter()
        inputs, targets = batch_fn(i)
        loss = scored_loss(model(inputs).logits, targets, vocab_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def report_throughput(models, batch_fn: BatchFn, vocab_size: int, steps: int, budget: Callable[[str], int],
                      log=print) -> None:
    """`--time-steps`: each (name, model) of `models` timed at the final training length, with the hours its
    budget(name) steps need at that rate on this machine (one process, the threads set by the caller)."""
    log(f"timing {steps} training steps per model (load average {os.getloadavg()[0]:.2f}, "
        f"{torch.get_num_threads()} thread(s))")
    for name, model, _ in models:
        rate = steps_per_second(model, batch_fn, vocab_size, steps)
        log(f"  {name}: {rate:.3f} steps/s; {budget(name):,} steps = {budget(name) / rate / 3600:.1f} h")


def _progress_bar(name: str, total: int, initial: int):
    """A tqdm bar on stderr with the ETA; in a log file it redraws every 30 s at most (one line each)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", mininterval=30, file=sys.stderr,
                dynamic_ncols=False, ncols=100)


@dataclass(frozen=True)
class CurriculumStage:
    """One stage of a length curriculum: train at `length` for at most `steps` steps, or until validation
    accuracy reaches stop_at (None: run all of them)."""

    length: int
    steps: int
    stop_at: float | None = None


def train_curriculum(model, name: str, stages: list[CurriculumStage],
                     batch_at: Callable[[int, int], tuple[Tensor, Tensor]], val_sets: dict[int, list], vocab_size: int, *, lr: float, warmup: int, eval_every: int,
                     stop_patience: int, budget_s: float = math.inf, fill_to: int | None = None, stop_file=None,
                     lr_min_frac: float | None = None, ckpt: "Checkpoint | None" = None, log=print,
                     progress: bool = False) -> TrainResult:
    """Trains through the stages in order, a fresh Adam per stage (the warm-up in the first only, the cosine
    decay of lr_min_frac in the last only); batch_at(length, global step) gives each step's batch, so every
    model sees the same batches. A stage ends at its steps, at its stop_at, or when the time budget is spent;
    fill_to: the last stage runs until the total reaches fill_to steps (a total budget of steps, whatever the
    shorter stages took). One TrainResult over all stages: the curve's steps and seconds are cumulative and each
    point names its length. ckpt: save and resume (Checkpoint.train_state) at every stage, bitwise."""
    total = TrainResult()
    saved = ckpt.train_state() if ckpt is not None else None
    first_stage = 0
    if saved is not None:  # resume: the stages before saved["stage"] are done, its loop continues
        first_stage = saved["stage"]
        total = TrainResult(**saved["total"])
        log(f"  {name}: resuming stage {first_stage + 1}/{len(stages)} at step {total.steps + saved['loop']['step']}")
    for i in range(first_stage, len(stages)):
        st, last = stages[i], i == len(stages) - 1
        if total.seconds >= budget_s:
            break
        offset = total.steps
        steps = max(1, fill_to - offset) if last and fill_to is not None else st.steps

        def batch_fn(step: int, length=st.length, offset=offset):
            return batch_at(length, offset + step)

        def save(loop: dict, i=i, total=total) -> None:
            ckpt.save_train(i, total, loop)

        res = train(model, batch_fn, val_sets[st.length], vocab_size, steps=steps, lr=lr,
                    warmup=warmup if i == 0 else 0, eval_every=eval_every, time_budget_s=budget_s - total.seconds,
                    stop_at=st.stop_at, stop_patience=stop_patience,
                    name=name if len(stages) == 1 else f"{name}@{st.length}", stop_file=stop_file,
                    lr_min_frac=lr_min_frac if last else None, log=log,
                    resume=saved["loop"] if saved is not None and i == first_stage else None,
                    save=save if ckpt is not None else None, save_every_s=ckpt.every_s if ckpt else math.inf,
                    progress=progress)
        total = TrainResult(steps=total.steps + res.steps, seconds=total.seconds + res.seconds,
                            stopped=res.stopped if last or res.stopped in ("time", "stop file") else "steps",
                            curve=total.curve + [{**pt, "step": pt["step"] + offset,
                                                  "seconds": round(pt["seconds"] + total.seconds, 1),
                                                  "length": st.length} for pt in res.curve])
        if res.stopped in ("time", "stop file"):
            break
    return total


def stage_steps_of(curve: list[dict]) -> list[tuple[int, int]]:
    """[(length, steps)] of a curriculum run, from its curve (each point names its length; cumulative steps)."""
    ends: dict[int, int] = {}
    for pt in curve:
        ends[pt.get("length", 0)] = pt["step"]
    out, prev = [], 0
    for length, end in ends.items():
        out.append((length, end - prev))
        prev = end
    return out


def checkpoint_progress(out) -> list[dict]:
    """Where each checkpointed model of a run stands (--out/checkpoints/*.pt, by name): its phase, the steps
    trained, the curriculum stage, the processes that worked on it and when the state was saved."""
    rows = []
    for f in sorted((Path(out) / "checkpoints").glob("*.pt")):
        st = torch.load(f, map_location="cpu", weights_only=False)
        steps = (st["total"]["steps"] + st["loop"]["step"]) if st["phase"] == "train" else st["train"]["steps"]
        seg = st.get("segments") or [{}]
        rows.append({"name": f.stem, "phase": st["phase"], "steps": steps, "stage": st.get("stage"),
                     "processes": len(seg), "saved": seg[-1].get("end", "?")})
    return rows


def progress_lines(out, total_steps: Callable[[str], int]) -> list[str]:
    """The README's section on a run still in progress: one row per checkpointed model not yet done."""
    rows = [r for r in checkpoint_progress(out) if r["phase"] != "done"]
    if not rows:
        return []
    lines = ["## In progress (from the checkpoints)", "", "| model | phase | steps trained | of | processes so far | "
             "last saved |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['phase']}" + (f" (stage {r['stage'] + 1})" if r["stage"] is not None else "")
              + f" | {r['steps']:,} | {total_steps(r['name']):,} | {r['processes']} | {r['saved']} |" for r in rows]
    return lines + ["", "Models without a checkpoint have not started. The run continues with its command "
                    "(`--resume`)."]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def machine_conditions() -> dict:
    """When and where a process starts: UTC time, CPUs, the 1-minute load average, this process's niceness."""
    return {"start": _now(), "cpus": os.cpu_count(), "load_start": round(os.getloadavg()[0], 2), "nice": os.nice(0)}


class Checkpoint:
    """One model's resumable state in a single file (`<out>/checkpoints/<name>.pt`), written atomically:
    the settings it was trained under, its phase ("train", "eval", "done"), the curriculum stage and the loop
    state of `train` while training, the accuracies measured so far while evaluating, the weights throughout.
    Only the latest state is kept; once done, the optimizer state is dropped (the file keeps the trained model).
    Resuming under other settings is refused, naming the settings that differ (options newer than the
    checkpoint are not compared)."""

    def __init__(self, path, settings: dict, every_s: float, resume: bool, log=print):
        self.path, self.settings, self.every_s, self.log = Path(path), settings, every_s, log
        self.state: dict | None = None
        if self.path.is_file():
            if not resume:
                raise SystemExit(f"{self.path} exists: pass --resume to continue it, or delete it to start over")
            self.state = torch.load(self.path, map_location="cpu", weights_only=False)
            # an option added after the checkpoint was written is not in its settings: taken to be at its default
            old = self.state["settings"]
            differ = sorted(k for k in old if k not in _RUN_ONLY_SETTINGS and k in settings and old[k] != settings[k])
            if differ:
                raise SystemExit(f"--resume: {self.path} was trained with other settings ("
                                 + ", ".join(f"{k}: {self.state['settings'].get(k)!r} there, {settings.get(k)!r} now"
                                             for k in differ) + "); use another --out or delete it")
        # one entry per process that worked on this model: the wall time and machine conditions of a long run
        self.segments = (self.state or {}).get("segments", []) + [machine_conditions()]

    @property
    def phase(self) -> str | None:
        return None if self.state is None else self.state["phase"]

    def train_state(self) -> dict | None:
        return self.state if self.phase == "train" else None

    def _write(self, state: dict) -> None:
        self.segments[-1].update(end=_now(), load_end=round(os.getloadavg()[0], 2))
        state["segments"] = self.segments
        self.state = state
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def save_train(self, stage: int, total: TrainResult, loop: dict) -> None:
        self._write({"settings": self.settings, "phase": "train", "stage": stage, "total": vars(total).copy(),
                     "loop": loop})

    def save_eval(self, model, train: TrainResult, evaluated: dict) -> None:
        """After training and after each test length: the trained weights and what is measured so far."""
        self._write({"settings": self.settings, "phase": "eval", "model": model.state_dict(),
                     "train": vars(train).copy(), "eval": evaluated})

    def save_done(self, model, train: TrainResult, evaluated: dict) -> None:
        self._write({"settings": self.settings, "phase": "done", "model": model.state_dict(),
                     "train": vars(train).copy(), "eval": evaluated})


# settings that do not change a model's results: runs that differ only in these can share one results.json
_RUN_ONLY_SETTINGS = {"models", "out", "no_readme", "report_only", "threads", "time_budget_min", "jobs", "resume",
                      "checkpoint_min", "progress"}


def save_results(path, results: dict, order: list[str], log=print) -> dict:
    """Writes results.json atomically, merging in the models of an earlier or concurrent run with the same
    settings (so the models of one experiment can be trained by separate processes: `--models mamba` and
    `--models s4d` side by side). Returns the merged results. A lock file serialises concurrent writers."""
    path = Path(path)
    # the lock lives outside the output folder, so it never shows up among the results
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"mambakit-results-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = dict(results)
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = None
            same = old is not None and old.get("task") == results["task"] and all(
                old["settings"].get(k) == v for k, v in results["settings"].items() if k not in _RUN_ONLY_SETTINGS)
            if same:
                models = {**old["models"], **results["models"]}
                merged["models"] = {k: models[k] for k in order if k in models}
            elif old is not None:
                log(f"note: {path} holds a run with other settings; it is replaced")
        for name, r in results["models"].items():
            r.setdefault("command", results["command"])
        atomic_write(path, json.dumps(merged, indent=1) + "\n")
    return merged


def split_models(models: list[str], jobs: int, cost: dict[str, float]) -> list[list[str]]:
    """models into at most `jobs` groups of about equal cost (largest first, each to the cheapest group)."""
    groups: list[list[str]] = [[] for _ in range(min(jobs, len(models)))]
    for m in sorted(models, key=lambda m: -cost.get(m, 1.0)):
        min(groups, key=lambda g: sum(cost.get(x, 1.0) for x in g)).append(m)
    return [g for g in groups if g]


@dataclass(frozen=True)
class Report:
    """How a synthetic-task experiment reports a run: table(results) gives the lines it logs, plot(results,
    png) draws accuracy.png, readme(results, path) writes README.md."""

    table: Callable[[dict], list[str]]
    plot: Callable[[dict, Path], None]
    readme: Callable[[dict, Path], None]

    def write(self, args, results: dict, log=print) -> dict:
        """The table (to the log), accuracy.png and, unless --no-readme, README.md of a run into --out."""
        log("")
        for line in self.table(results):
            log(line)
        self.plot(results, args.out / "accuracy.png")
        if not args.no_readme:
            self.readme(results, args.out / "README.md")
        return results

    def from_file(self, args, log=print) -> dict:
        """`--report-only`: the table, plot and README rebuilt from --out/results.json; while a checkpointed run
        has no finished model yet, from its checkpoints' settings (the README then shows only its progress)."""
        path = args.out / "results.json"
        if path.is_file():
            return self.write(args, json.loads(path.read_text()), log)
        progress = checkpoint_progress(args.out)
        if not progress:
            raise SystemExit(f"--report-only: no results.json (nor checkpoints) in {args.out}")
        first = torch.load(args.out / "checkpoints" / f"{progress[0]['name']}.pt", map_location="cpu",
                           weights_only=False)
        return self.write(args, {"task": "", "command": args.command, "settings": first["settings"], "models": {}}, log)


def run_in_processes(args, argv: list[str], module: str, groups: list[list[str]], report: Report,
                     log=print) -> dict:
    """Runs an experiment's model groups in child processes of this command, side by side (each `python -m
    module <argv> --models <its group> --jobs 1 --no-readme`; they merge their results into one results.json,
    see save_results), then writes the table, plot and README from it, under this command."""
    log(f"training in {len(groups)} processes: " + "; ".join(",".join(g) for g in groups))
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv, "--models", ",".join(g), "--jobs", "1",
                               "--no-readme"]) for g in groups]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"a training process failed (exit codes {codes}; groups {groups})")
    path = args.out / "results.json"
    results = json.loads(path.read_text())
    results["command"] = args.command
    for name in args.models:  # these came from this command's children
        results["models"][name]["command"] = args.command
    atomic_write(path, json.dumps(results, indent=1) + "\n")
    return report.from_file(args, log)


def run_experiment(args, argv, module: str, cost: dict[str, float], run, report: Report) -> int:
    """An experiment's main: rebuild the report (--report-only), or train its models in args.jobs processes
    side by side (run_in_processes), or all of them in this process (run)."""
    if args.report_only:
        report.from_file(args)
    elif args.jobs > 1 and len(args.models) > 1:
        run_in_processes(args, cli_args(argv), module, split_models(args.models, args.jobs, cost), report)
    else:
        run(args)
    return 0


NOTES_MARKER = "<!-- hand-written notes below: kept when this README is regenerated -->"


def write_readme_keeping_notes(path, text: str) -> None:
    """Writes the README at path atomically, keeping what the file has from NOTES_MARKER on (hand-written
    observations about earlier runs, which a regenerated README must not lose)."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    if NOTES_MARKER in old:
        text = text.rstrip("\n") + "\n\n" + old[old.index(NOTES_MARKER):]
    atomic_write(path, text)


# ------------------------------------------------------------------------------ models matched in parameters
def closest_by_params(build: Callable[[int], torch.nn.Module], candidates, target: int) -> tuple[int, int]:
    """(candidate, its parameter count) of the candidate whose model build(candidate) has the parameter count
    closest to target (ties: the first); the models are built on the meta device, so nothing is allocated.
    The experiments' "equal size" comparisons pick a width or a state size with it (mqar, language)."""
    best = None
    for c in candidates:
        with torch.device("meta"):
            n = sum(p.numel() for p in build(c).parameters())
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (c, n)
    if best is None:
        raise ValueError("closest_by_params: no candidates")
    return best
