"""Experiment 4: forward time and peak memory against sequence length, l = 2^10 … 2^20: a small Mamba
(linear in l) vs a Transformer of the same size (attention: quadratic time), on one log-log plot.

The paper's efficiency claims (§3.3, §4.5, Fig. 8 left): the selective scan is linear in l and beats
FlashAttention-2 beyond 2K tokens; Mamba processes million-token sequences. Here the whole models run on
this CPU, batch 1, inference (no autograd), logits for the last position only (the LM head is the same
per-token cost for both):
    mamba          MambaLM, the whole sequence in one call (the fused numba scan)
    mamba-chunked  MambaLM in calls of --chunk tokens with the state carried (`forward(..., state=...)`,
                   the same output): memory stays flat, which a Transformer cannot do (its KV cache grows)
    transformer    TransformerLM (Transformer++: rotary, SwiGLU, RMSNorm), one call,
                   F.scaled_dot_product_attention with is_causal (flash-style kernel: memory linear in l,
                   time quadratic)
Sizes: --size mini = Mamba `mini` (4 × 128, 0.5 M params) vs Transformer `mini` (2 × 128).

Every (model, l) cell runs in a fresh subprocess (peak memory is its own high-water RSS). A series stops
before a cell whose projection exceeds --mem-cap-gib (projected as 2× the previous cell's peak) or
--time-cap-s (projected as 2× the previous time for Mamba, 4× for the Transformer).

    python benchmarks/length_scaling.py            # l = 2^10 … 2^20, ≈ 10–15 min on an idle CPU
    python benchmarks/length_scaling.py --quick    # l = 2^8 … 2^10, tiny models (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _rss, when imported as a module (tests)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mambakit, when run as a script from anywhere
from _rss import reset_peak_rss, rss_kib  # noqa: E402

GIB = 2**30
OUT_DIR = Path(__file__).resolve().parents[1] / "experiments" / "length_scaling"
SERIES = ("mamba", "mamba-chunked", "transformer")
SIZES = {"mini": ("mini", "mini"), "small": ("small", "small"), "tiny": ("tiny", "tiny")}  # Mamba, Transformer


def build(series: str, size: str, length: int):
    import torch

    from mambakit import MambaConfig, MambaLM
    from mambakit.baselines.transformer import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    if series.startswith("mamba"):
        return MambaLM(MambaConfig.from_preset(SIZES[size][0])).eval()
    return TransformerLM(TransformerConfig.from_preset(SIZES[size][1], max_seq_len=length)).eval()


def forward(model, series: str, ids, chunk: int) -> None:
    """One pass over ids (1, l); only the last position's logits are computed."""
    if series != "mamba-chunked":
        model(ids, num_last_tokens=1)
        return
    state = None
    for s in range(0, ids.shape[1], chunk):
        state = model(ids[:, s:s + chunk], state=state, return_state=True, num_last_tokens=1).state


