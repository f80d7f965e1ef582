"""Training checkpoints: one directory per saved step, written whole or not at all, verified before resuming.

    <out_dir>/checkpoints/step_0000500/
        config.json, model.safetensors   the model (save_pretrained layout: loads with MambaLM.from_pretrained)
        mambakit_tokenizer.json, …       the tokenizer (mambakit.tokenizer.load_tokenizer)
        trainer_state.pt                 optimizer, schedule, RNG states, step / data position, elapsed time
        train_config.json                the TrainConfig of the run
        manifest.json                    size and sha256 of every other file, written last

A checkpoint is filled in a temporary directory, the manifest last, and swapped in whole by
mambakit._io.atomic_directory: saving the same step again never leaves a moment without a complete checkpoint.
A checkpoint rotated out is renamed to a temporary name before it is deleted, so a killed deletion never leaves
a partial step directory. A directory without a manifest, or whose files do not match it, is refused on resume
with a message that says what is wrong; so is a trainer state without the keys and types resuming reads
(read_trainer_state, check_optimizer_state). tests/test_train_faults.py kills a save at each of its writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .._io import TMP_SUFFIX, atomic_directory

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"  # the TrainConfig, in the run directory and in each checkpoint
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointCorruptError(ValueError):
    """A training checkpoint that is partial or damaged (missing manifest, missing or altered files)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete-looking checkpoint directories under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def save_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], keep: int) -> Path:
    """write_files(tmp_dir) fills a temporary directory, which becomes root/step_XXXXXXX atomically (replacing
    a checkpoint of the same step, e.g. the final save right after a periodic one); then all but the newest
    `keep` checkpoints are deleted."""
    final = root / step_dir_name(step)
    with atomic_directory(final) as tmp:
        write_files(tmp)
        files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())
                 if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n", encoding="utf-8")
    for _, old in list_checkpoints(root)[:-keep]:
        # renamed out of the step_* names first: a kill during the rmtree leaves a stale .tmp (clean_stale
        # removes it), never a half-deleted step directory that would look like a checkpoint
        doomed = Path(tempfile.mkdtemp(prefix=f".{old.name}.old-", suffix=TMP_SUFFIX, dir=root))
        os.rmdir(doomed)
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory after checking every file against it; raises
    CheckpointCorruptError naming the problem otherwise."""
    def refuse(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"checkpoint {path} is {why}; it cannot be resumed from. Delete this directory to resume from the "
            f"previous checkpoint, or start the run again without --resume")

    mpath = path / MANIFEST
    if not mpath.is_file():
        raise refuse(f"incomplete (no {MANIFEST}: the save was interrupted)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise refuse(f"corrupt ({MANIFEST} does not parse)") from None
    for name in (TRAINER_STATE, "config.json"):
        if name not in files:
            raise refuse(f"incomplete ({MANIFEST} lists no {name})")
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise refuse(f"incomplete ({name} is missing)")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise refuse(f"corrupt ({name} has {size} bytes, the manifest says {want['bytes']})")
        if _sha256(f) != want["sha256"]:
            raise refuse(f"corrupt ({name} does not match its sha256 in the manifest)")
    return manifest


def read_trainer_state(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The trainer state of a verified checkpoint directory, after checking the keys and types that resuming
    reads; raises CheckpointCorruptError naming the file and the problem otherwise."""
    import torch

    f = path / TRAINER_STATE

    def refuse(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{f} {why}: this checkpoint cannot be resumed from. Delete {path} to resume "
                                      f"from the previous checkpoint, or start the run again without --resume")

    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickler can fail in many ways; every one means the same here
        raise refuse(f"does not load ({type(e).__name__}: {e})") from None

    def field(d: Any, key: str, kind, where: str = "") -> Any:
        if not isinstance(d, dict) or key not in d:
            raise refuse(f"has no {where}{key!r}")
        v = d[key]
        if not isinstance(v, kind) or isinstance(v, bool):
            raise refuse(f"has {where}{key!r} of type {type(v).__name__}")
        return v

    step = field(state, "step", int)
    want_step = manifest.get("step")
    dir_step = _STEP_DIR.fullmatch(path.name)
    if step != want_step or (dir_step and int(dir_step.group(1)) != step):
        raise refuse(f"says step {step}, but its manifest says {want_step} and its directory {path.name}")
    elapsed = field(state, "elapsed_s", (int, float))
    if not (math.isfinite(elapsed) and elapsed >= 0):
        raise refuse(f"has elapsed_s {elapsed} (want a finite number >= 0)")
    optim = field(state, "optimizer", dict)
    field(optim, "state", dict, "optimizer ")
    groups = field(optim, "param_groups", list, "optimizer ")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise refuse("has optimizer param_groups without a list of 'params'")
    total = field(field(state, "schedule", dict), "total_steps", int, "schedule ")
    if total < 1:
        raise refuse(f"has schedule total_steps {total} (want >= 1)")
    rng = field(field(state, "rng", dict), "torch", torch.Tensor, "rng ")
    if rng.dtype != torch.uint8 or rng.dim() != 1:
        raise refuse(f"has an rng 'torch' state of dtype {rng.dtype} and {rng.dim()} dimensions (want uint8, 1-D)")
    return state


def check_optimizer_state(optim_sd: dict[str, Any], groups: list[list], path: Path) -> None:
    """Raises CheckpointCorruptError unless the saved optimizer state (torch's format: params as indices, or
    the full format of torch.distributed.checkpoint: params as names) has as many parameters per group as the
    optimizer's `groups` (lists of parameters) and moment tensors of their shapes."""
    f = path / TRAINER_STATE
    saved = [g["params"] for g in optim_sd["param_groups"]]
    if [len(g) for g in saved] != [len(g) for g in groups]:
        raise CheckpointCorruptError(
            f"{f}: the optimizer state has parameter groups of sizes {[len(g) for g in saved]}, the model's "
            f"optimizer has {[len(g) for g in groups]}")
    for keys, params in zip(saved, groups):
        for key, p in zip(keys, params):
            entry = optim_sd["state"].get(key, {})
            if not isinstance(entry, dict):
                raise CheckpointCorruptError(f"{f}: the optimizer state of parameter {key!r} is not a table")
            for name in ("exp_avg", "exp_avg_sq"):
                t = entry.get(name)
                if t is not None and (not hasattr(t, "shape") or tuple(t.shape) != tuple(p.shape)):
                    shape = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
                    raise CheckpointCorruptError(f"{f}: optimizer {name} of parameter {key!r} is {shape}, the "
                                                 f"parameter is {tuple(p.shape)}")


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint directory (not yet verified), or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None
