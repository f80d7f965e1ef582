"""The one atomic write of mambakit: a file, a set of files, or a whole directory appears complete or not at all.

    atomic_write(path, data)             bytes, str, or a function that writes a given temporary path
    replace_files(directory, files, remove=())   several files of a directory replaced as one unit; others kept
    with read_files(directory) as view:  view.path(name): where a reader finds a file of such a set
    with atomic_directory(path) as tmp:  fill tmp; on success it replaces `path` as a whole
    clean_stale(directory)               finishes a committed replace_files, removes what killed writes left

All write beside the target (same file system, so the final rename is atomic), fsync the data before the rename
and the parent directory after it, and remove their temporary files when the write fails. Temporary names start
with "." and end in ".tmp", so `clean_stale` can find what a killed process left behind.

replace_files is for a directory that also holds files it must not touch (a training run directory: the
model's config and weights next to checkpoints/ and metrics.jsonl): swapping the whole directory would move
those too. It writes every new file under a temporary name, then commits with one atomic rename of a journal
(JOURNAL: which temporary becomes which name, which names go), then applies the renames and deletes the journal.
A process killed before the commit leaves the old files; after it, the journal names the whole new set, which
`read_files` resolves for readers and `recover` (run by the next replace_files, clean_stale, or a reader that
can) completes. Writers and readers of one directory take a flock on it (exclusive / shared), so a reader
never sees half of an apply and two writers never interleave.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Union

Data = Union[bytes, str, Callable[[Path], None]]
TMP_SUFFIX = ".tmp"
# ".<target>.<8 random>.tmp" (mkstemp) or ".<target>.new-<8>.tmp" / ".old-" (atomic_directory): group 1 = target
_TMP_NAME = re.compile(r"\.(.+)\.(?:new-|old-)?[a-z0-9_]{8}\.tmp")


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


def write_temp(path: str | os.PathLike, data: Data) -> Path:
    """Writes `data` to a new temporary file beside `path` (".<name>.<random>.tmp"), fsynced; returns its path.
    The caller renames it into place (or removes it); on failure nothing is left behind."""
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
    except BaseException:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(path: str | os.PathLike, data: Data) -> None:
    """Writes `data` to `path` atomically: readers see the old file or the whole new one, never part of it.

    data: bytes, str (written as UTF-8), or write(tmp_path), a function that writes the file at tmp_path (for
    writers that take a path: safetensors, torch.save, savefig). The parent directory is created if missing."""
    path = Path(path)
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


# ------------------------------------------------------------------------------- a set of files as a unit
JOURNAL = ".replace-journal.json"  # no ".tmp" suffix: clean_stale must never delete a committed journal


class JournalError(OSError):
    """A replace journal that cannot be completed (damaged, or its files were removed by something else)."""


def _check_name(directory: Path, name: str) -> None:
    # Names come from callers and from a journal on disk: only plain names inside the directory, so that a
    # crafted journal cannot rename or delete anything elsewhere.
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or name == JOURNAL):
        raise JournalError(f"{directory}: {name!r} is not a plain file name in this directory")


@contextlib.contextmanager
def _locked(directory: Path, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
    """flock on the directory itself (no lock file to leave behind); yields False when blocking=False and
    another process holds it. Where flock is unavailable (Windows, some network file systems) no lock is
    taken and it yields True: the journal still makes a killed writer safe, only concurrent ones are not."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield True
        return
    try:
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            yield False
            return
        except OSError:  # the file system has no flock
            pass
        yield True
    finally:
        os.close(fd)  # releases the lock


