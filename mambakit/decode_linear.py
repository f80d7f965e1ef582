"""Weight-streaming matmul for decoding: y (b, o) = x (b, i) · Wᵀ (+ bias) when b is a handful of rows.

Why: a decode step of a Mamba multiplies one token's activations (or a few) by every weight matrix once,
so its time is the time to read the weights from memory. On the AMD EPYC (Zen 4) CPUs we run on, torch's
small-batch fp32 matmul (MKL) reads weights at about half the memory bandwidth, and the bf16 one (oneDNN)
at about a quarter (benchmarks/generate.py, `mambakit.decode_linear` rows). This kernel streams each
weight row once, in 64-row tasks spread over the threads, and takes the dot products with the b input rows
while the row sits in L1. Every output element is one dot product summed in the same order whatever b is,
so a row's result does not depend on the rest of the batch.

`linear(x, weight, bias)` is a drop-in for `F.linear` on CPU; it falls back to `F.linear` (the reference)
for anything else: larger batches (where torch's blocked GEMM wins), other devices or dtypes, autograd.
Weights are float32, or bfloat16 read as their 16 bits and widened exactly (accumulation in float32).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange
from torch import Tensor

from .ops._numba import _i32_bits_to_f32, kernel_options, set_threads

# Above these batch sizes torch's blocked GEMM is as fast or faster: the kernel becomes compute-bound.
MAX_BATCH = {torch.float32: 4, torch.bfloat16: 2}
ROWS_PER_TASK = 64


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


def _linear_bf16(x, W, y):
    """x (b, i) float32; W (o, i) the bfloat16 weights' bits as int16; y (b, o) float32. A bfloat16 is the
    top half of a float32: shifting its 16 bits up gives the float32 exactly."""
    b, i = x.shape
    o = W.shape[0]
    for task in prange((o + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        row = np.empty(i, dtype=np.float32)
        for r in range(task * ROWS_PER_TASK, min(o, (task + 1) * ROWS_PER_TASK)):
            for j in range(i):
                row[j] = _i32_bits_to_f32((np.int32(W[r, j]) & 0xFFFF) << 16)
            for bb in range(b):
                acc = np.float32(0.0)
                for j in range(i):
                    acc += row[j] * x[bb, j]
                y[bb, r] = acc


# Each kernel twice: parallel over 64-row tasks, and serial for torch.set_num_threads(1) (a parallel launch
# that hands work to a pool thread costs a scheduler wake-up, which a single thread need not pay).
_KERNELS = {
    (dtype, parallel): njit(**kernel_options(parallel=parallel))(fn)
    for dtype, fn in ((torch.float32, _linear_f32), (torch.bfloat16, _linear_bf16))
    for parallel in (True, False)
}


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` uses the kernel for these arguments (else it is F.linear)."""
    return (
        x.dim() == 2 and weight.dtype in MAX_BATCH and x.shape[0] <= MAX_BATCH[weight.dtype]
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
    w = w.numpy() if w.dtype == torch.float32 else w.view(torch.int16).numpy()
    _KERNELS[(weight.dtype, parallel)](x32.numpy(), w, y.numpy())
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
