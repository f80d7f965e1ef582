"""Weight-streaming matmul for decoding: y (b, o) = x (b, i) · Wᵀ (+ bias) when b is a handful of rows.

Why: a decode step of a Mamba multiplies one token's activations (or a few) by every weight matrix once,
so its time is the time to read the weights from memory. On the AMD EPYC (Zen 4) CPU we run on, torch's
small-batch matmuls read weights far below the memory bandwidth (one thread, the 130m in_proj 3072×768:
MKL fp32 0.71 ms at b = 1 and 1.31 ms at b = 2, oneDNN bf16 0.51 ms; this kernel 0.43 / 0.38 / 0.22 ms;
the head 50280×768 at b = 1: 11.4 ms vs 7.6 ms fp32, 8.2 vs 4.3 ms bf16). This kernel streams each weight
row once, in 64-row tasks spread over the threads, and takes the dot products with the b input rows while
the row sits in L1. In the one-row kernel every output is one dot product summed in the same order whatever
b is, so a row's result does not depend on the rest of the batch.

`linear(x, weight, bias)` is a drop-in for `F.linear` on CPU; it falls back to `F.linear` (the reference)
for anything else: larger batches (where torch's blocked GEMM wins), other devices or dtypes, autograd.
Weights are float32, or bfloat16 read as their 16 bits and widened exactly (accumulation in float32).
"""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange
from torch import Tensor

from .ops._numba import _i32_bits_to_f32, kernel_options, set_threads, widen

# Up to these batch sizes the one-row kernel (a dot product per output) is used: it is bound by reading
# the weights. Above, float32 takes the 4×4-blocked kernel (up to MAX_BLOCKED_BATCH: measured faster than
# MKL up to 32 rows, single-threaded: 15 vs 25 ms for the 130m head at b = 8); bfloat16 takes torch's
# oneDNN GEMM (AVX512-BF16 dot products), which is faster there.
MAX_BATCH = {torch.float32: 4, torch.bfloat16: 2}
MAX_BLOCKED_BATCH = {torch.float32: 32}
ROWS_PER_TASK = 64  # a multiple of 4


