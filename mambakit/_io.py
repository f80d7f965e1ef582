"""The one atomic write of mambakit: a file, or a whole directory, appears complete or not at all.

    atomic_write(path, data)         bytes, str, or a function that writes a given temporary path
    with atomic_directory(path) as tmp:  fill tmp; on success it replaces `path` as a whole

Both write beside the target (same file system, so the final rename is atomic), fsync the data before the rename
and the parent directory after it, and remove their temporary files when the write fails. Temporary names start
with "." and end in ".tmp", so `clean_stale` can find what a killed process left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Union

Data = Union[bytes, str, Callable[[Path], None]]
TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def atomic_write(path: str | os.PathLike, data: Data) -> None:
    """Writes `data` to `path` atomically: readers see the old file or the whole new one, never part of it.

    data: bytes, str (written as UTF-8), or write(tmp_path), a function that writes the file at tmp_path (for
    writers that take a path: safetensors, torch.save, savefig). The parent directory is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # the mode a plain open() would give (mkstemp makes it 0600)
        if callable(data):
            os.close(fd)
            fd = -1
            data(Path(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with os.fdopen(fd, "wb") as f:
                fd = -1
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


_RENAME_EXCHANGE = 2  # renameat2 flag (Linux ≥ 3.15): swap two paths in one step
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the paths a and b atomically where the kernel and libc can (Linux renameat2); False elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path`; when the block ends without an exception, it replaces
    `path` as a whole (files of the old directory that the new one lacks do not survive). Where the platform can
    swap two paths atomically (Linux), there is no moment without a complete directory at `path`; elsewhere the
    old one is moved aside first and a crash between the two renames leaves it as `.<name>.old-*.tmp`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", suffix=TMP_SUFFIX, dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # the mode a plain mkdir would give (mkdtemp makes it 0700)
        yield tmp
        _fsync_tree(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif path.is_dir() and _exchange(tmp, path):
            shutil.rmtree(tmp)  # tmp now holds the old directory
        else:
            if not path.is_dir():
                raise NotADirectoryError(f"{path} exists and is not a directory")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", suffix=TMP_SUFFIX, dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Removes the temporary files and directories that a killed `atomic_write` / `atomic_directory` left in
    `directory` (of the target `name` only, if given); returns what it removed. Call it only where no other
    process is writing into `directory` at the same time."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)):
            continue
        if name is not None and not p.name.startswith(f".{name}."):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
