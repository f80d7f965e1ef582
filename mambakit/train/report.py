"""What a training run shows and keeps: a tqdm bar on stderr, the metrics as JSON lines (always) and TensorBoard
scalars (when asked), and at the end the loss curve as a PNG."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .._io import atomic_write

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_TENSORBOARD_INSTALL = "pip install 'mambakit[tensorboard]'"


# ----------------------------------------------------------------------------------------- progress
class Progress:
    """The training bar on stderr (tqdm: step/total, rate, ETA, then loss and tokens/s). None when not enabled,
    nor when stderr is not a terminal (tqdm's disable=None): logs and pipes get metrics.jsonl instead."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                        disable=None if enabled else True, dynamic_ncols=True)

    @property
    def total(self) -> int:
        return self.bar.total

    @total.setter
    def total(self, n: int) -> None:  # a time budget refits the number of steps as the run goes
        if n != self.bar.total:
            self.bar.total = n
            self.bar.refresh()

    def update(self, step: int, loss: float, tok_s: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}, {tok_s:,.0f} tok/s", refresh=False)
        self.bar.update(step - self.bar.n)

    def print(self, text: str) -> None:
        """Prints a line on stdout without tearing the bar (it is cleared, then drawn again below)."""
        with self._tqdm.external_write_mode(file=sys.stdout):
            print(text, flush=True)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------ metrics
def check_log(log: str) -> None:
    """ImportError naming the extra when `log` asks for TensorBoard and it is not installed."""
    if log != "tensorboard":
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        raise ImportError(f"--log tensorboard needs the tensorboard package: {_TENSORBOARD_INSTALL}") from None


class MetricsLog:
    """The run's metrics, one JSON object a line appended to out_dir/metrics.jsonl, and with
    tensorboard=True every number of each record also as a TensorBoard scalar in out_dir/tensorboard (train/loss,
    train/lr, val/loss, ...) and the samples as text.

    Resuming from a checkpoint at step S keeps the record of one run: what the interrupted run logged after S
    (it is trained again) is dropped, from metrics.jsonl (rewritten atomically; a record a kill left half-written
    at its end goes too: appends are not atomic, every complete record ends with a newline) and from TensorBoard
    (purge_step: events from S + 1 on are hidden)."""

    def __init__(self, out_dir: Path, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(out_dir) / METRICS_FILE
        if resume_step is not None:
            _cut_after(self.path, resume_step)
        self.writer = None
        if tensorboard:
            check_log("tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key in ("step", "final") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self.writer.add_scalar(tag, value, step)
            elif key == "sample" and value:
                self.writer.add_text("sample", value, step)
        self.writer.flush()  # as current as metrics.jsonl: a killed run loses no more than its last record

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _cut_after(path: Path, step: int) -> None:
    """metrics.jsonl without records past `step` and without a half-written last record."""
    if not path.is_file():
        return
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    kept = [line for line in complete.splitlines(keepends=True) if _step_of(line) <= step]
    if len(kept) != complete.count(b"\n") or len(complete) != len(data):
        atomic_write(path, b"".join(kept))


def _step_of(line: bytes) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return -math.inf  # not a record of ours (a note someone added): kept


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
