"""GPU check and speed of the Triton kernels (backend="triton"), in one run on a CUDA machine.

1. Correctness on large shapes: the Triton scan (forward, final state, every gradient), conv and decoding
   steps against the reference ops on the same GPU.
2. The selective scan at equal length l, in the paper's scan benchmark setting (§4.5, Figure 8 left: batch 1,
   D = 1024, N = 16, bf16; the op as the Mamba block calls it: D skip, SiLU(z) gate, Δ bias and softplus):
       triton fwd / fwd+bwd      backend="triton"
       floor                     bytes the forward must move (u, Δ, z, B, C in; y out) / copy bandwidth,
                                 the bandwidth measured here as bytes read + written per second by a copy
       ratio                     triton fwd / floor (target: ≤ 2 at l ≥ 4096)
       ref fwd / fwd+bwd         the reference scan in PyTorch (sequential over time), up to --ref-max-len
       sdpa fwd / fwd+bwd        F.scaled_dot_product_attention, causal, bf16, D/64 heads of 64, same b and l
       vs sdpa                   sdpa fwd / triton fwd (the paper: faster than FlashAttention-2 beyond 2K)
3. The 130m model (random weights; the released shape): prefill tokens/s (triton and reference ops) and
   generation tokens/s (greedy, MambaLM.step with in-place state).
4. SSD, the Mamba-2 scan (ssd_benchmarks; --skip-ssd leaves it out), at mamba2-130m's mixer shape (--ssd-shape
   b,h,p,g,n = 1,24,64,1,128, chunk 256, D, z gate, dt bias + softplus, bf16):
       check                     triton vs ssd_ref (the sequential twin) at --ssd-check-shape with g > 1,
                                 D per channel, z, initial states and packed sequences: y, final states, every
                                 gradient; the decoding step vs ssd_state_update_ref
       triton fwd / fwd+bwd      backend="triton"
       chunked fwd / fwd+bwd     the chunked torch path (ops/cpu/ssd.py, GEMMs in torch) on the GPU
       ref fwd / fwd+bwd         ssd_ref, sequential over time, up to --ref-max-len (fwd+bwd up to 2048)
       official fwd / fwd+bwd    mamba_ssm's mamba_chunk_scan_combined, when mamba_ssm is importable
       hf fwd / fwd+bwd          transformers' mamba2_chunk_scan (its torch path), when importable
   and the decoding step at batch 1 and 8: triton, ssd_state_update_ref, and mamba_ssm's
   selective_state_update (A, dt, D broadcast per channel as Mamba2.step passes them) when importable.

    python benchmarks/gpu.py                           # everything, about 2-4 minutes on an H100/H200 before
                                                       # the SSD part was added (its time: not measured yet)
    python benchmarks/gpu.py --skip-ssd                # the Mamba-1 kernels only
    python benchmarks/gpu.py --lengths 1024,4096 --skip-model
    python benchmarks/gpu.py --skip-check --skip-model --lengths 1 --ssd-lengths 1024,4096   # SSD rows mainly
    python benchmarks/gpu.py --sweep                   # also times alternative tile sizes at one length
    python benchmarks/gpu.py --json out.json           # results as JSON too
    python benchmarks/gpu.py --dry-run                 # tiny shapes on CPU under Triton's interpreter:
                                                       # checks this script runs (timings meaningless)
    python benchmarks/gpu.py --compile-only            # no GPU needed: compiles every kernel for sm_90
                                                       # with Triton's ptxas; registers and spills

On a machine without CUDA (and without --dry-run) it says so and exits with status 0. On a GPU machine whose
python3 has torch and triton but not mambakit, run it from the checkout's root as it is: it puts the checkout
on sys.path (mambakit also needs numba, safetensors and tokenizers there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

try:
    import mambakit  # noqa: F401
except ImportError:  # run from a checkout without installing it (e.g. a GPU machine's own python3)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="sequence lengths for the scan table")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d", type=int, default=1024, help="channels (the paper's D)")
    p.add_argument("--n", type=int, default=16, help="state size N")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ref-max-len", type=int, default=4096, help="time the reference scan up to this length")
    p.add_argument("--check-shape", default="2,4096,1536,16", help="b,l,d,n of the correctness check")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--model-batch", default="1,8", help="batch sizes for prefill and generation")
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--sweep", action="store_true", help="time alternative tile sizes (scan fwd and bwd)")
    p.add_argument("--sweep-len", type=int, default=4096)
    p.add_argument("--sweep-batch", default="1,8", help="batch sizes the sweep times each tile at")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of repeats per timing (after warmup)")
    p.add_argument("--model-preset", default="130m")
    p.add_argument("--skip-ssd", action="store_true", help="leave out the SSD (Mamba-2) checks and tables")
    p.add_argument("--ssd-lengths", default="1024,2048,4096,8192,16384", help="sequence lengths for the SSD table")
    p.add_argument("--ssd-shape", default="1,24,64,1,128", help="b,h,p,g,n of the SSD table (mamba2-130m)")
    p.add_argument("--ssd-chunk", type=int, default=256)
    p.add_argument("--ssd-check-shape", default="2,512,8,64,2,64", help="b,l,h,p,g,n of the SSD check")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU with TRITON_INTERPRET=1")
    p.add_argument("--compile-only", action="store_true", help="compile the kernels for --arch, no GPU needed")
    p.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (90: H100/H200)")
    p.add_argument("--compile-dtypes", default="bfloat16,float32")
    args = p.parse_args(argv)
    if args.dry_run:
        args.lengths, args.d, args.n, args.ref_max_len, args.check_shape = "16,32", 16, 4, 32, "2,20,12,4"
        args.model_batch, args.prefill_len, args.gen_tokens, args.model_preset = "1,2", 8, 3, "tiny"
        args.sweep_len, args.sweep_batch, args.min_time = 16, "1,2", 0.01
        args.ssd_lengths, args.ssd_shape, args.ssd_chunk, args.ssd_check_shape = "20,40", "1,2,4,1,4", 16, "2,20,4,4,2,4"
    return args


DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- timing
def bench(fn, min_time: float, max_reps: int = 100) -> float:
    """Median milliseconds of fn() over repeats filling about min_time seconds (one warmup call first)."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - t0
    reps = max(1, min(max_reps, int(min_time / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(min_time: float) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << (28 if DEVICE == "cuda" else 22), dtype=torch.float32, device=DEVICE).fill_(1.0)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), min_time)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


