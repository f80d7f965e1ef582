"""mambakit._io: atomic files, a set of files replaced as one unit (killed at every write point), readers that
never see half a set, stale temporaries cleaned, crafted journals refused."""

import json
import os
import threading
import time
from pathlib import Path

import pytest

from mambakit import _io
from mambakit._io import JOURNAL, JournalError, atomic_write, clean_stale, read_files, recover, replace_files

OLD = {"config.json": b'{"v": "old"}', "weights.bin": b"old weights" * 100, "tok.json": b"old tokenizer"}
NEW = {"config.json": b'{"v": "new"}', "weights.bin": b"new weights" * 150, "extra.json": b"only new"}
MANAGED = sorted(set(OLD) | set(NEW))
UNRELATED = {"metrics.jsonl": b'{"step": 1}\n', "notes.txt": b"keep me"}


def _fill(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in {**OLD, **UNRELATED}.items():
        (d / name).write_bytes(data)


def _save_new(d: Path) -> None:
    replace_files(d, NEW, remove=[n for n in MANAGED if n not in NEW])


def _through_view(d: Path) -> dict:
    with read_files(d) as view:
        return {n: p.read_bytes() for n in MANAGED if (p := view.path(n)) is not None}


def _plain(d: Path) -> dict:
    return {n: (d / n).read_bytes() for n in MANAGED if (d / n).exists()}


def test_atomic_write_leaves_no_temporary_on_failure(tmp_path):
    atomic_write(tmp_path / "a", b"one")

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a", fail)
    assert os.listdir(tmp_path) == ["a"] and (tmp_path / "a").read_bytes() == b"one"


def test_replace_files_swaps_the_set_and_keeps_other_files(tmp_path):
    _fill(tmp_path)
    _save_new(tmp_path)
    assert _plain(tmp_path) == NEW
    assert {n: (tmp_path / n).read_bytes() for n in UNRELATED} == UNRELATED
    assert sorted(os.listdir(tmp_path)) == sorted([*NEW, *UNRELATED])  # no journal, no temporaries


def test_replace_files_refuses_names_outside_the_directory(tmp_path):
    for bad in ("../x", "a/b", "..", "", JOURNAL):
        with pytest.raises(JournalError, match="not a plain file name"):
            replace_files(tmp_path, {bad: b"x"})
    (tmp_path / "sub").mkdir()
    with pytest.raises(IsADirectoryError, match="sub"):
        replace_files(tmp_path, {"sub": b"x"})


# A "write point" is every call that changes the file system; the kill happens just before the n-th one.
_POINTS = ("fsync", "replace", "rename", "unlink", "rmdir")
_ftruncate = os.ftruncate


class _Killed(BaseException):
    pass


def _instrument(monkeypatch, kill_at: int | None, how: str) -> list:
    calls = []
    for name in _POINTS:
        real = getattr(os, name)

        def wrapper(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            if kill_at is not None and len(calls) == kill_at:
                if _name == "fsync" and how == "exit":
                    try:  # a power cut before fsync may leave the file torn: keep only half of it
                        _ftruncate(a[0], os.fstat(a[0]).st_size // 2)
                    except OSError:
                        pass
                if how == "exit":
                    os._exit(77)  # like SIGKILL: no finally block, no cleanup
                raise _Killed(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(os, name, wrapper)
    return calls


def _run_killed(d: Path, kill_at: int, how: str, monkeypatch) -> None:
    if how == "exit":
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                _instrument(monkeypatch, kill_at, how)
                _save_new(d)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 77)
    else:
        with monkeypatch.context() as m:
            _instrument(m, kill_at, how)
            with pytest.raises(_Killed):
                _save_new(d)


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_killed_at_every_write_point_the_set_is_old_or_new(tmp_path, monkeypatch, how):
    if how == "exit" and not hasattr(os, "fork"):
        pytest.skip("needs fork")
    with monkeypatch.context() as m:
        calls = _instrument(m, None, how)
        _fill(tmp_path / "count")
        calls.clear()
        _save_new(tmp_path / "count")
    n_points = len(calls)
    assert n_points >= 8  # temporaries fsynced, the journal, the renames, the removals: all counted
    outcomes = []
    for k in range(1, n_points + 1):
        d = tmp_path / f"k{k}"
        _fill(d)
        _run_killed(d, k, how, monkeypatch)
        with monkeypatch.context() as m:  # a reader that may not write (a read-only copy): through the journal
            m.setattr(_io, "recover", lambda *a, **kw: False)
            seen = _through_view(d)
        assert seen in (OLD, NEW), (k, seen)
        assert _through_view(d) == seen  # a reader that may write completes the save first: the same set
        assert {n: (d / n).read_bytes() for n in UNRELATED} == UNRELATED
        recover(d)
        assert _plain(d) == seen, k  # after recovery every reader (not only ours) sees the same whole set
        outcomes.append("new" if seen == NEW else "old")
        _save_new(d)  # the next save works and cleans what the killed one left
        assert sorted(os.listdir(d)) == sorted([*NEW, *UNRELATED]), k
    print(f"replace_files, killed by {how}: {n_points} kill points tried, {len(outcomes)} whole "
          f"({outcomes.count('old')} old, {outcomes.count('new')} new)")
    assert "old" in outcomes and "new" in outcomes  # both sides of the commit point were hit


def test_clean_stale_completes_a_committed_save_instead_of_deleting_it(tmp_path, monkeypatch):
    _fill(tmp_path)
    # kill right after the journal's rename (the commit point): find it by counting replaces
    _fill(tmp_path / "c")
    with monkeypatch.context() as m:
        calls = _instrument(m, None, "raise")
        _save_new(tmp_path / "c")
        commit = [i for i, c in enumerate(calls, 1) if c == "replace"][0]  # the journal's rename comes first
    with monkeypatch.context() as m:
        _instrument(m, commit + 1, "raise")
        with pytest.raises(_Killed):
            _save_new(tmp_path)
    assert (tmp_path / JOURNAL).exists() and _plain(tmp_path) != NEW
    removed = clean_stale(tmp_path)
    assert _plain(tmp_path) == NEW and not (tmp_path / JOURNAL).exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")], removed


def test_clean_stale_matches_exact_targets(tmp_path):
    a = tmp_path / ".model.safetensors.abcd1234.tmp"
    b = tmp_path / ".model.safetensors.index.json.abcd1234.tmp"
    a.write_bytes(b"x")
    b.write_bytes(b"y")
    assert clean_stale(tmp_path, name="model.safetensors") == [a]
    assert b.exists()


def _journal(d: Path, replace: dict, remove: list) -> None:
    (d / JOURNAL).write_text(json.dumps({"replace": replace, "remove": remove}))


def test_a_crafted_journal_cannot_touch_files_outside(tmp_path):
    d = tmp_path / "ckpt"
    _fill(d)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    _journal(d, {}, ["../victim.txt"])
    with pytest.raises(JournalError, match="damaged"):
        recover(d)
    with pytest.raises(JournalError, match="damaged"):
        _through_view(d)
    _journal(d, {"../victim.txt": {"tmp": ".x.abcdefgh.tmp", "ino": 1, "bytes": 1}}, [])
    with pytest.raises(JournalError):
        recover(d)
    assert victim.read_text() == "precious" and _plain(d) == OLD
    (d / JOURNAL).write_text("{not json")
    with pytest.raises(JournalError, match="damaged"):
        clean_stale(d)


def test_a_journal_whose_new_file_vanished_is_refused(tmp_path):
    _fill(tmp_path)
    tmp = tmp_path / ".config.json.abcdefgh.tmp"
    tmp.write_bytes(b"{}")
    st = tmp.stat()
    _journal(tmp_path, {"config.json": {"tmp": tmp.name, "ino": st.st_ino, "bytes": st.st_size}}, [])
    tmp.unlink()  # removed by something else: config.json is still the old one, not the committed new one
    with pytest.raises(JournalError, match="neither it nor config.json"):
        recover(tmp_path)
    assert _plain(tmp_path) == OLD  # nothing half-applied


def test_a_reader_never_sees_a_half_applied_set(tmp_path, monkeypatch):
    """A writer's apply phase waits for a reader holding the directory, and the reader sees one whole set."""
    _fill(tmp_path)
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def reader():
        with read_files(tmp_path) as view:
            entered.set()
            release.wait(10)
            seen.update({n: p.read_bytes() for n in MANAGED if (p := view.path(n)) is not None})

    t = threading.Thread(target=reader)
    t.start()
    entered.wait(10)
    done = threading.Event()
    w = threading.Thread(target=lambda: (_save_new(tmp_path), done.set()))
    w.start()
    time.sleep(0.3)
    assert not done.is_set()  # blocked by the reader's shared lock
    release.set()
    t.join(10)
    w.join(10)
    assert done.is_set() and seen == OLD and _plain(tmp_path) == NEW


def test_write_temp_names_are_found_by_clean_stale(tmp_path):
    tmp = _io.write_temp(tmp_path / "a.bin", b"x")
    assert tmp.name.startswith(".a.bin.") and tmp.name.endswith(".tmp")
    assert clean_stale(tmp_path, name="a.bin") == [tmp]
