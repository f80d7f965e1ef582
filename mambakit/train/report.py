"""What a training run shows: a progress line on stderr and, at the end, the loss curve as a PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path


# ----------------------------------------------------------------------------------------- progress
class Progress:
    """One status line on stderr: step, loss, tokens/s, elapsed and ETA (a full line per log when stderr
    is not a terminal)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tok_s: float, elapsed: float, eta: float) -> None:
        if not self.enabled:
            return
        frac = step / max(1, self.total)
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        line = (f"step {step}/{self.total} [{bar}] loss {loss:.4f} | {tok_s:,.0f} tok/s | "
                f"{hms(elapsed)} elapsed, ETA {hms(eta)}")
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def newline(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------- plots
def plot_losses(metrics_path: Path, png: Path) -> Path | None:
    """Training and validation loss against step, from metrics.jsonl (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss curve skipped: matplotlib is not installed (pip install 'mambakit[train]')", flush=True)
        return None
    train_pts, val_pts = {}, {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if "loss" in r:
            train_pts[r["step"]] = r["loss"]  # a resumed run's records replace the killed run's
        if "val_loss" in r:
            val_pts[r["step"]] = r["val_loss"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(train_pts), [train_pts[s] for s in sorted(train_pts)], label="train")
    ax.plot(sorted(val_pts), [val_pts[s] for s in sorted(val_pts)], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
