"""The training loop shared by the synthetic-task experiments (Selective Copying, Induction Heads).

Any causal model whose forward(input_ids) returns an object with `.logits` (b, l, V) trains here: MambaLM
(with any mixer), S4DLM, the Transformer baseline. The loss is the cross-entropy at the scored positions only
(targets != −100, see mambakit/data/synthetic.py), the optimiser Adam without weight decay at a constant
learning rate after a short linear warmup (paper App. E.1: "Adam, no weight decay, constant LR"). Each step
draws a fresh batch from (seed, step), so a run is reproducible and every model of an experiment sees the
same data.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.data.synthetic import IGNORE_INDEX, scored_accuracy

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
    if step < warmup:
        return (step + 1) / warmup
    if min_frac is None:
        return 1.0
    t = min(1.0, (step + 1 - warmup) / max(steps - warmup, 1))
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * t))


def train(model, batch_fn: BatchFn, val_batches: list[tuple[Tensor, Tensor]], vocab_size: int, *, steps: int,
          lr: float, warmup: int = 100, eval_every: int = 100, time_budget_s: float = math.inf,
          stop_at: float | None = None, stop_patience: int = 1, grad_clip: float = 1.0, name: str = "model",
          stop_file=None, lr_min_frac: float | None = None, log=print) -> TrainResult:
    """Trains `model` for `steps` steps (or until time_budget_s, or until validation accuracy >= stop_at at
    stop_patience evaluations in a row: solved); evaluates every eval_every steps and at the end. Prints one
    progress line per evaluation. If the path `stop_file` comes to exist, training ends at the next step (a
    long run on a shared machine can be cut short by hand and still report its model). The lr warms up linearly
    over `warmup` steps, then stays constant (the paper's synthetic-task recipe, App. E.1), or with lr_min_frac
    decays along a cosine to lr · lr_min_frac at the last step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, warmup=warmup, steps=steps,
                                                                      min_frac=lr_min_frac))
    res = TrainResult()
    t0 = time.perf_counter()
    losses: list[float] = []
    solved_evals = 0
    model.train()
    for step in range(1, steps + 1):
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
        elapsed = time.perf_counter() - t0
        out_of_time = elapsed >= time_budget_s or (stop_file is not None and os.path.exists(stop_file))
        if step % eval_every == 0 or step == steps or out_of_time:
            acc = evaluate(model, val_batches, vocab_size)
            mean_loss = sum(losses) / len(losses)
            losses.clear()
            elapsed = time.perf_counter() - t0
            res.curve.append({"step": step, "seconds": round(elapsed, 1), "loss": round(mean_loss, 4),
                              "accuracy": round(acc, 4)})
            rate = step / elapsed
            eta = (steps - step) / rate if rate > 0 else float("nan")
            log(f"  {name:>12s} step {step:6d}/{steps}  loss {mean_loss:.4f}  val acc {100 * acc:5.1f}%  "
                f"{rate:.1f} steps/s  elapsed {elapsed:5.0f}s  ETA {min(eta, time_budget_s - elapsed):5.0f}s")
            res.steps, res.seconds = step, elapsed
            solved_evals = solved_evals + 1 if stop_at is not None and acc >= stop_at else 0
            if stop_at is not None and solved_evals >= stop_patience:
                res.stopped = "solved"
                break
            if out_of_time:
                res.stopped = "time" if elapsed >= time_budget_s else "stop file"
                break
    return res


# settings that do not change a model's results: runs that differ only in these can share one results.json
_RUN_ONLY_SETTINGS = {"models", "out", "no_readme", "report_only", "threads", "time_budget_min", "jobs"}


def save_results(path, results: dict, order: list[str], log=print) -> dict:
    """Writes results.json atomically, merging in the models of an earlier or concurrent run with the same
    settings (so the models of one experiment can be trained by separate processes: `--models mamba` and
    `--models s4d` side by side). Returns the merged results. A lock file serialises concurrent writers."""
    import fcntl
    import json
    import os
    from pathlib import Path

    import hashlib
    import tempfile

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
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(merged, indent=1) + "\n")
        os.replace(tmp, path)
    return merged


def write_text_atomic(path, text: str) -> None:
    """Writes a text file through a temporary file and a rename: an interrupted write never leaves half a file."""
    from pathlib import Path

    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def split_models(models: list[str], jobs: int, cost: dict[str, float]) -> list[list[str]]:
    """models into at most `jobs` groups of about equal cost (largest first, each to the cheapest group)."""
    groups: list[list[str]] = [[] for _ in range(min(jobs, len(models)))]
    for m in sorted(models, key=lambda m: -cost.get(m, 1.0)):
        min(groups, key=lambda g: sum(cost.get(x, 1.0) for x in g)).append(m)
    return [g for g in groups if g]


def run_in_processes(args, argv: list[str], module: str, groups: list[list[str]], report, log=print) -> dict:
    """Runs an experiment's model groups in child processes of this command, side by side (each `python -m
    module <argv> --models <its group> --jobs 1 --no-readme`; they merge their results into one results.json,
    see save_results), then writes the table, plot and README from it, under this command."""
    import json
    import subprocess
    import sys

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
    write_text_atomic(path, json.dumps(results, indent=1) + "\n")
    return report(args, log)


def run_experiment(args, argv, module: str, cost: dict[str, float], run, report) -> int:
    """An experiment's main: rebuild the report (--report-only), or train its models in args.jobs processes
    side by side (run_in_processes), or all of them in this process (run)."""
    import sys

    if args.report_only:
        report(args)
    elif args.jobs > 1 and len(args.models) > 1:
        run_in_processes(args, list(sys.argv[1:] if argv is None else argv), module,
                         split_models(args.models, args.jobs, cost), report)
    else:
        run(args)
    return 0


NOTES_MARKER = "<!-- hand-written notes below: kept when this README is regenerated -->"


def write_readme_keeping_notes(path, text: str) -> None:
    """write_text_atomic(path, text), keeping what the file has from NOTES_MARKER on (hand-written
    observations about earlier runs, which a regenerated README must not lose)."""
    from pathlib import Path

    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    if NOTES_MARKER in old:
        text = text.rstrip("\n") + "\n\n" + old[old.index(NOTES_MARKER):]
    write_text_atomic(path, text)


def report_from_file(args, print_table, plot, write_readme, log=print) -> dict:
    """`--report-only` of an experiment: its table, plot and README rebuilt from --out/results.json."""
    import json

    path = args.out / "results.json"
    if not path.is_file():
        raise SystemExit(f"--report-only: no results.json in {args.out}")
    results = json.loads(path.read_text())
    print_table(results, log)
    plot(results, args.out / "accuracy.png")
    if not args.no_readme:
        write_readme(results, args.out / "README.md")
    return results
