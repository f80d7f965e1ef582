"""The CPU kernels of two git revisions side by side: the same calls timed in one process per tree and sample,
the trees alternated round by round (so a change of the machine's speed hits both), medians and per-round
ratios. For questions like "what did switching fast-math off cost" (docs/kernels.md), where only the tree
differs.

    python benchmarks/revisions.py --old d143336~1 --new 2a8078f       # before and after fast-math went off
    python benchmarks/revisions.py --old HEAD~3 --new . --rounds 3      # "." = the working tree as it is
    python benchmarks/revisions.py --old HEAD --new . --quick           # tiny shapes: checks that it runs
    python benchmarks/revisions.py --old d143336~1 --new HEAD --compile # + compile seconds on an empty cache

Each tree is exported (`git archive`) into a temporary directory and imported from there (PYTHONPATH), with its
own numba cache directory, warmed by a first untimed process; a sample is the median of --repeats calls after
one warm-up call. The calls use only API both trees have: `ops.selective_scan` and `ops.causal_conv1d` (forward;
forward + backward) and `engine.FusedDecoder.step` of a random 130m model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ITEMS = ("scan_fwd", "scan_fwd_bwd", "conv_fwd_bwd", "decode_b1", "decode_b8")
LABELS = {"scan_fwd": "scan forward (no grad)", "scan_fwd_bwd": "scan forward + backward",
          "conv_fwd_bwd": "conv forward + backward", "decode_b1": "fused decode step, batch 1",
          "decode_b8": "fused decode step, batch 8"}


def worker(items: list[str], repeats: int, quick: bool) -> dict[str, float]:
    """Runs inside a tree's process: {item: median ms}."""
    import torch

    from mambakit import MambaConfig, MambaLM, ops
    from mambakit.engine import FusedDecoder

    torch.manual_seed(0)
    b, l, d, n = (1, 128, 64, 16) if quick else (1, 2048, 1536, 16)  # (batch, length, channels, states)
    u, delta, z = (torch.randn(b, l, d) for _ in range(3))
    A = -torch.rand(d, n) - 0.5
    B, C = torch.randn(b, l, n), torch.randn(b, l, n)
    D, bias = torch.randn(d), torch.randn(d)
    w, wb = torch.randn(d, 4), torch.randn(d)

    def scan(grad: bool):
        leaves = [t.clone().requires_grad_(grad) for t in (u, delta, A, B, C, D, z, bias)]
        out = ops.selective_scan(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], D=leaves[5], z=leaves[6],
                                 delta_bias=leaves[7], delta_softplus=True)
        if grad:
            out.sum().backward()

    def conv():
        x, weight, cb = (t.clone().requires_grad_(True) for t in (u, w, wb))
        ops.causal_conv1d(x, weight, cb, activation="silu").sum().backward()

    decoders = {}

    def decode(batch: int):
        if "model" not in decoders:
            torch.manual_seed(0)
            decoders["model"] = MambaLM(MambaConfig.from_preset("tiny" if quick else "130m")).eval()
            decoders["dec"] = FusedDecoder(decoders["model"])
        model, dec = decoders["model"], decoders["dec"]
        key = f"state{batch}"
        if key not in decoders:
            decoders[key] = model.allocate_state(batch)
        ids = torch.zeros(batch, dtype=torch.long)
        with torch.no_grad():
            dec.step(ids, decoders[key])

    calls = {"scan_fwd": lambda: _nograd(lambda: scan(False)), "scan_fwd_bwd": lambda: scan(True),
             "conv_fwd_bwd": conv, "decode_b1": lambda: decode(1), "decode_b8": lambda: decode(8)}
    out = {}
    for item in items:
        fn = calls[item]
        fn()  # warm-up (and compilation, on an empty cache)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[item] = statistics.median(times) * 1e3
    return out


def _nograd(fn):
    import torch

    with torch.no_grad():
        return fn()


def export(rev: str, into: Path) -> Path:
    """The tree of `rev` ("." = the working tree) as a directory to import mambakit from."""
    if rev == ".":
        return ROOT
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "mambakit"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_tree(tree: Path, cache: Path, items, repeats, threads, quick) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "NUMBA_CACHE_DIR": str(cache), "OMP_NUM_THREADS": str(threads),
           "NUMBA_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", ",".join(items), "--repeats", str(repeats)] + (["--quick"] if quick else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if p.returncode != 0:
        raise SystemExit(f"worker in {tree} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=False, help="git revision of the baseline tree")
    p.add_argument("--new", default=".", help='git revision of the tree to compare ("." = the working tree)')
    p.add_argument("--items", default=",".join(ITEMS), help=f"comma-separated subset of {','.join(ITEMS)}")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also time each tree's first call on an empty cache")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 round: checks that it runs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    items = (args.worker or args.items).split(",")
    unknown = [i for i in items if i not in ITEMS]
    if unknown:
        p.error(f"--items: unknown {unknown}; choose from {list(ITEMS)}")
    if args.worker:
        print(json.dumps(worker(items, args.repeats, args.quick)))
        return
    if not args.old:
        p.error("--old is required")
    for name in ("rounds", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be ≥ 1")
    if args.quick:
        args.rounds, args.repeats = 1, 2
    with tempfile.TemporaryDirectory(prefix="mambakit-revisions-") as tmp:
        tmp = Path(tmp)
        trees = {"old": export(args.old, tmp / "old"), "new": export(args.new, tmp / "new")}
        caches = {k: tmp / f"cache-{k}" for k in trees}
        if args.compile:
            compile_s = {}
            for k in trees:
                t = time.perf_counter()
                run_tree(trees[k], caches[k], items, 1, args.threads, args.quick)
                compile_s[k] = time.perf_counter() - t
        else:
            for k in trees:  # fills each tree's cache: the timed processes load their kernels
                run_tree(trees[k], caches[k], items, 1, args.threads, args.quick)
        samples = {k: [] for k in trees}
        for r in range(args.rounds):
            for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                samples[k].append(run_tree(trees[k], caches[k], items, args.repeats, args.threads, args.quick))
                print(f"# round {r + 1}/{args.rounds} {k}: " + ", ".join(f"{i} {samples[k][-1][i]:.1f}" for i in items),
                      file=sys.stderr, flush=True)
    print(f"# old = {args.old}, new = {args.new}; {args.rounds} rounds, {args.threads} thread(s), each sample the "
          f"median of {args.repeats} calls in a fresh process; {'tiny shapes' if args.quick else 'scan/conv (1, 2048, 1536, 16), w = 4; the 130m decode step'}")
    print("| | old ms (median / min) | new ms (median / min) | new ÷ old, median of the rounds |")
    print("|---|---:|---:|---:|")
    for i in items:
        old, new = [s[i] for s in samples["old"]], [s[i] for s in samples["new"]]
        ratio = statistics.median(n / o for n, o in zip(new, old))
        print(f"| {LABELS[i]} | {statistics.median(old):.1f} / {min(old):.1f} | {statistics.median(new):.1f} / "
              f"{min(new):.1f} | {ratio:.2f} |")
    if args.compile:
        print(f"\nFirst process on an empty cache (compile + one call of each item), seconds: old "
              f"{compile_s['old']:.1f}, new {compile_s['new']:.1f}")


if __name__ == "__main__":
    main()
