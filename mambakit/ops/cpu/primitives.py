"""Numba building blocks shared by the fused CPU kernels (the ops' and the decode engine's): vectorisable exp,
2^x, sigmoid, softplus; bfloat16 read and written as bits; LLVM IR emitters for intrinsics that write vector
code directly; kernel options, threads, and the tensor → array hand-over.

Why our own exp: without Intel SVML (not installed with numba's wheels), LLVM cannot vectorise calls to libm's
expf, and the scan evaluates exp(Δ·A) b·l·d·n times. A range reduction plus a polynomial is plain arithmetic
that LLVM turns into AVX-512 code. The float32 versions are accurate to a few ulp; float64 (used by gradcheck)
calls libm, since a polynomial there would make finite differences noisy.

x = k·ln2 + r with |r| ≤ ln2/2, k an integer: exp(x) = 2^k · exp(r), exp(r) by a degree-7 Taylor polynomial
(truncation error r^8/8! < 5e-9 relative), 2^k built directly in the exponent bits.

The kernels are compiled without fast-math (see kernel_options): multiply-adds that should be fused say so (`fma`)
and sums across vector lanes are pairwise in a fixed order (`halve`).

Numba's on-disk cache is keyed on the source file of each kernel: after editing this file, clear the kernels'
caches (`__pycache__/*.nbi, *.nbc` under mambakit/ops/cpu and mambakit/engine) or set MAMBAKIT_NO_CACHE=1
while developing.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_F32 = np.float32
_LOG2E = _F32(1.4426950408889634)
_LN2_HI = _F32(0.693145751953125)  # ln2 split in two (Cody & Waite) so k·ln2 is exact for |k| ≤ 2^7
_LN2_LO = _F32(1.4286068203094172e-06)
_EXP_HI = _F32(88.0)  # exp(88) ≈ 1.65e38 < float32 max: no inf
_EXP_LO = _F32(-88.0)  # k = −127: the exponent field is 0, 2^k is 0.0, so exp underflows to exactly 0
_HALF = _F32(0.5)
_ONE = _F32(1.0)
_C2, _C3, _C4, _C5, _C6, _C7 = (_F32(1.0 / math.factorial(i)) for i in range(2, 8))
# 2^f = exp(f·ln2) = Σ (ln2)^i f^i / i!, |f| ≤ 1/2: degree 6 leaves (ln2/2)^7/7! < 1.3e-7 relative
_P2 = tuple(_F32(math.log(2.0) ** i / math.factorial(i)) for i in range(7))
_EXP2_HI = _F32(127.0)
_EXP2_LO = _F32(-127.0)  # k = −127 makes 2^k exactly 0.0, so 2^x underflows to 0 with no denormals
_SOFTPLUS_THRESHOLD = 20.0  # as torch.nn.functional.softplus: softplus(x) = x beyond it


@intrinsic
def i32_bits_to_f32(typingctx, x):
    """Reinterpret the low 32 bits of an integer as a float32 (an LLVM bitcast, which vectorises). Numba
    widens int32 arithmetic to int64, so any integer is accepted and truncated."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def f32_to_i32_bits(typingctx, x):
    """The 32 bits of a float32 as an int32 (an LLVM bitcast, which vectorises)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(x), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a·b + c rounded once (llvm.fma, one instruction with FMA hardware, vectorised like any arithmetic), for
    float32 or float64 arguments of one type. The kernels are compiled without fast-math (kernel_options), so
    LLVM never fuses a multiply and an add by itself: where fusing pays, the code asks for it here, and every
    compilation rounds the same way."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        name = "llvm.fma.f32" if isinstance(ty, ir.FloatType) else "llvm.fma.f64"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ty, [ty] * 3), name=name)
        return builder.call(fn, list(args))

    return a(a, b, c), codegen


def widen(x):
    """An element of a kernel input as a float: bfloat16, passed to kernels as its 16 bits (an int16 view),
    widened exactly to float32; float32/float64 unchanged. Kernels that read bf16 this way skip a float32 copy
    of their inputs (a bf16 → f32 conversion pass over memory)."""
    return x


@overload(widen, inline="always")
def _widen_overload(x):
    if isinstance(x, types.Integer):  # bfloat16 bits: the high half of a float32
        return lambda x: i32_bits_to_f32((np.int32(x) & np.int32(0xFFFF)) << np.int32(16))
    return lambda x: x


def narrow(x, out):
    """A float32 result in the element type of the output array `out`: bfloat16 bits (int16) rounded to
    nearest even as torch rounds (NaN stays NaN), or the float itself."""
    return x


@overload(narrow, inline="always")
def _narrow_overload(x, out):
    if isinstance(out.dtype, types.Integer):

        def impl(x, out):
            bits = np.int64(f32_to_i32_bits(np.float32(x))) & np.int64(0xFFFFFFFF)
            rounded = (bits + np.int64(0x7FFF) + ((bits >> np.int64(16)) & np.int64(1))) >> np.int64(16)
            return np.int16(np.int64(0x7FC0) if x != x else rounded)

        return impl
    return lambda x, out: x


def fexp(x):
    """exp(x): vectorisable in float32 kernels (see the module docstring), libm in float64."""
    return math.exp(x)


def fexp2(x):
    """2^x: vectorisable in float32 kernels, libm in float64. The scan computes exp(Δ·A) as 2^(Δ·A·log2 e)
    with A·log2 e precomputed: one multiplication and the Cody–Waite step fewer per state update."""
    return math.exp(x * math.log(2.0))


@overload(fexp2, inline="always")
def _fexp2_overload(x):
    if x == types.float32:
        p0, p1, p2, p3, p4, p5, p6 = _P2

        def impl(x):
            x = min(max(x, _EXP2_LO), _EXP2_HI)
            k = np.floor(x + _HALF)  # nearest integer; f = x − k in [−1/2, 1/2]
            f = x - k
            p = fma(fma(fma(fma(fma(fma(p6, f, p5), f, p4), f, p3), f, p2), f, p1), f, p0)  # Horner
            return p * i32_bits_to_f32((np.int32(k) + np.int32(127)) << np.int32(23))  # · 2^k

        return impl
    ln2 = math.log(2.0)
    return lambda x: math.exp(x * ln2)


@overload(fexp, inline="always")
def _fexp_overload(x):
    if x == types.float32:

        def impl(x):
            x = min(max(x, _EXP_LO), _EXP_HI)
            k = np.floor(fma(x, _LOG2E, _HALF))  # the nearest integer to x / ln2
            r = fma(k, -_LN2_LO, fma(k, -_LN2_HI, x))  # |r| <= ln2/2
            p = fma(fma(fma(fma(fma(_C7, r, _C6), r, _C5), r, _C4), r, _C3), r, _C2)  # Horner
            p = fma(p * r, r, r + _ONE)  # p·r² + r + 1, as exp_ir
            scale = i32_bits_to_f32((np.int32(k) + np.int32(127)) << np.int32(23))  # 2^k
            return p * scale

        return impl
    return lambda x: math.exp(x)


def vector_fn(builder, name, vt, n_args):
    """The LLVM intrinsic llvm.<name>.v<lanes>f32 (fma, floor, maxnum, …) on float vectors of type vt, taking
    n_args of them, declared in the module once."""
    full = f"llvm.{name}.v{vt.count}f32"
    return builder.module.globals.get(full) or ir.Function(builder.module, ir.FunctionType(vt, [vt] * n_args),
                                                          name=full)


def widen_ir(builder, v):
    """bfloat16 bits (an i16 vector) → float32 vector, exact (the 16 bits are the float's high half: shift up,
    reinterpret), as `widen` does for one value; for intrinsics that load bfloat16 weights or states."""
    i32v = ir.VectorType(ir.IntType(32), v.type.count)
    wide = builder.shl(builder.zext(v, i32v), ir.Constant(i32v, [16] * v.type.count))
    return builder.bitcast(wide, ir.VectorType(ir.FloatType(), v.type.count))


def loop_ir(builder, n, step, body, name="loop"):
    """Emits `for k in range(0, n, step): body(k)` for intrinsics that build their loops directly: n an i64
    value, k an i64 phi handed to body, which emits the loop's code (and may add blocks of its own); nothing
    runs when n ≤ 0. The builder is left after the loop."""
    i64 = ir.IntType(64)
    start = builder.block
    loop, done = builder.append_basic_block(f"{name}_body"), builder.append_basic_block(f"{name}_done")
    builder.cbranch(builder.icmp_signed(">", n, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(i64)
    k.add_incoming(ir.Constant(i64, 0), start)
    body(k)
    k_next = builder.add(k, ir.Constant(i64, step))
    k.add_incoming(k_next, builder.block)
    builder.cbranch(builder.icmp_signed("<", k_next, n), loop, done)
    builder.position_at_end(done)


def exp_ir(builder, x):
    """Emits fexp's float32 exp (the same clamp, reduction and polynomial, the same constants) on an LLVM
    float vector x, for intrinsics that build vector code directly instead of relying on LLVM to vectorise
    a loop (which it does or not depending on the code around it)."""
    vt = x.type
    lanes = vt.count
    i32v = ir.VectorType(ir.IntType(32), lanes)

    def splat(c):
        return ir.Constant(vt, [float(c)] * lanes)

    fma, floor = vector_fn(builder, "fma", vt, 3), vector_fn(builder, "floor", vt, 1)
    lo, hi = vector_fn(builder, "maxnum", vt, 2), vector_fn(builder, "minnum", vt, 2)
    x = builder.call(hi, [builder.call(lo, [x, splat(_EXP_LO)]), splat(_EXP_HI)])
    k = builder.call(floor, [builder.call(fma, [x, splat(_LOG2E), splat(_HALF)])])
    r = builder.call(fma, [k, splat(-_LN2_HI), x])
    r = builder.call(fma, [k, splat(-_LN2_LO), r])
    p = splat(_C7)
    for c in (_C6, _C5, _C4, _C3, _C2):
        p = builder.call(fma, [p, r, splat(c)])
    p = builder.call(fma, [builder.fmul(p, r), r, builder.fadd(r, splat(_ONE))])  # p·r² + r + 1
    bits = builder.shl(builder.add(builder.fptosi(k, i32v), ir.Constant(i32v, [127] * lanes)),
                       ir.Constant(i32v, [23] * lanes))
    return builder.fmul(p, builder.bitcast(bits, vt))  # · 2^k


def halve(x, w):
    """x[j] += x[j + w] for j < w: one level of a pairwise sum, vectorised (w ≥ the vector width) without
    reassociating anything. Levels w = n/2, n/4, …, 1 leave x[0] = the sum of x[:n] in a fixed order (pairwise),
    which is how the kernels reduce across vector lanes now that fast-math is off (kernel_options): the same
    order whatever LLVM decides, and independent chains, so the products before it still vectorise."""
    for j in range(w):
        x[j] += x[j + w]


def sigmoid(x):
    """1 / (1 + exp(−x)), vectorisable."""
    return 1 / (1 + math.exp(-x))


def softplus(x):
    """log(1 + exp(x)), as torch's softplus (beta 1, threshold 20), vectorisable."""
    return x if x > _SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


