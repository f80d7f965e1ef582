"""Fault injection for the trainer's writes: the process is SIGKILLed at every write point of a checkpoint save
(each file opened for writing, fsync, rename, directory swap, unlink, rmdir, torch.save, safetensors' write, ...);
after each kill the newest checkpoint on disk must verify and load, and --resume must continue bitwise as the
uninterrupted run did.

How: a driver process trains to the save at step 6 (checkpoints every 3 steps, one kept, so this save also
rotates the step-3 checkpoint out). There it forks once per write point k, each child in its own copy of the run
directory (a relative out_dir: the child changes its working directory) and SIGKILLs itself just before its k-th
write. A counting run before it lists the points (compiled and cache-loaded kernels agree bitwise,
tests/test_ops_cache.py, so it does not matter which process compiles them).
One more process then trains the reference run and resumes every killed copy."""

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_train import losses, tiny
from mambakit import MambaLM
from mambakit.train import latest_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAVE_AT, MAX_STEPS = 6, 9

DRIVER = textwrap.dedent("""
    import builtins, io, json, os, shutil, signal, sys
    from pathlib import Path

    import safetensors.torch
    import torch

    import mambakit._io as mio
    import mambakit.train.loop as loop
    from mambakit.train import TrainConfig, train

    work, mode, save_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cfg = TrainConfig.from_file(work / "cfg.json")
    points, state = [], {"armed": False, "kill_at": 0}

    def point(name):
        if state["armed"]:
            points.append(name)
            if len(points) == state["kill_at"]:
                os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, attr, name, when=None):
        orig = getattr(owner, attr)

        def wrapper(*a, **k):
            if when is None or when(*a, **k):
                point(name)
            return orig(*a, **k)
        setattr(owner, attr, wrapper)

    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    wrap(builtins, "open", "open for writing", lambda f, mode="r", *a, **k: any(c in mode for c in "wax+"))
    io.open = builtins.open  # pathlib's write_text opens through io.open
    wrap(os, "open", "os.open for writing", lambda p, flags, *a, **k: flags & WRITE)
    for name in ("fsync", "replace", "rename", "rmdir", "unlink", "mkdir", "chmod", "truncate"):
        wrap(os, name, "os." + name)
    wrap(mio, "_exchange", "renameat2 exchange")
    wrap(torch, "save", "torch.save")
    wrap(safetensors.torch, "save_file", "safetensors save_file")

    real_save = loop.save_checkpoint

    def save_checkpoint(root, step, *a, **k):
        if step == save_at and mode == "count":
            state["armed"] = True
        elif step == save_at and mode == "kill":
            statuses = []
            for kill_at in map(int, sys.argv[4].split(",")):  # one child per point, in its own copy of the run
                ws = work / f"k{kill_at:03d}"
                shutil.copytree(Path.cwd() / cfg.out_dir, ws / cfg.out_dir)
                pid = os.fork()
                if pid == 0:
                    os.chdir(ws)
                    state.update(armed=True, kill_at=kill_at)
                    break
                statuses.append(os.waitpid(pid, 0)[1])
            else:
                print(json.dumps({"statuses": statuses}), flush=True)
                os._exit(0)
        return real_save(root, step, *a, **k)

    loop.save_checkpoint = save_checkpoint

    def on_step(step, model):
        if step == save_at and state["armed"]:  # the save, run directory included, is over
            if mode == "count":
                print(json.dumps({"points": points}), flush=True)
            os._exit(0)

    os.chdir(work / "base")
    train(cfg, on_step=on_step)
""")

RESUME = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    from mambakit.train import TrainConfig, train

    work = Path(sys.argv[1])
    cfg = TrainConfig.from_file(work / "cfg.json")
    os.chdir(work / "ref")
    train(cfg)  # the uninterrupted run, in the process (and with the kernels) that resumes the others
    out = {}
    for ws in sorted(work.glob("k[0-9]*")):
        os.chdir(ws)
        try:
            train(cfg.replace(resume=True))
            out[ws.name] = "ok"
        except Exception as e:  # reported per kill point; the test says which failed
            out[ws.name] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)