def _linear_f32(x, W, y):
    """x (b, i) float32, W (o, i) float32, y (b, o) float32."""
    b, i = x.shape
    o = W.shape[0]
    for task in prange((o + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(o, (task + 1) * ROWS_PER_TASK)):
            for bb in range(b):
                acc = np.float32(0.0)
                for j in range(i):  # vectorised by LLVM (fast-math reassociates the sum)
                    acc += W[r, j] * x[bb, j]
                y[bb, r] = acc


def _put(y, bb, r, v0, v1, v2, v3, bias, has_bias, add):
    """y[bb … bb + 3, r] = v0 … v3 (+ bias[r]), or += when add."""
    bv = widen(bias[r]) if has_bias else np.float32(0.0)
    if add:
        y[bb, r] += v0 + bv; y[bb + 1, r] += v1 + bv; y[bb + 2, r] += v2 + bv; y[bb + 3, r] += v3 + bv  # noqa: E702
    else:
        y[bb, r] = v0 + bv; y[bb + 1, r] = v1 + bv; y[bb + 2, r] = v2 + bv; y[bb + 3, r] = v3 + bv  # noqa: E702


def _rows(x, W, bias, y, r, add):
    """Rows r … r + 3 (fewer at the end of W) of y (b, o) = x[:, :i] · Wᵀ (+ bias), or y += that when add.

    W (o, i) float32 or bfloat16 bits, read row after row in memory order (one sequential stream, which DRAM
    serves fastest; measured: streaming 4 rows side by side cost batch 1 a third more time). Below 4 input
    rows each weight row is dotted with the b inputs while it sits in L1. From 4 inputs on, the decode is
    compute-bound and a block of 4 weight rows × 4 inputs shares each load among 16 multiply-adds (8 loads for
    16 FMAs instead of 2 for 1): measured (a one-off script, not in the repo) at batch 8 it reads the 130m in_proj stack at 17–19 GB/s against
    14–15 GB/s for one row × 4 inputs."""
    b = x.shape[0]
    o, i = W.shape  # x may have more columns than W (dt_proj reads the first R of x_proj's output)
    has_bias = bias.shape[0] > 0
    r_end = min(o, r + 4)
    b4 = b - b % 4 if r_end - r == 4 else 0  # inputs taken 4 at a time by the blocked kernel
    for bb in range(0, b4, 4):
        a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = np.float32(0.0)
        d0 = d1 = d2 = d3 = e0 = e1 = e2 = e3 = np.float32(0.0)
        for j in range(i):  # vectorised by LLVM (fast-math reassociates the sums): 16 vector accumulators
            w0, w1, w2, w3 = widen(W[r, j]), widen(W[r + 1, j]), widen(W[r + 2, j]), widen(W[r + 3, j])
            x0, x1, x2, x3 = x[bb, j], x[bb + 1, j], x[bb + 2, j], x[bb + 3, j]
            a0 += w0 * x0; a1 += w0 * x1; a2 += w0 * x2; a3 += w0 * x3  # noqa: E702
            c0 += w1 * x0; c1 += w1 * x1; c2 += w1 * x2; c3 += w1 * x3  # noqa: E702
            d0 += w2 * x0; d1 += w2 * x1; d2 += w2 * x2; d3 += w2 * x3  # noqa: E702
            e0 += w3 * x0; e1 += w3 * x1; e2 += w3 * x2; e3 += w3 * x3  # noqa: E702
        _put(y, bb, r, a0, a1, a2, a3, bias, has_bias, add)
        _put(y, bb, r + 1, c0, c1, c2, c3, bias, has_bias, add)
        _put(y, bb, r + 2, d0, d1, d2, d3, bias, has_bias, add)
        _put(y, bb, r + 3, e0, e1, e2, e3, bias, has_bias, add)
    for rr in range(r, r_end):  # one dot product per (row, input) for the inputs left
        for bb in range(b4, b):
            acc = np.float32(0.0)
            for j in range(i):  # vectorised by LLVM
                acc += widen(W[rr, j]) * x[bb, j]
            if has_bias:
                acc += widen(bias[rr])
            y[bb, rr] = y[bb, rr] + acc if add else acc


_put = njit(inline="always", **kernel_options(parallel=False))(_put)
_rows = njit(**kernel_options(parallel=False))(_rows)


def _linear_f32_blocked(x, W, y):
    """x (b, i), W (o, i), y (b, o), float32: `_rows` over each task's 4-row blocks (4 weight rows × 4 input
    rows, 16 dot products sharing each load), for batches where the one-row kernel becomes compute-bound."""
    o = W.shape[0]
    no_bias = y[0, :0]
    for task in prange((o + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(o, (task + 1) * ROWS_PER_TASK), 4):
            _rows(x, W, no_bias, y, r, False)


def _linear_bf16(x, W, y):
    """x (b, i) float32; W (o, i) the bfloat16 weights' bits as uint16; y (b, o) float32. A bfloat16 is the
    top half of a float32: shifting its 16 bits up gives the float32 exactly (a shift and a bitcast per
    element, which LLVM vectorises along with the multiply-add)."""
    b, i = x.shape
    o = W.shape[0]
    for task in prange((o + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(o, (task + 1) * ROWS_PER_TASK)):
            for bb in range(b):
                acc = np.float32(0.0)
                for j in range(i):
                    acc += _i32_bits_to_f32(np.uint32(W[r, j]) << 16) * x[bb, j]
                y[bb, r] = acc


def _renamed(fn, suffix: str):
    """fn under another name. numba's disk cache files a compiled function under its name and bytecode, not
    its options: a serial and a parallel build of one function would load each other's cached code."""
    g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    g.__qualname__ = fn.__qualname__ + suffix
    return g


# Each kernel twice: parallel over 64-row tasks, and serial for torch.set_num_threads(1) (a parallel launch
# that hands work to a pool thread costs a scheduler wake-up, which a single thread need not pay).
_KERNELS = {
    (dtype, parallel): njit(**kernel_options(parallel=parallel))(fn if parallel else _renamed(fn, "_serial"))
    for dtype, fn in ((torch.float32, _linear_f32), (torch.bfloat16, _linear_bf16), ("blocked", _linear_f32_blocked))
    for parallel in (True, False)
}


def _max_batch(dtype) -> int:
    return max(MAX_BATCH.get(dtype, 0), MAX_BLOCKED_BATCH.get(dtype, 0))


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` uses the kernel for these arguments (else it is F.linear)."""
    return (
        x.dim() == 2 and x.shape[0] <= _max_batch(weight.dtype)
        and x.device.type == "cpu" and weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous()
        and x.dtype in (torch.float32, torch.bfloat16) and x.shape[1] == weight.shape[1]
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for a decode step: x (b, i), weight (o, i) → (b, o) in x's dtype."""
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    parallel = torch.get_num_threads() > 1
    if parallel:
        set_threads()
    b, o = x.shape[0], weight.shape[0]
    x32 = x.detach().float().contiguous()
    y = torch.empty(b, o, dtype=torch.float32)
    w = weight.detach()
    w = w.numpy() if w.dtype == torch.float32 else w.view(torch.int16).numpy().view(np.uint16)
    kind = weight.dtype if b <= MAX_BATCH[weight.dtype] else "blocked"
    _KERNELS[(kind, parallel)](x32.numpy(), w, y.numpy())
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
