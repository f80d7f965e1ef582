"""Training checkpoints: one directory per saved step, written whole or not at all, verified before resuming.

    <out_dir>/checkpoints/step_0000500/
        config.json, model.safetensors   the model (save_pretrained layout: loads with MambaLM.from_pretrained)
        mambakit_tokenizer.json, …       the tokenizer (mambakit.tokenizer.load_tokenizer)
        trainer_state.pt                 optimizer, schedule, RNG states, step / data position, elapsed time
        train_config.json                the TrainConfig of the run
        manifest.json                    size and sha256 of every other file, written last

A checkpoint is filled in a temporary directory, the manifest last, and swapped in whole by
mambakit._io.atomic_directory: saving the same step again never leaves a moment without a complete checkpoint.
A directory without a manifest, or whose files do not match it, is refused on resume with a message that says
what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from .._io import atomic_directory

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
        shutil.rmtree(old, ignore_errors=True)
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


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint directory (not yet verified), or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None
