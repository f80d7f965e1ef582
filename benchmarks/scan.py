"""Selective scan speed and memory: mambakit's fused CPU kernel vs its reference and the peers, in one run.

    python benchmarks/scan.py                 # the issue's table: (b=1, d=1536, n=16) at l = 512 … 32768, b=8 l=2048
    python benchmarks/scan.py --quick         # small shapes, a smoke run
    python benchmarks/scan.py --markdown      # also print the table as markdown (for BENCHMARKS.md)

Implementations (same math: softplus(delta + bias), D skip, SiLU(z) gate):
  fused      mambakit.ops.selective_scan(backend="cpu")
  reference  mambakit.ops.selective_scan(backend="reference")  (sequential PyTorch)
  hf         transformers' `mamba_selective_scan` PyTorch fallback (the slow path: materialises (b, d, l, n)
             Ā and B̄u, then a per-step loop), in its own (b, d, l) layout
  mambapy    mambapy 1.2.0's `MambaBlock.selective_scan` (parallel scan over materialised (b, l, d, n) tensors)
Peers are optional (`pip install -e ".[bench]"`); a missing one is reported, not hidden.

Every measurement runs in a fresh subprocess: the peak RSS over the inputs' baseline is that call's own extra
memory, and one process cannot warm another's caches. Times are medians of --reps runs after one warm-up
(slow peers get fewer runs, bounded by --budget seconds). "upd/s" is b·l·d·n / time. Peers are skipped where
their (b, l, d, n) tensors would not fit in --max-gb, or where one run would exceed the budget (the sequential
paths' backward is quadratic in l: autograd zero-fills a full gradient per indexed step).

The first section times the kernels' first call in a fresh process: with an empty numba cache (compilation)
and with the on-disk cache (what every later process pays).
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

from _rss import reset_peak_rss, rss_kib  # benchmarks/ is on sys.path when a script here runs

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mambakit command sets it (mambakit/cli), before torch

IMPLS = ("fused", "reference", "hf", "mambapy")


# ------------------------------------------------------------------------------ one measurement (subprocess)
def _child(spec: dict) -> dict:
    b, l, d, n, impl, mode = (spec[k] for k in ("b", "l", "d", "n", "impl", "mode"))
    grad = mode == "fwd+bwd"
    # one small call first loads the implementation's libraries (numba's cache, transformers…), so that the
    # memory baseline below holds them and the inputs, and the peak above it is the call's own
    run, inputs = _make(impl, b, min(l, 8), d, n, grad)
    _once(run, inputs, grad)
    del run, inputs
    run, inputs = _make(impl, b, l, d, n, grad)

    base = rss_kib("VmRSS")
    reset_peak_rss()  # the peak below is this call's, not the warm-up's or the imports'
    first = _once(run, inputs, grad)  # the peak-memory run; for the fused kernel also a warm-up (first touch)
    extra_mb = max(0.0, (rss_kib("VmHWM") - base) / 1024)
    # plain-PyTorch paths have nothing to warm up, and their first run may take minutes: it counts
    timed = [] if impl == "fused" else [first]
    t_end = time.perf_counter() + spec["budget"]
    last = first
    while len(timed) < spec["reps"] and time.perf_counter() + last < t_end:
        last = _once(run, inputs, grad)
        timed.append(last)
    timed = timed or [first]
    return {"time": statistics.median(timed), "runs": len(timed), "extra_mb": extra_mb}


def _make(impl: str, b: int, l: int, d: int, n: int, grad: bool):
    """Inputs (S4D-Real A, Δ around softplus(−2)) and a closure computing the scan with `impl`."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    u = torch.randn(b, l, d)
    delta = torch.randn(b, l, d) * 0.5 - 2.0
    z = torch.randn(b, l, d)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B, C = torch.randn(b, l, n), torch.randn(b, l, n)
    D, bias = torch.ones(d), torch.randn(d) * 0.1
    inputs = [u, delta, A, B, C, D, z, bias]

    if impl in ("fused", "reference"):
        from mambakit import ops

        backend = "cpu" if impl == "fused" else "reference"

        def run():
            return ops.selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)

    elif impl == "hf":
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan

        # its layout: u, delta, z (b, d, l); B, C (b, n, l); made outside the timed region
        ut, dt_, zt = (x.transpose(1, 2).contiguous() for x in (u, delta, z))
        Bt, Ct = (x.transpose(1, 2).contiguous() for x in (B, C))
        inputs = [ut, dt_, A, Bt, Ct, D, zt, bias]

        def run():
            return mamba_selective_scan(ut, dt_, A, Bt, Ct, D, zt, bias, True)

    elif impl == "mambapy":
        from mambapy.mamba import MambaBlock

        def run():  # its selective_scan takes Δ after softplus and has no gate: both done here, as in its block
            dt = F.softplus(delta + bias)
            return MambaBlock.selective_scan(None, u, dt, A, B, C, D) * F.silu(z)

    else:
        raise ValueError(f"unknown impl {impl!r}")
    if grad:
        for x in inputs:
            x.requires_grad_()
    return run, inputs


def _once(run, inputs, grad: bool) -> float:
    """Seconds for one forward (no autograd) or forward + backward."""
    import torch

    t = time.perf_counter()
    if grad:
        y = run()
        y.backward(torch.ones_like(y))
        for x in inputs:
            x.grad = None
    else:
        with torch.no_grad():
            run()
    return time.perf_counter() - t