# ------------------------------------------------------------------------------------------- the inputs
def scan_inputs(b, l, d, n, dtype, seed=0, requires_grad=False):
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*s, generator=g, device=DEVICE) * scale + shift).to(dt)

    x = dict(
        u=r(b, l, d), delta=r(b, l, d, scale=0.5, shift=-1.0), A=-torch.exp(r(d, n, scale=0.5, dt=torch.float32)),
        B=r(b, l, n), C=r(b, l, n), D=r(d, dt=torch.float32), z=r(b, l, d),
        delta_bias=r(d, scale=0.3, dt=torch.float32), initial_state=r(b, d, n, dt=torch.float32),
    )  # fmt: skip
    if requires_grad:
        for v in x.values():
            v.requires_grad_()
    return x


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1.0)).item()


# ------------------------------------------------------------------------------------------- 1. checks
def check_correctness(shape, dtype_name) -> list[tuple[str, float, float]]:
    """(what, relative error, tolerance) for the scan, conv and steps: triton vs reference."""
    from mambakit import ops

    b, l, d, n = shape
    rows = []
    dtypes = [(torch.float32, 1e-4, 1e-3)]  # (dtype, tolerance of y, of the gradients)
    if dtype_name != "float32":
        dtypes.append((getattr(torch, dtype_name), 2e-2, 5e-2))
    for dtype, tol_y, tol_g in dtypes:
        x = scan_inputs(b, l, d, n, dtype, requires_grad=True)
        outs = {}
        for backend in ("triton", "reference"):
            y, h = ops.selective_scan(**x, delta_softplus=True, return_final_state=True, backend=backend)
            g = torch.Generator(device=DEVICE).manual_seed(1)
            gy = torch.randn(y.shape, generator=g, device=DEVICE)
            gh = torch.randn(h.shape, generator=g, device=DEVICE)
            loss = (y.float() * gy).sum() + (h * gh).sum()
            grads = torch.autograd.grad(loss, list(x.values()))
            outs[backend] = (y.detach(), h.detach(), dict(zip(x, grads)))
            sync()
        (y1, h1, g1), (y2, h2, g2) = outs["triton"], outs["reference"]
        name = str(dtype).replace("torch.", "")
        rows.append((f"scan {name} y", rel_err(y1, y2), tol_y))
        rows.append((f"scan {name} final state", rel_err(h1, h2), 1e-4))
        rows.append((f"scan {name} grads (worst of 9)", max(rel_err(g1[k], g2[k]) for k in g2), tol_g))
        del outs, x
    # conv, bf16 and float32
    xc = torch.randn(b, l, d, device=DEVICE, requires_grad=True)
    wc = torch.randn(d, 4, device=DEVICE, requires_grad=True)
    bc = torch.randn(d, device=DEVICE, requires_grad=True)
    ic = torch.randn(b, d, 3, device=DEVICE, requires_grad=True)
    res = {}
    for backend in ("triton", "reference"):
        y, fin = ops.causal_conv1d(xc, wc, bc, ic, return_final_state=True, activation="silu", backend=backend)
        gy = torch.randn(y.shape, generator=torch.Generator(device=DEVICE).manual_seed(2), device=DEVICE)
        res[backend] = (y.detach(), torch.autograd.grad((y * gy).sum() + fin.sum(), [xc, wc, bc, ic]))
    rows.append(("conv float32 y", rel_err(res["triton"][0], res["reference"][0]), 1e-5))
    rows.append(("conv float32 grads", max(rel_err(a, b) for a, b in zip(res["triton"][1], res["reference"][1])), 1e-4))
    # decoding steps
    x = scan_inputs(b, 4, d, n, torch.float32)
    s1, s2 = x["initial_state"].clone(), x["initial_state"].clone()
    errs = []
    for t in range(4):
        step = {k: x[k][:, t] for k in ("u", "delta", "B", "C", "z")}
        common = dict(A=x["A"], D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True)
        y1 = ops.selective_state_update(s1, **step, **common, backend="triton")
        y2 = ops.selective_state_update(s2, **step, **common, backend="reference")
        errs += [rel_err(y1, y2), rel_err(s1, s2)]
    rows.append(("state update y, state", max(errs), 1e-5))
    cs1 = torch.randn(b, d, 3, device=DEVICE)
    cs2 = cs1.clone()
    xs = torch.randn(b, d, device=DEVICE)
    y1 = ops.causal_conv1d_update(cs1, xs, wc.detach(), bc.detach(), "silu", backend="triton")
    y2 = ops.causal_conv1d_update(cs2, xs, wc.detach(), bc.detach(), "silu", backend="reference")
    rows.append(("conv update y, state", max(rel_err(y1, y2), rel_err(cs1, cs2)), 1e-5))
    return rows