def _float_type(x):
    """The numpy scalar type matching numba type x: constants must share it, or float32 math widens."""
    return np.float32 if x == types.float32 else np.float64


@overload(sigmoid, inline="always")
def _sigmoid_overload(x):
    if isinstance(x, types.Float):
        one = _float_type(x)(1.0)
        return lambda x: one / (one + fexp(-x))
    return None


@overload(softplus, inline="always")
def _softplus_overload(x):
    thr = _SOFTPLUS_THRESHOLD
    if x == types.float64:
        return lambda x: x if x > thr else math.log1p(math.exp(x))
    if x != types.float32:
        return None
    zero, two = _F32(0.0), _F32(2.0)
    c = tuple(_F32(2.0 / (2 * i + 1)) for i in range(7))  # 2·atanh(s) = Σ 2 s^(2i+1) / (2i + 1)

    def impl(x):
        # softplus(x) = max(x, 0) + log1p(e), e = exp(−|x|) in (0, 1]; log1p(e) = 2·atanh(e / (2 + e)) with
        # s = e / (2 + e) ≤ 1/3, where the odd series to s^13 is exact to 1e-8: branch-free, so it vectorises,
        # and accurate for tiny e, where log(1 + e) would round e away.
        e = fexp(-abs(x))
        s = e / (two + e)
        s2 = s * s
        p = fma(fma(fma(fma(fma(fma(c[6], s2, c[5]), s2, c[4]), s2, c[3]), s2, c[2]), s2, c[1]), s2, c[0])
        return fma(s, p, max(x, zero))

    return impl