def _measure(spec: dict, env: dict | None = None, timeout: float = 1800) -> dict:
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------- driver
def _compile_times() -> list[tuple[str, float]]:
    """First fused call (forward + backward, small shape) in a fresh process, cold and warm numba cache."""
    code = (
        "import time,torch;t=time.perf_counter();from mambakit import ops;"
        "x=[torch.randn(1,8,16,requires_grad=True) for _ in range(3)];A=-torch.rand(16,4);B=torch.randn(1,8,4);"
        "y=ops.selective_scan(x[0],x[1],A,B,B,None,x[2],None,True,backend='cpu');y.sum().backward();"
        "y=ops.causal_conv1d(x[0],torch.randn(16,4),activation='silu',backend='cpu');y.sum().backward();"
        "print(time.perf_counter()-t)"
    )
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold cache (compiles)", "warm cache (loads)"):
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            rows.append((label, float(out.stdout.strip()) if out.returncode == 0 else float("nan")))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--reps", type=int, default=5, help="timed runs per cell (median reported)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timed runs per cell, at most")
    p.add_argument("--max-gb", type=float, default=12.0, help="skip peers whose (b,l,d,n) tensors exceed this")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    d, n = (256, 16) if args.quick else (1536, 16)
    shapes = [(1, 512), (1, 2048)] if args.quick else [(1, 512), (1, 2048), (1, 8192), (1, 32768), (8, 2048)]
    impls = [i for i in args.impls.split(",") if i]
    import torch

    print(f"# selective scan, d={d}, n={n}, float32, {torch.get_num_threads()} threads, medians of ≤{args.reps} runs")
    for label, secs in _compile_times():
        print(f"first fused call (scan + conv, fwd + bwd) in a fresh process, {label}: {secs:.2f} s")

    rows = []
    header = f"{'b':>2} {'l':>6} {'impl':>9} | {'fwd ms':>9} {'G upd/s':>8} {'fwd MB':>8} | {'fwd+bwd ms':>10} {'fwd+bwd MB':>10} | {'fused ×':>8}"
    print(header)
    print("-" * len(header))
    for b, l in shapes:
        fused = {}
        state_gb = b * l * d * n * 4 / 2**30
        for impl in impls:
            row = {"b": b, "l": l, "impl": impl}
            for mode in ("fwd", "fwd+bwd"):
                # the peers hold ~3 (b,l,d,n) tensors in forward, ~8 with autograd; the reference ~2 with autograd
                mult = {"fused": 0, "reference": 0 if mode == "fwd" else 2, "hf": 3, "mambapy": 4}[impl]
                if mode == "fwd+bwd" and impl in ("hf", "mambapy"):
                    mult *= 2.5
                seq_bwd_too_long = impl == "hf" and mode == "fwd+bwd" and b * l > 512  # quadratic: minutes
                if mult * state_gb > args.max_gb or seq_bwd_too_long:
                    row[mode] = {"error": "skipped"}
                    continue
                spec = dict(b=b, l=l, d=d, n=n, impl=impl, mode=mode, reps=args.reps, budget=args.budget)
                if impl in ("hf", "reference", "mambapy"):
                    spec["reps"] = min(args.reps, 3)
                row[mode] = _measure(spec)
            if impl == "fused":
                fused = row
            rows.append(row)

            def cell(mode, key, fmt):
                r = row[mode]
                return fmt(r[key]) if "error" not in r else r["error"][:9]

            ratio = ""
            if impl != "fused" and fused:
                rs = [
                    row[m]["time"] / fused[m]["time"]
                    for m in ("fwd", "fwd+bwd")
                    if "time" in row[m] and "time" in fused.get(m, {})
                ]
                ratio = "/".join(f"{r:.0f}" for r in rs)
            print(
                f"{b:>2} {l:>6} {impl:>9} | {cell('fwd', 'time', lambda t: f'{t*1e3:.1f}'):>9} "
                f"{cell('fwd', 'time', lambda t: f'{b*l*d*n/t/1e9:.2f}'):>8} {cell('fwd', 'extra_mb', lambda m: f'{m:.0f}'):>8} | "
                f"{cell('fwd+bwd', 'time', lambda t: f'{t*1e3:.1f}'):>10} {cell('fwd+bwd', 'extra_mb', lambda m: f'{m:.0f}'):>10} | {ratio:>8}",
                flush=True,
            )
        print(f"{'':>2} {'':>6} {'':>9}   one (b,l,d,n) float32 tensor: {state_gb*1024:.0f} MB")
    if args.markdown:
        print("\n| b | l | impl | fwd ms | fwd G upd/s | fwd extra MB | fwd+bwd ms | fwd+bwd extra MB | time / fused (fwd, fwd+bwd) |")
        print("|---|---|---|---|---|---|---|---|---|")
        fused = {}
        for r in rows:
            fused = r if r["impl"] == "fused" else fused
            f, fb = r["fwd"], r["fwd+bwd"]
            cells = [
                f"{f['time'] * 1e3:.1f}" if "time" in f else f["error"],
                f"{r['b'] * r['l'] * d * n / f['time'] / 1e9:.2f}" if "time" in f else "",
                f"{f['extra_mb']:.0f}" if "time" in f else "",
                f"{fb['time'] * 1e3:.1f}" if "time" in fb else fb["error"],
                f"{fb['extra_mb']:.0f}" if "time" in fb else "",
                " / ".join(
                    f"{r[m]['time'] / fused[m]['time']:.1f}×" if "time" in r[m] and "time" in fused[m] else "—"
                    for m in ("fwd", "fwd+bwd")
                ),
            ]
            print(f"| {r['b']} | {r['l']} | {r['impl']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