def _read_journal(directory: Path) -> dict | None:
    path = directory / JOURNAL
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the reader
            raise JournalError(f"{path} is not a regular file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise JournalError(f"{path} cannot be read: {e}") from None
    try:
        j = json.loads(text)
        replace, remove = j["replace"], j["remove"]
        if not isinstance(replace, dict) or not isinstance(remove, list):
            raise TypeError
        for name, entry in replace.items():
            _check_name(directory, name)
            tmp = entry["tmp"]
            _check_name(directory, tmp)
            if not (tmp.startswith(f".{name}.") and tmp.endswith(TMP_SUFFIX)):
                raise TypeError
            if not all(isinstance(entry[k], int) and not isinstance(entry[k], bool) for k in ("ino", "bytes")):
                raise TypeError
        for name in remove:
            _check_name(directory, name)
    except (ValueError, KeyError, TypeError, JournalError):
        raise JournalError(f"{path} is damaged: an interrupted save cannot be completed from it. Delete it "
                           "(the directory then holds what the interrupted save had applied so far)") from None
    return j


def _resolve(directory: Path, journal: dict, name: str) -> Path | None:
    """Where the file `name` of a committed but not yet applied journal is: its temporary, or already renamed."""
    if name in journal["remove"] and name not in journal["replace"]:
        return None
    entry = journal["replace"].get(name)
    if entry is None:
        return directory / name
    tmp = directory / entry["tmp"]
    for p in (tmp, directory / name):  # rename keeps the inode: the renamed file is recognised by it
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        if st.st_ino == entry["ino"] and st.st_size == entry["bytes"]:
            return p
    raise JournalError(f"{directory / JOURNAL} names {entry['tmp']} as the new {name}, but neither it nor {name} "
                       "is that file any more (removed by another program?); the interrupted save cannot be "
                       "completed")


def _apply(directory: Path, journal: dict) -> None:
    # Resolve everything first: a journal that cannot be completed changes nothing.
    sources = {name: _resolve(directory, journal, name) for name in journal["replace"]}
    for name, src in sources.items():
        if src != directory / name:
            os.replace(src, directory / name)
    for name in journal["remove"]:
        if name not in journal["replace"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / name)
    _fsync_dir(directory)
    os.unlink(directory / JOURNAL)
    _fsync_dir(directory)


def recover(directory: str | os.PathLike, blocking: bool = True) -> bool:
    """Completes a replace_files that was committed and then interrupted (its journal is still there); returns
    whether one was. blocking=False: does nothing (returns False) while another process holds the directory."""
    directory = Path(directory)
    if not (directory / JOURNAL).exists():
        return False
    with _locked(directory, exclusive=True, blocking=blocking) as got:
        if not got:
            return False
        journal = _read_journal(directory)
        if journal is None:
            return False
        _apply(directory, journal)
        return True


def replace_files(directory: str | os.PathLike, files: Mapping[str, Data], remove: Iterable[str] = ()) -> None:
    """Replaces the files `files` ({name: data}, data as for atomic_write) of `directory` and deletes the
    names in `remove`, as one unit: a reader (through read_files), or the directory after a crash and
    `recover`, has either all the old files or all the new ones. Other files of the directory are not touched.
    Temporary files that a killed earlier call left for these names are removed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove = sorted(set(remove) - set(files))
    for name in (*files, *remove):
        _check_name(directory, name)
        if (directory / name).is_dir() and not (directory / name).is_symlink():
            raise IsADirectoryError(f"cannot write {directory / name}: a directory of that name is in the way")
    with _locked(directory, exclusive=True):
        journal = _read_journal(directory)
        if journal is not None:  # a killed writer's committed set: finish it, so that ours replaces a whole one
            _apply(directory, journal)
        clean_stale(directory, names=(*files, *remove, JOURNAL), _recover=False)
        temps: dict[str, Path] = {}
        jtmp, committed = None, False
        try:
            for name, data in files.items():
                temps[name] = write_temp(directory / name, data)
            entries = {}
            for name, tmp in temps.items():
                st = os.stat(tmp)
                entries[name] = {"tmp": tmp.name, "ino": st.st_ino, "bytes": st.st_size}
            _fsync_dir(directory)  # the temporaries' names are durable before the journal refers to them
            jtmp = write_temp(directory / JOURNAL, json.dumps({"replace": entries, "remove": remove}, indent=1))
            os.replace(jtmp, directory / JOURNAL)  # the commit point
            committed = True
            _fsync_dir(directory)
        except BaseException:
            if not committed:  # before the commit point the old set stands: drop every new file
                for tmp in [*temps.values(), *([jtmp] if jtmp else [])]:
                    tmp.unlink(missing_ok=True)
            raise
        _apply(directory, _read_journal(directory))


class FileView:
    """What read_files yields: path(name) is where the current version of `name` is (None: it does not exist)."""

    def __init__(self, directory: Path, journal: dict | None):
        self.directory, self._journal = directory, journal

    def path(self, name: str) -> Path | None:
        if self._journal is not None and (name in self._journal["replace"] or name in self._journal["remove"]):
            return _resolve(self.directory, self._journal, name)
        p = self.directory / name
        return p if os.path.lexists(p) else None


@contextlib.contextmanager
def read_files(directory: str | os.PathLike) -> Iterator[FileView]:
    """For reading a set of files that replace_files writes: while the block runs no writer changes them (a
    shared flock), and a save that was committed but interrupted is completed first where this process may
    write, else read through its journal (a read-only directory still loads, whole)."""
    directory = Path(directory)
    if (directory / JOURNAL).exists():
        with contextlib.suppress(OSError):  # read-only directory, or a writer is at work: read through the journal
            recover(directory, blocking=False)
    with _locked(directory, exclusive=False):
        yield FileView(directory, _read_journal(directory))


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


def clean_stale(directory: str | os.PathLike, name: str | None = None, names: Iterable[str] | None = None,
                _recover: bool = True) -> list[Path]:
    """Removes the temporary files and directories that a killed `atomic_write` / `atomic_directory` /
    `replace_files` left in `directory` (of the target `name`, or of the targets `names`, only, if given); returns
    what it removed. A replace_files that was committed before it was killed is completed first, so that its
    temporaries, which are the new files, are renamed into place rather than deleted. Call it only where no
    other process is writing into `directory` at the same time."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    if _recover:
        recover(directory)
    wanted = None if name is None and names is None else {name} if names is None else set(names)
    removed = []
    for p in directory.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)):
            continue
        if wanted is not None:
            # the exact target: a prefix test would take ".model.safetensors.index.json.x.tmp" for a temporary
            # of model.safetensors
            m = _TMP_NAME.fullmatch(p.name)
            if m is None or m.group(1) not in wanted:
                continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed
