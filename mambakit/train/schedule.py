"""The learning-rate schedule: a linear warmup, then a cosine decay to a fraction of the peak."""

from __future__ import annotations

import math

from .config import TrainConfig


def warmup_cosine(t: float, *, warmup: float, total: float, min_ratio: float | None = 0.1, peak: float = 1.0,
                  floor: float = 0.0, hold: float = 0.0) -> float:
    """The learning rate at position t of a schedule that ends at `total`.

    t is in any unit: optimizer steps (usually the steps taken once the current one is, step + 1), or the
    fraction of a time budget (total = 1). With start = warmup + hold:

        t <= warmup            peak · t / warmup, but at least peak · floor (a run's first steps still learn)
        warmup < t < start     peak (held)
        start <= t <= total    cosine from peak down to peak · min_ratio
        t > total              peak · min_ratio
        min_ratio=None         peak after the warmup: no decay

    warmup = 0 skips the warmup; an empty decay (total <= start) is at peak until start and at the end after.
    """
    if warmup > 0 and t <= warmup:
        return max(peak * t / warmup, peak * floor)
    start = warmup + hold
    if min_ratio is None or t < start:
        return peak
    span = total - start
    progress = min(1.0, (t - start) / span) if span > 0 else float(t > start)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The trainer's lr for optimizer step `step` (0-based): linear warmup to cfg.lr over warmup_steps, then
    cosine decay to lr · min_lr_ratio at total_steps."""
    # The trainer counts its warmup in steps taken (step + 1) but its cosine from `step`: in positions
    # t = step + 1 that is a decay held back by one step, from warmup_steps + 1 to total_steps + 1.
    return warmup_cosine(step + 1, warmup=cfg.warmup_steps, total=total_steps + 1, hold=1,
                         min_ratio=cfg.min_lr_ratio, peak=cfg.lr)
