"""Triton helpers the GPU kernels share: e^x, the SiLU gate's sigmoid and softplus in float32, and row access
to (b, l, ·) tensors through their strides."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634  # e^x = 2^(x·log2 e): tl.exp2 is one special-function instruction
_LOG2E = tl.constexpr(LOG2E)  # the kernels' copies (a @triton.jit function reads only constexpr globals)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def exp(x):
    return tl.exp2(x * _LOG2E)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-x * _LOG2E))


@triton.jit
def softplus(x):
    """log(1 + e^x), as F.softplus (x itself above 20). log1p by Goldberg's correction: log(w)·e/(w − 1) with
    w = 1 + e is accurate to a few ulps even where e = e^x is far below float32's epsilon relative to 1."""
    e = tl.exp2(tl.minimum(x, 20.0) * _LOG2E)
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log2(w) * LN2 * e / (w - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def row_ptrs(ptr, pid_b, t, offs, stride_b, stride_l):
    """Pointers to the (t, offs) elements of sequence pid_b in a (b, l, ·) tensor whose last dimension is
    contiguous: the ops read views (the model's z, B, C are slices of wider projections) without copies."""
    return ptr + pid_b.to(tl.int64) * stride_b + t.to(tl.int64)[:, None] * stride_l + offs[None, :]


def rowwise(x: Tensor) -> Tensor:
    """x itself when its last dimension is contiguous (the kernels take the other strides), else a copy."""
    x = x.detach()
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()
