"""One decode step, fused (`mambakit.engine.FusedDecoder`) against the reference (`MambaLM.step`), in one
process, interleaved (reference, fused, reference, fused; the faster of each pair of medians), random weights of
the 130m shape by default. The ratio is what to read; absolute times move with the machine's load. A third
column runs the fused step on a second copy of the model (same weights) whose parameters
`mambakit.engine.use_huge_pages` moved into 2 MiB pages, as the `mambakit generate` and `serve` commands do,
interleaved with the other two; without transparent huge pages on this machine it says so and shows "—".

    python benchmarks/decode_step.py                             # 2 threads, batch 1, 2, 4, 8; float32 + bfloat16
    python benchmarks/decode_step.py --threads 1 --batch 1,2
    python benchmarks/decode_step.py --quick                     # a tiny model: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mambakit command sets it (mambakit/cli), before torch

import torch  # noqa: E402

from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.engine import MAX_BATCH, FusedDecoder, hugepages  # noqa: E402


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
          f"fused for batch <= { {str(k)[6:]: v for k, v in MAX_BATCH.items()} } (by dtype)")
    ok, why = hugepages.supported()
    if not ok:
        print(f"# 2 MiB pages: not available ({why})")
    print("| dtype | batch | unfused ms | fused ms | fused, 2 MiB pages ms | unfused ÷ fused | fused ÷ fused in 2 MiB pages |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype in args.dtypes.split(","):
        torch.manual_seed(0)
        model = MambaLM(MambaConfig.from_preset(args.shape)).to(getattr(torch, dtype)).eval()
        torch.manual_seed(0)
        huge = MambaLM(MambaConfig.from_preset(args.shape)).to(getattr(torch, dtype)).eval()
        moved = hugepages.use_huge_pages(huge) if ok else 0
        fused, fused_h = FusedDecoder(model), FusedDecoder(huge)
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

            def cell(k, fmt="{:.1f}"):
                return fmt.format(best[k]) if k in best else "—"
            r1 = f"{best['unfused'] / best['fused']:.2f}×" if "fused" in best else "—"
            r2 = f"{best['fused'] / best['huge']:.2f}×" if "huge" in best else "—"
            print(f"| {dtype} | {b} | {cell('unfused')} | {cell('fused')} | {cell('huge')} | {r1} | {r2} |", flush=True)

if __name__ == "__main__":
    main()