halve = numba.njit(inline="always", parallel=False, fastmath=False, error_model="numpy")(halve)


def records_grad(*tensors) -> bool:
    """Whether autograd will record an op on these tensors: grad mode on and one of them requires grad.

    An autograd.Function cannot tell inside its forward: ctx.needs_input_grad is True for every parameter
    that requires grad, under torch.no_grad() too. The ops pass this flag in, so that inference does not save
    float32 copies of its inputs and state checkpoints for a backward that never comes."""
    import torch

    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def owned(x, dtype):
    """x (detached) in `dtype`, contiguous, in memory of its own. For parameters handed to kernels: a numpy
    view pins a tensor's storage (makes it non-resizable), and FSDP frees gathered parameters by resizing
    their storage to 0. Parameters are small next to activations, so the copy is cheap."""
    y = x.detach().to(dtype).contiguous()
    return y.clone() if y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else y


def kernel_tensor(x, dtype):
    """x detached, in `dtype`, contiguous: x's own memory when it already is (so a kernel given a state updates
    it in place), else a copy."""
    return x.detach().to(dtype).contiguous()


def set_threads() -> None:
    """Use as many kernel threads as torch does (torch.set_num_threads is the one knob users turn).

    torch's wheel ships the same OpenMP runtime (libgomp.so.1) that numba's threading layer loads, so the two
    share one runtime: numba starting its pool resets the runtime's thread count, which torch then reports.
    torch's own setting is put back."""
    import torch

    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def kernel_options(parallel: bool = True) -> dict:
    """Options for every fused kernel: parallel; no fast-math; numpy's error model (IEEE division: Python's
    raises ZeroDivisionError, and that branch blocks vectorisation); cached on disk (MAMBAKIT_NO_CACHE=1 turns
    the cache off).

    Why no fast-math: numba compiles each `prange` body as a function of its own and links copies of it into
    the kernel and its wrappers; with fast-math LLVM reassociated sums and fused multiply-adds differently in
    each copy, and the process that compiled a kernel ran one copy while the on-disk cache kept another, so
    a run that compiled its kernels and one that loaded them differed in the last bits (a killed first run
    did not resume bitwise). Without it every copy rounds as the source says. Speed comes back where it
    matters by asking for it explicitly: `fma` for multiply-adds, `halve` for sums across lanes
    (docs/kernels.md has the measurements; tests/test_ops_cache.py the check)."""
    return dict(
        parallel=parallel,
        fastmath=False,
        error_model="numpy",
        cache=os.environ.get("MAMBAKIT_NO_CACHE", "0") != "1",
    )


def prefetch_ir(builder, ptr):
    """Emits a software prefetch of the cache line holding `ptr` (llvm.prefetch: read, keep in all caches), for
    intrinsics that ask for memory they read next while computing; it never faults and never changes results."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = builder.module.globals.get("llvm.prefetch.p0") or ir.Function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name="llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