# --------------------------------------------------------------------------------------------- 2. scan
def scan_bytes(b, l, d, n, itemsize) -> int:
    """Bytes the forward must move at least: u, Δ, z, B, C read; y written (A, D, bias, states: negligible)."""
    return (4 * b * l * d + 2 * b * l * n) * itemsize


def time_scan(b, l, d, n, dtype, backend, min_time, grad: bool) -> float:
    from mambakit import ops

    x = scan_inputs(b, l, d, n, dtype, requires_grad=grad)
    kw = dict(delta_softplus=True, backend=backend)
    if not grad:
        def fwd():
            with torch.no_grad():
                ops.selective_scan(**x, **kw)

        return bench(fwd, min_time)
    dy = torch.randn(b, l, d, device=DEVICE, dtype=dtype)
    leaves = list(x.values())

    def fwd_bwd():
        y = ops.selective_scan(**x, **kw)
        torch.autograd.grad(y, leaves, dy)

    return bench(fwd_bwd, min_time)


def time_sdpa(b, l, d, dtype, min_time, grad: bool) -> float:
    heads = max(1, d // 64)
    q, k, v = (torch.randn(b, heads, l, 64, device=DEVICE, dtype=dtype, requires_grad=grad) for _ in range(3))
    if not grad:
        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return bench(fwd, min_time)
    do = torch.randn(b, heads, l, 64, device=DEVICE, dtype=dtype)

    def fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(o, (q, k, v), do)

    return bench(fwd_bwd, min_time)


def sweep(args, dtype):
    """Forward and forward+backward times for alternative (BLOCK_T, FWD_D, BWD_D, warps), at each batch size of
    --sweep-batch: few channels per program fill the GPU at batch 1, more read fuller sectors at larger batches."""
    from mambakit.ops.triton import scan as scan_triton

    l, d, n = args.sweep_len, args.d, args.n
    batches = [int(s) for s in args.sweep_batch.split(",")]
    print(f"\ntile sweep at l={l} d={d} n={n} {args.dtype}, milliseconds; defaults:")
    for b in batches:
        print(f"  b={b}: {scan_triton.scan_config(b, l, d, n)}")
    cols = "".join(f" {f'fwd b={b}':>10} {f'f+b b={b}':>10}" for b in batches)
    print(f"{'BLOCK_T':>8} {'FWD_D':>6} {'BWD_D':>6} {'warps':>6}{cols}")
    results = []
    # (BLOCK_T, FWD_D, warps); BWD_D = FWD_D / 2. Each new tile compiles its kernels. The defaults (64, 2, 4) and
    # (8, 16, 4) spread time over warps / keep it in threads; with 1-2 warps and few channels the scan along
    # time stays inside each thread (no shared memory), at the price of fewer threads per program.
    for bt, bd, warps in ((64, 2, 4), (8, 16, 4), (16, 2, 1), (32, 2, 1), (32, 4, 2), (16, 8, 4), (128, 2, 4),
                          (16, 16, 4), (32, 16, 8), (64, 4, 8)):  # fmt: skip
        scan_triton.TILES.clear()
        scan_triton.TILES.update(BLOCK_T=bt, FWD_D=bd, BWD_D=max(1, bd // 2), FWD_WARPS=warps, BWD_WARPS=warps)
        row = dict(BLOCK_T=bt, FWD_D=bd, BWD_D=max(1, bd // 2), warps=warps)
        try:
            for b in batches:
                row[f"fwd_ms_b{b}"] = time_scan(b, l, d, n, dtype, "triton", args.min_time / 2, grad=False)
                row[f"fwd_bwd_ms_b{b}"] = time_scan(b, l, d, n, dtype, "triton", args.min_time / 2, grad=True)
        except Exception as e:  # a tile that does not compile (registers, shared memory): skip it
            print(f"{bt:>8} {bd:>6} {max(1, bd // 2):>6} {warps:>6}  failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        results.append(row)
        times = "".join(f" {row[f'fwd_ms_b{b}']:>10.3f} {row[f'fwd_bwd_ms_b{b}']:>10.3f}" for b in batches)
        print(f"{bt:>8} {bd:>6} {max(1, bd // 2):>6} {warps:>6}{times}")
        sys.stdout.flush()
    scan_triton.TILES.clear()
    for b in batches:
        if results:
            best_f = min(results, key=lambda r: r[f"fwd_ms_b{b}"])
            best_fb = min(results, key=lambda r: r[f"fwd_bwd_ms_b{b}"])
            def name(r):
                return f"BLOCK_T={r['BLOCK_T']} FWD_D={r['FWD_D']} BWD_D={r['BWD_D']} warps={r['warps']}"

            print(f"b={b}: best forward {name(best_f)} ({best_f[f'fwd_ms_b{b}']:.3f} ms), "
                  f"best forward+backward {name(best_fb)} ({best_fb[f'fwd_bwd_ms_b{b}']:.3f} ms)")  # fmt: skip
    return results


# -------------------------------------------------------------------------------------------- 3. model
def model_speed(args, dtype) -> list[dict]:
    """130m (random weights): prefill tokens/s with the triton and reference ops, greedy generation tokens/s."""
    import mambakit.ops as ops_mod
    from mambakit import MambaConfig, MambaLM

    torch.manual_seed(0)
    model = MambaLM(MambaConfig.from_preset(args.model_preset)).to(DEVICE, dtype).eval()
    vocab = model.config.vocab_size
    rows = []
    for b in (int(s) for s in args.model_batch.split(",")):
        ids = torch.randint(0, vocab, (b, args.prefill_len), device=DEVICE)
        row = dict(batch=b, prefill_len=args.prefill_len)
        for name in ("triton", "reference"):
            if name == "reference" and b * args.prefill_len > 4096:  # sequential over time: minutes per call
                continue
            saved = ops_mod._triton_available
            if name == "reference":
                ops_mod._triton_available = lambda: False
            try:
                with torch.no_grad():
                    ms = bench(lambda: model(ids, num_last_tokens=1), args.min_time, max_reps=20)
            finally:
                ops_mod._triton_available = saved
            row[f"prefill_tok_s_{name}"] = b * args.prefill_len / (ms / 1e3)
        # generation: prefill a short prompt, then greedy steps with the in-place state
        with torch.no_grad():
            out = model(ids[:, :16], return_state=True, num_last_tokens=1)
            state = out.state
            tok = out.logits[:, -1].argmax(-1)
            for _ in range(3):  # warmup (kernel compilation)
                model.step(tok, state)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.gen_tokens):
                tok = model.step(tok, state).argmax(-1)
            sync()
            sec = time.perf_counter() - t0
        row["gen_tok_s"] = b * args.gen_tokens / sec
        row["ms_per_step"] = 1e3 * sec / args.gen_tokens
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------- 4. SSD (Mamba-2)
def ssd_inputs(b, l, h, p, g, n, dtype, seed=0, D_per_channel=False, requires_grad=False):
    """Inputs in a Mamba-2 layer's ranges (A, D, dt_bias, initial states float32, as in the model)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*s, generator=gen, device=DEVICE) * scale + shift).to(dt)

    f32 = torch.float32
    x = dict(
        x=r(b, l, h, p), dt=r(b, l, h, scale=0.5, shift=-1.0), A=-torch.exp(r(h, scale=0.5, shift=0.5, dt=f32)),
        B=r(b, l, g, n), C=r(b, l, g, n), D=r(*((h, p) if D_per_channel else (h,)), dt=f32), z=r(b, l, h, p),
        dt_bias=r(h, scale=0.3, dt=f32).abs(), initial_states=r(b, h, p, n, dt=f32),
    )  # fmt: skip
    if requires_grad:
        for v in x.values():
            v.requires_grad_()
    return x


def _official_ssd():
    """mamba_ssm's combined SSD op and its decoding step, or (None, None) where mamba_ssm is not importable."""
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # not installed, or built for another torch / CUDA
        return None, None
    return mamba_chunk_scan_combined, selective_state_update


def _hf_ssd():
    """transformers' mamba2_chunk_scan (its torch path; no z gate: the model gates outside it), or None."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub kernel downloads from a benchmark
    try:
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    except Exception:
        return None
    return mamba2_chunk_scan


def check_ssd(shape, dtype_name) -> list[tuple[str, float, float]]:
    """(what, relative error, tolerance): triton SSD vs ssd_ref with g > 1, D per channel, z, initial states
    and three packed sequences (one cut inside a chunk, one on a chunk edge); the step vs its twin."""
    from mambakit import ops

    b, l, h, p, g, n = shape
    Q = max(16, l // 4)
    seq = torch.zeros(b, l, dtype=torch.int32, device=DEVICE)
    seq[:, l // 3:] = 1
    seq[:, 2 * Q:] = 2
    rows = []
    dtypes = [(torch.float32, 1e-4, 1e-3)]
    if dtype_name != "float32":
        dtypes.append((getattr(torch, dtype_name), 2e-2, 5e-2))
    for dtype, tol_y, tol_g in dtypes:
        x = ssd_inputs(b, l, h, p, g, n, dtype, D_per_channel=True, requires_grad=True)
        outs = {}
        for backend in ("triton", "reference"):
            y, s = ops.ssd(**x, chunk_size=Q, dt_softplus=True, seq_idx=seq, return_final_states=True, backend=backend)
            gen = torch.Generator(device=DEVICE).manual_seed(1)
            loss = (y.float() * torch.randn(y.shape, generator=gen, device=DEVICE)).sum()
            loss = loss + (s * torch.randn(s.shape, generator=gen, device=DEVICE)).sum()
            outs[backend] = (y.detach(), s.detach(), dict(zip(x, torch.autograd.grad(loss, list(x.values())))))
            sync()
        (y1, s1, g1), (y2, s2, g2) = outs["triton"], outs["reference"]
        name = str(dtype).replace("torch.", "")
        rows.append((f"ssd {name} y", rel_err(y1, y2), tol_y))
        rows.append((f"ssd {name} final states", rel_err(s1, s2), 1e-4 if dtype == torch.float32 else tol_y))
        worst = max(g2, key=lambda k: rel_err(g1[k], g2[k]))
        rows.append((f"ssd {name} grads (worst of 9: d{worst})", rel_err(g1[worst], g2[worst]), tol_g))
        del outs, x
    x = ssd_inputs(b, 4, h, p, g, n, torch.float32, D_per_channel=True)
    s1, s2 = x["initial_states"].clone(), x["initial_states"].clone()
    errs = []
    common = dict(A=x["A"], D=x["D"], dt_bias=x["dt_bias"], dt_softplus=True)
    for t in range(4):
        step = {k: x[k][:, t] for k in ("x", "dt", "B", "C", "z")}
        y1 = ops.ssd_state_update(s1, **step, **common, backend="triton")
        y2 = ops.ssd_state_update(s2, **step, **common, backend="reference")
        errs += [rel_err(y1, y2), rel_err(s1, s2)]
    rows.append(("ssd step y, state", max(errs), 1e-5))
    return rows


def time_ssd(fn, x, grad: bool, min_time: float) -> float:
    """Milliseconds of fn(**x) (forward, or forward + backward to every input)."""
    if not grad:
        def fwd():
            with torch.no_grad():
                fn(**x)

        return bench(fwd, min_time)
    leaves = [v for v in x.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    y = fn(**x)
    dy = torch.randn_like(y)

    def fwd_bwd():
        torch.autograd.grad(fn(**x), leaves, dy, allow_unused=True)  # hf's row takes no z

    return bench(fwd_bwd, min_time)


def ssd_benchmarks(args, dtype) -> dict:
    """The SSD table (triton, the chunked torch path, the reference, mamba_ssm, transformers) and the decoding
    step at batch 1 and 8, milliseconds."""
    from functools import partial

    from mambakit import ops
    from mambakit.ops.cpu.ssd import ssd_cpu  # the chunked torch path: plain torch, runs on the GPU too

    b, h, p, g, n = (int(v) for v in args.ssd_shape.split(","))
    Q = args.ssd_chunk
    official, official_step = _official_ssd()
    hf = _hf_ssd()
    kw = dict(chunk_size=Q, dt_softplus=True)
    impls = {
        "triton": partial(ops.ssd, backend="triton", **kw),
        "chunked": lambda **x: ssd_cpu(**{**dict(D=None, z=None, dt_bias=None, initial_states=None), **x}, **kw),
        "ref": partial(ops.ssd, backend="reference", **kw),
    }
    if official is not None:
        impls["official"] = partial(official, **kw)
    if hf is not None:  # no z argument: the gate is left out of its row
        impls["hf"] = lambda z=None, **x: hf(x.pop("x"), x.pop("dt"), x.pop("A"), x.pop("B"), x.pop("C"), Q,
                                             dt_softplus=True, **x)  # fmt: skip
    print(f"\nSSD (Mamba-2 scan), b={b} h={h} p={p} g={g} n={n} chunk={Q} {args.dtype} (D, z gate, dt bias + "
          f"softplus), milliseconds; not importable: "
          f"{', '.join(k for k, v in (('mamba_ssm', official), ('transformers', hf)) if v is None) or 'none'}")
    names = list(impls)
    print(f"{'l':>6} " + " ".join(f"{k + ' fwd':>12} {k + ' f+b':>12}" for k in names))
    table = []
    for l in (int(v) for v in args.ssd_lengths.split(",")):
        row = dict(l=l)
        for name, fn in impls.items():
            if name == "ref" and l > args.ref_max_len:
                continue
            for grad in (False, True):
                if name == "ref" and grad and l > 2048:
                    continue
                x = ssd_inputs(b, l, h, p, g, n, dtype, requires_grad=grad)
                x.pop("initial_states")
                try:
                    row[f"{name}_{'fwd_bwd' if grad else 'fwd'}"] = time_ssd(fn, x, grad, args.min_time)
                except torch.OutOfMemoryError:
                    pass
                del x
        table.append(row)

        def f(key):
            v = row.get(key)
            return f"{v:>12.3f}" if v is not None else f"{'-':>12}"

        print(f"{l:>6} " + " ".join(f"{f(k + '_fwd')} {f(k + '_fwd_bwd')}" for k in names))
        sys.stdout.flush()

    steps = []
    print(f"\nSSD decoding step (h={h} p={p} g={g} n={n}, float32 state, {args.dtype} inputs), milliseconds a call")
    print(f"{'batch':>6} {'triton':>10} {'ref':>10} {'official':>10}")
    for bs in (1, 8):
        x = ssd_inputs(bs, 1, h, p, g, n, dtype)
        step = {k: x[k][:, 0].contiguous() for k in ("x", "dt", "B", "C", "z")}
        state = x["initial_states"].clone()
        row = dict(batch=bs)
        for name in ("triton", "reference"):
            row[name] = bench(lambda: ops.ssd_state_update(state, **step, A=x["A"], D=x["D"], dt_bias=x["dt_bias"],
                                                           dt_softplus=True, backend=name), args.min_time)  # fmt: skip
        if official_step is not None:  # per-channel A, dt, D, dt_bias, broadcast with stride 0 (Mamba2.step)
            A3 = x["A"][:, None, None].expand(h, p, n)
            dt3 = step["dt"][..., None].expand(bs, h, p)
            row["official"] = bench(lambda: official_step(
                state, step["x"], dt3, A3, step["B"], step["C"], x["D"][:, None].expand(h, p), z=step["z"],
                dt_bias=x["dt_bias"][:, None].expand(h, p), dt_softplus=True), args.min_time)  # fmt: skip
        steps.append(row)
        official_ms = f"{row['official']:.4f}" if "official" in row else "-"
        print(f"{bs:>6} {row['triton']:>10.4f} {row['reference']:>10.4f} {official_ms:>10}")
    return dict(table=table, step=steps)


# ---------------------------------------------------------------------------------- compile, no GPU
_TT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def compile_kernel(fn, data_ptrs, dtype, constexprs, num_warps, arch):
    """Compiles a @triton.jit kernel for compute capability `arch` (no GPU needed) and runs Triton's ptxas
    with -v on its PTX: returns (seconds, registers, spill bytes). Pointers named in data_ptrs have `dtype`,
    seq_ptr int32, the other pointers float32; lo and hi (the SSD's dt_limit) are float32, the other runtime
    arguments int32."""
    import re
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "seq_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (_TT[dtype] if name in data_ptrs else "fp32")
        elif name in ("lo", "hi"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    t0 = time.perf_counter()
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=num_warps),
    )
    seconds = time.perf_counter() - t0
    ptx = kernel.asm["ptx"]
    target = re.search(r"\.target\s+(\S+)", ptx).group(1).rstrip(",")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        # Triton 3.9 writes PTX 9.x, which only its second bundled ptxas ("ptxas-blackwell") reads
        for exe in ("ptxas", "ptxas-blackwell"):
            ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", exe)
            if not os.path.exists(ptxas):
                continue
            r = subprocess.run([ptxas, f"-arch={target}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True)  # fmt: skip
            if r.returncode == 0:
                break
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.search(r"(\d+) bytes spill stores", r.stderr)
    return seconds, int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else -1


def compile_only(args) -> int:
    """Every kernel, with every option on, at the tile sizes the dispatch would pick for the scan table's
    shape (and batch 8): catches what the interpreter does not check (types, layouts, registers)."""
    from mambakit.ops.triton import conv as conv_triton, scan as scan_triton, step as step_triton

    if type(scan_triton._scan_fwd_kernel).__name__ != "JITFunction":
        print("--compile-only needs TRITON_INTERPRET unset")
        return 1
    io = ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr", "du_ptr", "ddelta_ptr", "dz_ptr")
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
    jobs = []
    for dtype in args.compile_dtypes.split(","):
        for b in sorted({args.batch, 8}):
            c = scan_triton.scan_config(b, max(int(s) for s in args.lengths.split(",")), args.d, args.n)
            t, bn = c["BLOCK_T"], c["BLOCK_N"]
            k = c["CKPT_TILES"]
            jobs.append((f"scan fwd b={b}", scan_triton._scan_fwd_kernel, io, dtype, dict(
                **flags, HAS_H0=True, SAVE=True, CKPT_TILES=k, BLOCK_T=t, BLOCK_D=c["FWD_D"], BLOCK_N=bn),
                c["FWD_WARPS"]))
            jobs.append((f"scan bwd b={b}", scan_triton._scan_bwd_kernel, io, dtype, dict(
                **flags, HAS_DHT=True, CKPT_TILES=k, BLOCK_T=t, BLOCK_D=c["BWD_D"], BLOCK_N=bn), c["BWD_WARPS"]))
            # fmt: skip
        conv = dict(W=4, HAS_BIAS=True, HAS_INIT=True, SILU=True)
        conv.update(BLOCK_T=conv_triton.BLOCK_T, BLOCK_D=conv_triton.BLOCK_D)
        conv_io = ("x_ptr", "init_ptr", "y_ptr", "dy_ptr", "dx_ptr", "dinit_ptr")
        jobs += [
            ("conv fwd", conv_triton._conv_fwd_kernel, conv_io, dtype, conv, 4),
            ("conv bwd (dpre, dW)", conv_triton._conv_bwd_pre_kernel, conv_io, dtype, conv, 4),
            ("conv bwd (dx)", conv_triton._conv_bwd_x_kernel, conv_io, dtype,
             {k: conv[k] for k in ("W", "HAS_INIT", "BLOCK_T", "BLOCK_D")}, 4),
            ("state update", step_triton._state_update_kernel, ("u_ptr", "delta_ptr", "z_ptr", "y_ptr"), dtype,
             dict(**flags, BLOCK_D=1024 // triton_pow2(args.n), BLOCK_N=triton_pow2(args.n)), 4),
            ("conv update", step_triton._conv_update_kernel, ("state_ptr", "x_ptr", "y_ptr"), dtype,
             dict(W=4, HAS_BIAS=True, SILU=True, BLOCK_D=256, BLOCK_W=4), 4),
        ]  # fmt: skip
    jobs += ssd_compile_jobs(args)
    print(f"compiling for sm_{args.arch} (no GPU needed)")
    print(f"{'kernel':<22} {'dtype':<9} {'tiles':<44} {'warps':>5} {'regs':>5} {'spill B':>7} {'s':>5}")
    failed = 0
    for name, fn, ptrs, dtype, consts, warps in jobs:
        tiles = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in consts.items()
                         if k.startswith("BLOCK_") or k in ("W", "CKPT_TILES"))  # fmt: skip
        try:
            sec, regs, spill = compile_kernel(fn, ptrs, dtype, consts, warps, args.arch)
            print(f"{name:<22} {dtype:<9} {tiles:<44} {warps:>5} {regs:>5} {spill:>7} {sec:>5.1f}")
        except Exception as e:
            failed += 1
            print(f"{name:<22} {dtype:<9} {tiles:<44} {warps:>5}  FAILED: {type(e).__name__}: {str(e)[:300]}")
        sys.stdout.flush()
    print("all kernels compiled" if not failed else f"{failed} kernels FAILED to compile")
    return 1 if failed else 0


def ssd_compile_jobs(args) -> list:
    """The SSD kernels with every option on, at the block sizes ssd_config picks for --ssd-shape's p, n and
    --ssd-chunk."""
    from mambakit.ops.triton import ssd as ssd_triton

    _, _, p, _, n = (int(v) for v in args.ssd_shape.split(","))
    c = ssd_triton.ssd_config(args.ssd_chunk, p, n)
    io = ("x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr", "dx_ptr", "dz_ptr", "v_ptr", "u_ptr")
    dots = {"bfloat16": 2, "float16": 1, "float32": 0}
    pw = max(16, triton_pow2(p))
    jobs = []
    for dtype in args.compile_dtypes.split(","):
        fwd = dict(DOT=dots[dtype], BLOCK_M=c["BLOCK_M"], BLOCK_P=c["BLOCK_P"], BLOCK_N=c["BLOCK_N"])
        bwd = dict(DOT=dots[dtype], BLOCK_M=c["BWD_M"], BLOCK_P=pw, BLOCK_N=c["BLOCK_N"])
        w = c["WARPS"]
        jobs += [
            ("ssd dt cumsum", ssd_triton._dt_cumsum_kernel, io, dtype, dict(
                HAS_BIAS=True, SOFTPLUS=True, HAS_LIMIT=True, BLOCK_Q=c["BLOCK_Q"], BLOCK_H=c["BLOCK_H"]), 4),
            ("ssd chunk state", ssd_triton._chunk_outer_kernel, io, dtype, dict(TO_END=True, HAS_SEQ=True, **fwd), w),
            ("ssd state passing", ssd_triton._state_passing_kernel, io, dtype, dict(
                HAS_H0=True, HAS_SEQ=True, BLOCK_PN=c["BLOCK_PN"]), 4),
            ("ssd chunk scan", ssd_triton._chunk_scan_kernel, io, dtype, dict(
                HAS_D=True, HAS_Z=True, HAS_SEQ=True, **fwd), w),
            ("ssd bwd query", ssd_triton._chunk_scan_bwd_query_kernel, io, dtype, dict(
                HAS_D=True, HAS_Z=True, HAS_SEQ=True, **bwd), w),
            ("ssd bwd dstates", ssd_triton._chunk_outer_kernel, io, dtype, dict(TO_END=False, HAS_SEQ=True, **fwd), w),
            ("ssd bwd passing", ssd_triton._state_passing_bwd_kernel, io, dtype, dict(
                HAS_DFINAL=True, HAS_SEQ=True, BLOCK_PN=c["BLOCK_PN"]), 4),
            ("ssd bwd key", ssd_triton._chunk_scan_bwd_key_kernel, io, dtype, dict(HAS_D=True, HAS_SEQ=True, **bwd), w),
            ("ssd step", ssd_triton._ssd_step_kernel, io, dtype, dict(
                HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_LIMIT=True,
                BLOCK_P=max(1, min(triton_pow2(p), 4096 // triton_pow2(n))), BLOCK_N=triton_pow2(n)), 4),
        ]  # fmt: skip
    return jobs


def triton_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# --------------------------------------------------------------------------------------------- the run
def main(argv=None) -> int:
    global DEVICE
    args = parse_args(argv)
    if args.compile_only:
        os.environ.pop("TRITON_INTERPRET", None)
        return compile_only(args)
    if args.dry_run:
        DEVICE = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before triton and the kernels are imported
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; it checks and times the Triton kernels on a GPU. Nothing run.")
        return 0
    try:
        import triton
    except ImportError:
        print("benchmarks/gpu.py: Triton is not installed (pip install mambakit[triton]).")
        return 1
    dtype = getattr(torch, args.dtype)
    t_start = time.perf_counter()
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        name = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    else:
        name = "CPU under Triton's interpreter (dry run: timings are meaningless)"
    results = dict(gpu=name, torch=torch.__version__, triton=triton.__version__, args=vars(args))
    print(f"{name}; torch {torch.__version__}, triton {triton.__version__}")
    bw = copy_bandwidth(args.min_time)
    results["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth (read + write): {bw / 1e9:.0f} GB/s")

    ok = True
    if not args.skip_check:
        t0 = time.perf_counter()
        shape = tuple(int(s) for s in args.check_shape.split(","))
        rows = check_correctness(shape, args.dtype)
        print(f"\ncorrectness, triton vs reference at b,l,d,n = {shape} ({time.perf_counter() - t0:.0f} s)")
        for what, err, tol in rows:
            good = err <= tol and math.isfinite(err)
            ok &= good
            print(f"  {what:<36} rel err {err:.2e}  (tol {tol:.0e})  {'ok' if good else 'FAIL'}")
        results["checks"] = [dict(what=w, rel_err=e, tol=t) for w, e, t in rows]

    b, d, n = args.batch, args.d, args.n
    lengths = [int(s) for s in args.lengths.split(",")]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    table = []
    print(f"\nselective scan, b={b} d={d} n={n} {args.dtype} (D, z gate, Δ bias + softplus), milliseconds")
    head = (f"{'l':>6} {'triton fwd':>10} {'floor':>7} {'ratio':>6} {'triton f+b':>10} {'ref fwd':>9} "
            f"{'ref f+b':>9} {'sdpa fwd':>9} {'sdpa f+b':>9} {'vs sdpa':>8}")  # fmt: skip
    print(head)
    for l in lengths:
        r = dict(l=l)
        r["triton_fwd"] = time_scan(b, l, d, n, dtype, "triton", args.min_time, grad=False)
        r["floor"] = 1e3 * scan_bytes(b, l, d, n, itemsize) / bw
        r["ratio"] = r["triton_fwd"] / r["floor"]
        r["triton_fwd_bwd"] = time_scan(b, l, d, n, dtype, "triton", args.min_time, grad=True)
        if l <= args.ref_max_len:
            r["ref_fwd"] = time_scan(b, l, d, n, dtype, "reference", 0, grad=False)
            r["ref_fwd_bwd"] = time_scan(b, l, d, n, dtype, "reference", 0, grad=True) if l <= 2048 else None
        try:
            r["sdpa_fwd"] = time_sdpa(b, l, d, dtype, args.min_time, grad=False)
            r["sdpa_fwd_bwd"] = time_sdpa(b, l, d, dtype, args.min_time, grad=True)
            r["vs_sdpa"] = r["sdpa_fwd"] / r["triton_fwd"]
        except torch.OutOfMemoryError:
            r["sdpa_fwd"] = r["sdpa_fwd_bwd"] = r["vs_sdpa"] = None

        def f(key, width, fmt=".3f"):
            v = r.get(key)
            return f"{v:>{width}{fmt}}" if v is not None else f"{'-':>{width}}"

        print(f"{l:>6} {f('triton_fwd', 10)} {f('floor', 7)} {f('ratio', 6, '.2f')} {f('triton_fwd_bwd', 10)} "
              f"{f('ref_fwd', 9, '.1f')} {f('ref_fwd_bwd', 9, '.1f')} {f('sdpa_fwd', 9)} {f('sdpa_fwd_bwd', 9)} "
              f"{f('vs_sdpa', 8, '.2f')}")  # fmt: skip
        table.append(r)
        sys.stdout.flush()
    results["scan"] = table

    if args.sweep:
        results["sweep"] = sweep(args, dtype)

    if not args.skip_model:
        print(f"\n{args.model_preset} (random weights, {args.dtype}): prefill of {args.prefill_len} tokens; "
              f"greedy generation of {args.gen_tokens} tokens after a 16-token prompt")  # fmt: skip
        print(f"{'batch':>6} {'prefill tok/s triton':>21} {'prefill tok/s ref':>18} {'gen tok/s':>10} {'ms/step':>8}")
        rows = model_speed(args, dtype)
        for r in rows:
            ref = r.get("prefill_tok_s_reference")
            print(f"{r['batch']:>6} {r['prefill_tok_s_triton']:>21.0f} {(f'{ref:.0f}' if ref else '-'):>18} "
                  f"{r['gen_tok_s']:>10.0f} {r['ms_per_step']:>8.2f}")  # fmt: skip
        results["model"] = rows

    if not args.skip_ssd:
        if not args.skip_check:
            t0 = time.perf_counter()
            shape = tuple(int(s) for s in args.ssd_check_shape.split(","))
            rows = check_ssd(shape, args.dtype)
            print(f"\nSSD correctness, triton vs reference at b,l,h,p,g,n = {shape} ({time.perf_counter() - t0:.0f} s)")
            for what, err, tol in rows:
                good = err <= tol and math.isfinite(err)
                ok &= good
                print(f"  {what:<44} rel err {err:.2e}  (tol {tol:.0e})  {'ok' if good else 'FAIL'}")
            results["ssd_checks"] = [dict(what=w, rel_err=e, tol=t) for w, e, t in rows]
        results["ssd"] = ssd_benchmarks(args, dtype)

    results["seconds"] = time.perf_counter() - t_start
    results["checks_passed"] = ok
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}; {results['seconds']:.0f} s in all")
    if args.json:
        with open(args.json + ".tmp", "w") as fh:
            json.dump(results, fh, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
