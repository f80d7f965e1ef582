"""The SSD scan (Mamba-2) on CPU: `ops.ssd` forward (inference: the fused intra-chunk kernel) and forward +
backward (training: autograd through the chunked torch path), by block length, against transformers' torch
chunked scan (`mamba2_chunk_scan`, what Mamba2ForCausalLM runs on a CPU) and the projections of the same layer (the
matmul floor the scan adds to).

Shapes are one Mamba-2 layer's: h = 2·d_model / 64 heads of p = 64, n = 128, one group. The CPU path blocks by at
most `CPU_BLOCK` tokens (`CPU_INFERENCE_BLOCK` for inference) whatever chunk_size asks for; --blocks overrides
those caps to compare block lengths.

    python benchmarks/ssd.py                                  # 130m layer shape, b 1, l 1024 and 4096; fp32 + bf16
    python benchmarks/ssd.py --d-model 256 --batch 8 --lengths 512 --dtypes float32   # the train_step.py shape
    python benchmarks/ssd.py --quick
    python benchmarks/ssd.py --forward-only --blocks 32,64,128,256    # inference by block length

Times are the median of --repeats runs, interleaved across implementations (round-robin), in one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--blocks", default="64,128,256", help="block lengths of the mambakit rows (the CPU cap lifted)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--forward-only", action="store_true", help="time inference only (no forward + backward)")
    p.add_argument("--quick", action="store_true", help="d_model 64, l 128, 2 repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.lengths, args.repeats, args.blocks = 64, "128", 2, "32,64"

    import torch
    import torch.nn.functional as F

    from mambakit import ops
    from mambakit.ops.cpu import ssd as cpu_ssd

    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    except ImportError:
        mamba2_chunk_scan = None

    d = args.d_model
    h, pd, n = 2 * d // 64 if d >= 64 else 2, 64 if d >= 64 else d, 128
    blocks = [int(s) for s in args.blocks.split(",")]
    print(f"# SSD on CPU: d_model {d} (h {h} × p {pd}, n {n}, 1 group), batch {args.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} (interleaved)")
    print("| dtype | length | implementation | forward ms | forward + backward ms | vs projections (fwd) |")
    print("|---|---:|---|---:|---:|---:|")
    for dtype in [getattr(torch, s) for s in args.dtypes.split(",")]:
        for l in [int(s) for s in args.lengths.split(",")]:
            g = torch.Generator().manual_seed(0)
            b = args.batch
            x = torch.randn(b, l, h, pd, generator=g).to(dtype)
            z = torch.randn(b, l, h, pd, generator=g).to(dtype)
            B = torch.randn(b, l, 1, n, generator=g).to(dtype)
            C = torch.randn(b, l, 1, n, generator=g).to(dtype)
            dt = torch.randn(b, l, h, generator=g) - 2
            A = -torch.rand(h, generator=g) * 8 - 1
            D, dtb = torch.randn(h, generator=g), torch.randn(h, generator=g)
            u = torch.randn(b * l, d, generator=g).to(dtype)
            w_in = torch.randn(2 * 2 * d + 2 * n + h, d, generator=g).to(dtype)
            w_out = torch.randn(d, 2 * d, generator=g).to(dtype)
            y2 = torch.randn(b * l, 2 * d, generator=g).to(dtype)

            def proj():
                F.linear(u, w_in)
                F.linear(y2, w_out)

            def mk(block):
                def fwd():
                    ops.ssd(x, dt, A, B, C, chunk_size=block, D=D, z=z, dt_bias=dtb, dt_softplus=True,
                            return_final_states=True)

                def train():
                    leaves = [t.detach().requires_grad_() for t in (x, dt, B, C)]
                    y = ops.ssd(leaves[0], leaves[1], A, leaves[2], leaves[3], chunk_size=block, D=D, z=z,
                                dt_bias=dtb, dt_softplus=True)
                    y.float().sum().backward()

                return fwd, (None if args.forward_only else train)

            cases = {f"mambakit, block {q}": mk(q) for q in blocks}
            if mamba2_chunk_scan is not None:
                def hf_fwd():
                    mamba2_chunk_scan(x, dt, A, B, C, 256, D=D, z=z, dt_bias=dtb, dt_softplus=True)

                def hf_train():
                    leaves = [t.detach().requires_grad_() for t in (x, dt, B, C)]
                    y = mamba2_chunk_scan(leaves[0], leaves[1], A, leaves[2], leaves[3], 256, D=D, z=z,
                                          dt_bias=dtb, dt_softplus=True)
                    y.float().sum().backward()

                cases["transformers mamba2_chunk_scan, chunk 256"] = (hf_fwd, None if args.forward_only else hf_train)
            cases["projections (in_proj + out_proj)"] = (proj, None)
            times = {k: ([], []) for k in cases}
            cap = cpu_ssd.CPU_BLOCK, cpu_ssd.CPU_INFERENCE_BLOCK
            cpu_ssd.CPU_BLOCK = cpu_ssd.CPU_INFERENCE_BLOCK = 1 << 30  # lift the caps: the rows compare block lengths
            try:
                for name, (fwd, train) in cases.items():  # warm-up: compilation, allocator
                    with torch.inference_mode():
                        fwd()
                    if train is not None:
                        train()
                for _ in range(args.repeats):
                    for name, (fwd, train) in cases.items():
                        with torch.inference_mode():
                            t = time.perf_counter()
                            fwd()
                            times[name][0].append(time.perf_counter() - t)
                        if train is not None:
                            t = time.perf_counter()
                            train()
                            times[name][1].append(time.perf_counter() - t)
            finally:
                cpu_ssd.CPU_BLOCK, cpu_ssd.CPU_INFERENCE_BLOCK = cap
            floor = statistics.median(times["projections (in_proj + out_proj)"][0])
            for name, (f, t) in times.items():
                fm = statistics.median(f)
                tm = f"{statistics.median(t) * 1e3:,.1f}" if t else ""
                print(f"| {str(dtype)[6:]} | {l} | {name} | {fm * 1e3:,.1f} | {tm} | {fm / floor:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
