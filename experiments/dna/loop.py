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
from typing import Callable

import torch
import torch.nn.functional as F

from mambakit.train import param_groups


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
                 label: str = "", log_every: int = 10, min_steps: int = 1, budget_tokens: int = 0) -> dict:
    """Runs AdamW steps until the first budget is spent: `budget_tokens` tokens, `budget_s` seconds or
    `max_steps` steps (a budget <= 0 / None is not used; at least one must be). loss_fn(step) returns (loss,
    tokens in the step's batch). Returns steps, tokens, seconds and the last logged losses.

    A token budget gives every run of a sweep the same data, as the paper does; a time budget gives the same
    compute only on a machine whose load does not change during the sweep."""
    if budget_s <= 0 and budget_tokens <= 0 and not max_steps:
        raise ValueError("run_budgeted needs budget_s > 0, budget_tokens > 0 or max_steps")
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
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
            g["lr"] = lr_at(min(progress, 1.0), lr)
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
def eval_lm(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss (nats) over fixed windows (n, l + 1), every target weighted equally."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        b = windows[i:i + batch_size]
        logits = model(b[:, :-1]).logits
        total += float(F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
        count += b[:, 1:].numel()
    return total / count
