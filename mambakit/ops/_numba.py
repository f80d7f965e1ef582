"""Numba building blocks shared by the fused CPU kernels: vectorisable exp/log, sigmoid, softplus, threads.

Why our own exp and log: without Intel SVML (not installed with numba's wheels), LLVM cannot vectorise calls
to libm's expf/logf, and the scan evaluates exp(Δ·A) b·l·d·n times. A range reduction plus a polynomial is
plain arithmetic that LLVM turns into AVX-512 code. The float32 versions are accurate to a few ulp; float64
(used by gradcheck) calls libm, exact to the last bit, since a polynomial there would make finite differences
noisy.

x = k·ln2 + r with |r| ≤ ln2/2, k an integer: exp(x) = 2^k · exp(r), exp(r) by a degree-7 Taylor polynomial
(truncation error r^8/8! < 5e-9 relative), 2^k built directly in the exponent bits.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
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
_SQRT_HALF = _F32(0.7071067811865476)
_LN2 = _F32(0.6931471805599453)
_SOFTPLUS_THRESHOLD = 20.0  # as torch.nn.functional.softplus: softplus(x) = x beyond it


@intrinsic
def _i32_bits_to_f32(typingctx, x):
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
def _f32_bits_to_i32(typingctx, x):
    """Reinterpret a float32's bits as an int32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


def fexp(x):
    """exp(x): vectorisable in float32 kernels (see the module docstring), libm in float64."""
    return math.exp(x)


def flog(x):
    """log(x) for x > 0: vectorisable in float32 kernels, libm in float64."""
    return math.log(x)


@overload(fexp, inline="always")
def _fexp_overload(x):
    if x == types.float32:

        def impl(x):
            x = min(max(x, _EXP_LO), _EXP_HI)
            k = np.floor(x * _LOG2E + _HALF)  # the nearest integer to x / ln2
            r = (x - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln2/2
            p = _C7
            p = p * r + _C6
            p = p * r + _C5
            p = p * r + _C4
            p = p * r + _C3
            p = p * r + _C2
            p = (p * r) * r + r + _ONE
            scale = _i32_bits_to_f32((np.int32(k) + np.int32(127)) << np.int32(23))  # 2^k
            return p * scale

        return impl
    return lambda x: math.exp(x)


@njit(inline="always", fastmath=True, error_model="numpy")
def _two_atanh(s):
    """2·atanh(s) = log((1 + s)/(1 − s)) for float32 |s| ≤ 0.172, by its odd series (error < 1e-9)."""
    s2 = s * s
    p = _F32(2.0 / 11.0)
    p = p * s2 + _F32(2.0 / 9.0)
    p = p * s2 + _F32(2.0 / 7.0)
    p = p * s2 + _F32(2.0 / 5.0)
    p = p * s2 + _F32(2.0 / 3.0)
    p = p * s2 + _F32(2.0)
    return s * p


@overload(flog, inline="always")
def _flog_overload(x):
    if x == types.float32:

        def impl(x):
            # x = m·2^e with m in [√½, √2): log x = e·ln2 + 2·atanh(s), s = (m − 1)/(m + 1), |s| ≤ 0.172
            bits = _f32_bits_to_i32(x)
            e = ((bits >> np.int32(23)) & np.int32(255)) - np.int32(127)
            m = _i32_bits_to_f32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F800000))  # in [1, 2)
            big = m > _F32(1.4142135623730951)
            m = m * _HALF if big else m
            ef = _F32(e) + (_ONE if big else _F32(0.0))
            return ef * _LN2 + _two_atanh((m - _ONE) / (m + _ONE))

        return impl
    return lambda x: math.log(x)


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
    thr32, two, small = _F32(thr), _F32(2.0), _F32(0.41421356)

    def impl(x):
        # log1p(e) for e = exp(x): log(1 + e) would lose e's relative accuracy to rounding when e is small;
        # 2·atanh(e / (2 + e)) is exact there (|s| ≤ 0.172 for e ≤ √2 − 1).
        e = fexp(min(x, thr32))
        r = _two_atanh(e / (two + e)) if e < small else flog(_ONE + e)
        return x if x > thr32 else r

    return impl


def set_threads() -> None:
    """Use as many kernel threads as torch does (torch.set_num_threads is the one knob users turn)."""
    import torch

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def kernel_options() -> dict:
    """Options for every fused kernel: parallel; fast-math (reassociation lets LLVM vectorise reductions);
    numpy's error model (IEEE division: Python's raises ZeroDivisionError, and that branch blocks
    vectorisation); cached on disk (MAMBAKIT_NO_CACHE=1 turns the cache off)."""
    return dict(
        parallel=True,
        fastmath=True,
        error_model="numpy",
        cache=os.environ.get("MAMBAKIT_NO_CACHE", "0") != "1",
    )
