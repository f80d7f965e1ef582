"""One decode step, fused (mambakit/decode_fused.py) against the unfused reference (`MambaLM.step(fused=False)`),
in one process, interleaved (reference, fused, reference, fused; the faster of each pair of medians), random
weights of the 130m shape by default. The ratio is what to read; absolute times move with the machine's load.

    python benchmarks/decode_step.py                             # 2 threads, batch 1, 2, 4, 8; float32 + bfloat16
    python benchmarks/decode_step.py --threads 1 --batch 1,2
    python benchmarks/decode_step.py --quick                     # a tiny model: checks that it runs
"""

from __future__ import annotations

import argparse
import time

import torch

from mambakit import MambaConfig, MambaLM, decode_fused


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="130m", help="a MambaConfig preset")
    p.add_argument("--batch", default="1,2,4,8")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.batch, args.repeats = "tiny", "1,2", 3
    torch.set_num_threads(args.threads)
    print(f"# decode step, shape {args.shape}, {args.threads} thread(s), median of {args.repeats}; "
          f"fused for batch <= {decode_fused.MAX_BATCH}")
    print("| dtype | batch | unfused ms | fused ms | unfused ÷ fused |")
    print("|---|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        model = MambaLM(MambaConfig.from_preset(args.shape)).to(getattr(torch, dtype)).eval()
        for b in map(int, args.batch.split(",")):
            state = model.allocate_state(b)
            ids = torch.randint(0, model.config.vocab_size, (b,))
            fused_ok = decode_fused.applies(model, ids, state)
            best = {False: float("inf"), True: float("inf")}
            for fused in (False, True, False, True):
                if fused and not fused_ok:
                    continue
                for _ in range(3):  # warm-up (the first call compiles or loads the kernels)
                    model.step(ids, state, fused=fused)
                best[fused] = min(best[fused], median_ms(lambda: model.step(ids, state, fused=fused), args.repeats))
            f = f"{best[True]:.1f}" if fused_ok else "—"
            ratio = f"{best[False] / best[True]:.2f}×" if fused_ok else "—"
            print(f"| {dtype} | {b} | {best[False]:.1f} | {f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
