"""Small time-budgeted training loops shared by experiments/dna and experiments/audio.

Why not mambakit.train? The trainer reads text documents through a text tokenizer and draws its own windows;
these experiments need per-step batches from their own samplers (genome windows with reverse-complement
augmentation, μ-law audio windows) and classification losses. The hook that would remove this file: a
`batch_fn(step) -> (b, l + 1) ids` (or a pre-tokenized array data source with a vocab size) and a `loss_fn`
accepted by `mambakit.train.train`.

The loop fits its learning-rate schedule to its budget (tokens, seconds or steps: linear warmup over the first
10%, then cosine to lr · min_ratio at the end). The experiments' defaults are token budgets, so each run in a
sweep sees the same number of tokens, as the paper gives each context length (App E.3.3).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mambakit.train import param_groups


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
    return [Stage(n, tokens_per_step // n, per_stage) for n in lengths] + [Stage(target, tokens_per_step // target, last)]


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that optimizer step `step` (0-based) belongs to; past the end, the last stage."""
    for st in stages:
        if step < st.steps:
            return st
        step -= st.steps
    return stages[-1]


def lr_at(progress: float, lr: float, warmup: float = 0.1, min_ratio: float = 0.1) -> float:
    """Learning rate at `progress` ∈ [0, 1] of the budget: linear warmup, then cosine to lr · min_ratio."""
    if progress < warmup:
        return lr * max(progress / warmup, 0.02)
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60:02d}:{s % 60:02d}"


def run_budgeted(model: torch.nn.Module, loss_fn: Callable[[int], tuple[torch.Tensor, int]], budget_s: float,
                 lr: float, weight_decay: float = 0.1, grad_clip: float = 1.0, max_steps: int | None = None,
                 label: str = "", log_every: int = 10, min_steps: int = 1, budget_tokens: int = 0,
                 lr_mults: dict[int, float] | None = None) -> dict:
    """Runs AdamW steps until the first budget is spent: `budget_tokens` tokens, `budget_s` seconds or
    `max_steps` steps (a budget <= 0 / None is not used; at least one must be). loss_fn(step) returns (loss,
    tokens in the step's batch). Returns steps, tokens, seconds and the last logged losses.

    A token budget gives every run of a sweep the same data, as the paper does; a time budget gives the same
    compute only on a machine whose load does not change during the sweep. lr_mults: {id(parameter): factor}
    scales those parameters' learning rate (discriminative fine-tuning: a pretrained backbone slower than its
    new head)."""
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
    t0 = time.perf_counter()
    step, tokens, window, losses = 0, 0, [], []
    while True:
        elapsed = time.perf_counter() - t0
        progress = max(elapsed / budget_s if budget_s > 0 else 0.0,
                       tokens / budget_tokens if budget_tokens > 0 else 0.0,
                       step / max_steps if max_steps else 0.0)
        if step >= min_steps and progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(min(progress, 1.0), lr) * g["lr_mult"]
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
            print(f"  {label} step {step} loss {losses[-1][1]:.4f} | {tokens / el:,.0f} tok/s | "
                  f"{_hms(el)} elapsed, ETA {_hms(eta)}", file=sys.stderr, flush=True)
            window = []
    if window:
        losses.append((step, sum(window) / len(window)))
    model.eval()
    return {"steps": step, "tokens": tokens, "seconds": time.perf_counter() - t0, "train_loss": losses[-1][1],
            "loss_curve": losses}


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """batch (b, l + 1): the model reads batch[:, :-1], predicts batch[:, 1:]; mean nats per token."""
    logits = model(batch[:, :-1]).logits  # (b, l, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


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


def plot_position_buckets(ax_full, ax_zoom, series: dict[str, list[dict]], unit: str, zoom_from: int = 64) -> None:
    """Loss-by-position curves (position_buckets output per label) on two axes: every bucket, and the
    buckets from `zoom_from` on (the first positions' loss is far higher and would flatten the rest)."""
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