""")


@pytest.fixture
def corpus(tmp_path_factory):
    """Three short documents (one held out): every resume below ends with a full evaluation, kept small."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    words = "the quick brown fox jumps over a lazy dog while the cat sat on the mat".split()
    for i in range(3):
        (d / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8))
                                                 for _ in range(40 if i == 2 else 150)) + "\n")
    return d


def _run(script, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _weights(run):
    from safetensors.torch import load_file

    return load_file(run / "model.safetensors")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks one child per kill point")
@pytest.mark.parametrize("which", ["first and last of each kind", pytest.param("all", marks=pytest.mark.slow)])
def test_kill_at_write_points_of_a_checkpoint_save(corpus, tmp_path, which):
    """By default the first and the last write point of each kind (about 20 kills); -m slow: every one."""
    work = tmp_path
    for d in ("base", "ref"):
        (work / d).mkdir()
    cfg = tiny(corpus, "run", max_steps=MAX_STEPS, ckpt_every=3, keep_checkpoints=1,
               cache_dir=str(tmp_path / "token-cache"))
    (work / "cfg.json").write_text(json.dumps(cfg.to_dict()))

    points = _run(DRIVER, work, "count", SAVE_AT)["points"]
    # the save must have gone through every kind of write it does, or the kills below test less than they say
    kinds = set(points)
    assert {"torch.save", "safetensors save_file", "os.fsync", "os.rmdir", "os.unlink", "os.replace"} <= kinds, kinds
    assert kinds & {"renameat2 exchange", "os.rename"}, kinds
    (work / "base" / "run").rename(work / "count-run")  # the counting run's own files are not needed

    chosen = list(range(1, len(points) + 1))  # 1-based: kill just before the k-th write
    if which != "all":
        first = {kind: points.index(kind) + 1 for kind in kinds}
        last = {kind: len(points) - points[::-1].index(kind) for kind in kinds}
        chosen = sorted(set(first.values()) | set(last.values()))
    statuses = _run(DRIVER, work, "kill", SAVE_AT, ",".join(map(str, chosen)))["statuses"]
    assert len(statuses) == len(chosen)
    assert all(os.WIFSIGNALED(s) and os.WTERMSIG(s) == 9 for s in statuses), statuses

    # after each kill, before resuming: the newest checkpoint is complete and loads
    resumed_from = {}
    for k in chosen:
        ckpts = work / f"k{k:03d}" / "run" / "checkpoints"
        newest = latest_checkpoint(ckpts)
        verify_checkpoint(newest)
        MambaLM.from_pretrained(newest)
        step_dirs = sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("."))
        assert step_dirs in (["step_0000003"], ["step_0000006"], ["step_0000003", "step_0000006"]), (k, step_dirs)
        for name in step_dirs:  # none half-deleted by the rotation either (the previous one is a fallback)
            verify_checkpoint(ckpts / name)
        resumed_from[k] = newest.name

    results = _run(RESUME, work)
    failed = {k: v for k, v in results.items() if v != "ok"}
    assert not failed, failed
    want_losses, want_weights = losses(work / "ref" / "run"), _weights(work / "ref" / "run")
    bitwise = 0
    for k in chosen:
        run = work / f"k{k:03d}" / "run"
        got = _weights(run)
        same = losses(run) == want_losses and got.keys() == want_weights.keys() and all(
            torch.equal(got[n], want_weights[n]) for n in want_weights)
        bitwise += same
        assert same, f"kill before write {k} ({points[k - 1]}), resumed from {resumed_from[k]}: not bitwise"
        # what the killed save left behind (temporary files and directories) is gone after the resume
        stale = [p.name for d in (run, run / "checkpoints") for p in d.iterdir() if p.name.endswith(".tmp")]
        assert not stale, (k, stale)
    counts = {kind: points.count(kind) for kind in dict.fromkeys(points)}
    print(f"\n{len(points)} write points {counts}; killed at {len(chosen)}, {bitwise} resumed bitwise, from "
          f"{sorted(set(resumed_from.values()))}")
