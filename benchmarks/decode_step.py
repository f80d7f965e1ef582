"""One decode step, fused (`mambakit.engine.FusedDecoder`, or `Mamba2Decoder` with --layer Mamba2) against the
reference (`MambaLM.step`), in one process, interleaved (reference, fused, reference, fused; the faster of each
pair of medians), random weights of the 130m shape by default (mamba2-130m for --layer Mamba2). The ratio is what
to read; absolute times move with the machine's load. A third column runs the fused step on a second copy of the
model (same weights) whose parameters `mambakit.engine.use_huge_pages` moved into 2 MiB pages, as the `mambakit
generate` and `serve` commands do, interleaved with the other two; without transparent huge pages on this machine
it says so and shows "—".
The floor: a step reads every weight once, so it takes at least weight bytes / memory bandwidth (bandwidth: bytes
read + written per second by a 256 MB tensor copy, measured in the process before and after each dtype's rows, the
higher of the two); "÷ floor" is the fused step (the faster of its two columns) over it.

    python benchmarks/decode_step.py                             # 2 threads, batch 1, 2, 4, 8; float32 + bfloat16
    python benchmarks/decode_step.py --threads 1 --batch 1,2
    python benchmarks/decode_step.py --quick                     # a tiny model: checks that it runs
    python benchmarks/decode_step.py --layer Mamba2 --batch 1,8  # Mamba-2 (mamba2-130m)
    for t in <other checkout> .; do PYTHONPATH=$t python benchmarks/decode_step.py --layer Mamba2; done  # two trees
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mambakit command sets it (mambakit/cli), before torch

import torch  # noqa: E402

from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.engine import MAX_BATCH, FusedDecoder, Mamba2Decoder, hugepages  # noqa: E402
from generate import copy_bandwidth  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, help="a MambaConfig preset (default 130m, mamba2-130m for Mamba2)")
    p.add_argument("--layer", default="Mamba", choices=("Mamba", "Mamba2"), help="the mixer: Mamba-1 or Mamba-2")
    p.add_argument("--batch", default="1,2,4,8")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.shape is None:
        args.shape = "mamba2-130m" if args.layer == "Mamba2" else "130m"
    if args.quick:
        args.shape, args.batch, args.repeats = ("mamba2-tiny" if args.layer == "Mamba2" else "tiny"), "1,2", 3
    torch.set_num_threads(args.threads)
    import mambakit
    Decoder = Mamba2Decoder if args.layer == "Mamba2" else FusedDecoder
    print(f"# {mambakit.__file__}")
    print(f"# decode step ({Decoder.__name__}), shape {args.shape}, {args.threads} thread(s), "
          f"median of {args.repeats}; "
          f"fused for batch <= { {str(k)[6:]: v for k, v in MAX_BATCH.items()} } (by dtype)")
    ok, why = hugepages.supported()
    if not ok:
        print(f"# 2 MiB pages: not available ({why})")
    print("| dtype | batch | unfused ms | fused ms | fused, 2 MiB pages ms | unfused ÷ fused | fused ÷ fused in 2 MiB pages "
          "| floor ms | fused ÷ floor | fused tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        torch.manual_seed(0)
        model = MambaLM(MambaConfig.from_preset(args.shape)).to(getattr(torch, dtype)).eval()
        torch.manual_seed(0)
        huge = MambaLM(MambaConfig.from_preset(args.shape)).to(getattr(torch, dtype)).eval()
        moved = hugepages.use_huge_pages(huge) if ok else 0
        fused, fused_h = Decoder(model), Decoder(huge)
        weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        bw = copy_bandwidth()
        rows = []
        for b in map(int, args.batch.split(",")):
            state, state_h = model.allocate_state(b), huge.allocate_state(b)
            ids = torch.randint(0, model.config.vocab_size, (b,))
            runs = {"unfused": lambda: model.step(ids, state)}
            if fused.supports(ids, state) is None:
                runs["fused"] = lambda: fused.step(ids, state)
                if moved:
                    runs["huge"] = lambda: fused_h.step(ids, state_h)
            best = {k: float("inf") for k in runs}
            for _ in range(2):
                for k, fn in runs.items():
                    for _ in range(3):  # warm-up (the first call compiles or loads the kernels)
                        fn()
                    best[k] = min(best[k], median_ms(fn, args.repeats))

            rows.append((b, best))
        bw = max(bw, copy_bandwidth())  # the higher of before and after: the stricter floor
        floor = weight_bytes / bw * 1e3
        print(f"# {dtype}: weights {weight_bytes / 1e6:.0f} MB, copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
        for b, best in rows:
            def cell(k, fmt="{:.1f}"):
                return fmt.format(best[k]) if k in best else "—"
            r1 = f"{best['unfused'] / best['fused']:.2f}×" if "fused" in best else "—"
            r2 = f"{best['fused'] / best['huge']:.2f}×" if "huge" in best else "—"
            fast = min(best.get("fused", float("inf")), best.get("huge", float("inf")))
            r3 = f"{fast / floor:.2f}×" if fast < float("inf") else "—"
            tok = f"{b / fast * 1e3:.1f}" if fast < float("inf") else "—"
            print(f"| {dtype} | {b} | {cell('unfused')} | {cell('fused')} | {cell('huge')} | {r1} | {r2} | "
                  f"{floor:.1f} | {r3} | {tok} |", flush=True)

if __name__ == "__main__":
    main()