def cell(series: str, size: str, length: int, chunk: int, min_time_s: float = 1.0) -> dict:
    """Times the forward over a random sequence of `length` tokens (median of repeats until min_time_s
    or 3 runs) and the peak resident memory of this process during it (weights included)."""
    import torch

    model = build(series, size, length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
    with torch.inference_mode():
        forward(model, series, ids[:, : min(length, 256)], chunk)  # warm-up: kernels compiled / loaded
        exact = reset_peak_rss()
        times = []
        while len(times) < 3 and (not times or sum(times) < min_time_s):
            t0 = time.perf_counter()
            forward(model, series, ids, chunk)
            times.append(time.perf_counter() - t0)
        hwm = rss_kib("VmHWM")
    t = statistics.median(times)
    return dict(series=series, length=length, seconds=t, tokens_per_s=length / t, runs=len(times),
                peak_gib=hwm / 2**20 if exact and hwm else float("nan"), params=model.num_parameters(),
                threads=torch.get_num_threads())


def run_cell(args, series: str, length: int) -> dict:
    if args.in_process:
        return cell(series, args.size, length, args.chunk)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MALLOC_MMAP_THRESHOLD_": "131072"}
    if args.threads:
        env["LS_THREADS"] = str(args.threads)
    cmd = [sys.executable, __file__, "--worker", series, args.size, str(length), str(args.chunk)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.cell_timeout)
    except subprocess.TimeoutExpired:
        return dict(series=series, length=length, error=f"timeout > {args.cell_timeout:.0f} s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(series=series, length=length, error=err[:200])
    return json.loads(lines[-1])


def fit_slope(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(key) against log(l) over the longer half of the cells (the asymptote)."""
    import math

    pts = [(math.log(r["length"]), math.log(r[key])) for r in rows if r.get(key, 0) > 0]
    pts = pts[len(pts) // 2:]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("the plot needs matplotlib: pip install mambakit[plot]") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"mamba": ("tab:blue", "o-"), "mamba-chunked": ("tab:cyan", "s--"), "transformer": ("tab:red", "o-")}
    for s in SERIES:
        rows = [r for r in results["cells"] if r["series"] == s and "error" not in r]
        if not rows:
            continue
        color, fmt = style[s]
        label = results["labels"][s]
        ax1.plot([r["length"] for r in rows], [r["seconds"] for r in rows], fmt, color=color, label=label)
        ax2.plot([r["length"] for r in rows], [r["peak_gib"] for r in rows], fmt, color=color, label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length l")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax1.set_ylabel("forward time (s), batch 1")
    ax2.set_ylabel("peak resident memory (GiB)")
    ax1.set_title("time: linear (Mamba) vs quadratic (attention)", fontsize=9)
    ax2.set_title("memory (weights and runtime included)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, l = 2^8 … 2^10, in-process")
    p.add_argument("--size", choices=SIZES, default="mini")
    p.add_argument("--min-log2", type=int, default=10)
    p.add_argument("--max-log2", type=int, default=20)
    p.add_argument("--chunk", type=int, default=2**16, help="tokens per call for mamba-chunked")
    p.add_argument("--series", default=",".join(SERIES), help=f"comma-separated subset of {','.join(SERIES)}")
    p.add_argument("--mem-cap-gib", type=float, default=8.0, help="skip cells projected past this peak memory")
    p.add_argument("--time-cap-s", type=float, default=120.0, help="skip cells projected past this forward time")
    p.add_argument("--cell-timeout", type=float, default=900.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--in-process", action="store_true", help="cells in this process (peaks then overlap)")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch

        if os.environ.get("LS_THREADS"):
            torch.set_num_threads(int(os.environ["LS_THREADS"]))
        series, size, length, chunk = args.worker
        print(json.dumps(cell(series, size, int(length), int(chunk))))
        return 0
    if args.quick:
        args.size, args.min_log2, args.max_log2, args.chunk, args.in_process = "tiny", 8, 10, 256, True
    series = [s for s in args.series.split(",") if s]
    if not series or set(series) - set(SERIES):
        p.error(f"--series takes a subset of {','.join(SERIES)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    labels = {"mamba": f"Mamba {SIZES[args.size][0]} (one call)",
              "mamba-chunked": f"Mamba {SIZES[args.size][0]} (chunks of {args.chunk}, state carried)",
              "transformer": f"Transformer++ {SIZES[args.size][1]} (one call, SDPA causal)"}
    results = dict(size=args.size, chunk=args.chunk, labels=labels, cells=[], skipped=[], cpus=os.cpu_count(),
                   mem_cap_gib=args.mem_cap_gib, time_cap_s=args.time_cap_s, load_average_start=os.getloadavg()[0],
                   command=" ".join(["python benchmarks/length_scaling.py", *(argv if argv is not None
                                                                             else sys.argv[1:])]))
    print(f"# forward time and peak memory vs length, batch 1, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| l | " + " | ".join(f"{labels[s]} s | GiB" for s in series) + " |")
    print("|---:|" + "---:|---:|" * len(series))
    start = time.perf_counter()
    last: dict[str, dict] = {}
    stopped: set[str] = set()
    for e in range(args.min_log2, args.max_log2 + 1):
        length = 2**e
        cols = []
        for s in series:
            prev = last.get(s)
            why = "stopped" if s in stopped else None
            if why is None and prev is not None:
                growth = 4 if s == "transformer" else 2
                if 2 * prev["peak_gib"] > args.mem_cap_gib and s != "mamba-chunked":
                    why = f"projected {2 * prev['peak_gib']:.1f} GiB > {args.mem_cap_gib:g}"
                elif growth * prev["seconds"] > args.time_cap_s:
                    why = f"projected {growth * prev['seconds']:.0f} s > {args.time_cap_s:g} s"
            if why:
                if s not in stopped:
                    results["skipped"].append(dict(series=s, length=length, reason=why))
                    stopped.add(s)
                cols.append(f"— | ({why})" if why != "stopped" else "— | —")
                continue
            r = run_cell(args, s, length)
            results["cells"].append(r)
            if "error" in r:
                stopped.add(s)
                cols.append(f"error | {r['error'][:60]}")
                continue
            last[s] = r
            cols.append(f"{r['seconds']:.3f} | {r['peak_gib']:.2f}")
        print(f"| 2^{e} | " + " | ".join(cols) + " |", flush=True)
    slopes = {s: {"time": fit_slope([r for r in results["cells"] if r["series"] == s and "error" not in r],
                                    "seconds")} for s in series}
    results.update(slopes=slopes, wall_s=time.perf_counter() - start, load_average_end=os.getloadavg()[0])
    for s in series:
        v = slopes[s]["time"]
        print(f"# {labels[s]}: time ∝ l^{v:.2f} over the longer half of its lengths" if v is not None else
              f"# {labels[s]}: too few cells for a slope")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, args.out / "results.json")
    plot(results, args.out / "length_scaling.png")
    print(f"# wrote {args.out / 'results.json'} and {args.out / 'length_scaling.png'} ({results['wall_s'] / 60:.1f} min)")
    return 0 if not any("error" in r for r in results["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
