"""Causal depthwise conv1d on GPU: Triton kernels for forward and backward, and their autograd Function.

The Mamba block's short (w = 4) causal conv over time (paper §3.4, Figure 3), as in cpu/conv.py, in the
time-major layout (b, l, d): one program per (sequence, tile of BLOCK_T steps, block of BLOCK_D channels), rows
of contiguous channels, bias and SiLU fused. The w − 1 inputs before t = 0 are read from initial_state
(b, d, w − 1) directly, so no padded copy [initial_state, x] is made.

Backward, in two kernels as on CPU: the first recomputes the pre-activation, writes its gradient dpre (float32)
and adds the tile's weight and bias partial sums atomically; the second gathers dx_s = Σ_k W_k · dpre_{s+w−1−k}
over the padded positions s ∈ [−(w − 1), l), the first w − 1 of which are d(initial_state). Gathering instead
of scattering means no two programs write one element. The entry points trust their arguments: only
mambakit.ops calls them, after checking.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import conv_final_state
from .common import row_ptrs, rowwise, sigmoid

# 16 steps × 64 channels per program: 64 bf16 channels are a 128-byte row, and the three kernels compile for
# sm_90 without spilling registers (64 × 64 spilled in the backward; docs/kernels.md).
BLOCK_T = 16
BLOCK_D = 64


@triton.jit
def _conv_pre(x_ptr, init_ptr, w_ptr, bias_ptr, pid_b, t, offs_d, mask_d, l, d, s_x_b, s_x_l,
              W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """The pre-activation bias + Σ_k W_k · x_{t−(W−1)+k} for steps t (BLOCK_T,) and channels offs_d, float32."""
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(W):
        s = t - (W - 1) + k  # the input this tap reads; s < 0 is in initial_state
        wk = tl.load(w_ptr + offs_d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        m = ((s >= 0) & (s < l))[:, None] & mask_d[None, :]
        xs = tl.load(row_ptrs(x_ptr, pid_b, s, offs_d, s_x_b, s_x_l), mask=m, other=0.0)
        if HAS_INIT:  # init[b, j, (W − 1) + s] for −(W − 1) ≤ s < 0
            mi = ((s < 0) & (s >= -(W - 1)))[:, None] & mask_d[None, :]
            off = (pid_b.to(tl.int64) * d + offs_d)[None, :] * (W - 1) + (W - 1 + s)[:, None]
            xs = tl.where(mi, tl.load(init_ptr + off, mask=mi, other=0.0), xs)
        acc += wk[None, :] * xs.to(tl.float32)
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, init_ptr, w_ptr, bias_ptr, y_ptr, l, d, s_x_b, s_x_l,
                     W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """x, y: (b, l, d), x with (batch, time) strides s_x_b, s_x_l (it may be a view, as the model's is), the
    others contiguous; init: (b, d, W − 1); w: (d, W); bias: (d,)."""
    pid_b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    acc = _conv_pre(x_ptr, init_ptr, w_ptr, bias_ptr, pid_b, t, offs_d, mask_d, l, d, s_x_b, s_x_l,
                    W, HAS_BIAS, HAS_INIT, BLOCK_T, BLOCK_D)  # fmt: skip
    if SILU:
        acc = acc * sigmoid(acc)
    m = (t < l)[:, None] & mask_d[None, :]
    rows = (pid_b.to(tl.int64) * l + t)[:, None] * d + offs_d[None, :]
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd_pre_kernel(x_ptr, init_ptr, w_ptr, bias_ptr, dy_ptr, dpre_ptr, dw_ptr, dbias_ptr, l, d, s_x_b, s_x_l,
                         W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """dpre (b, l, d) float32 = dy · act'(pre); dw (d, W) and dbias (d,) float32, zeroed, added to atomically."""
    pid_b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    m = (t < l)[:, None] & mask_d[None, :]
    rows = (pid_b.to(tl.int64) * l + t)[:, None] * d + offs_d[None, :]
    g = tl.load(dy_ptr + rows, mask=m, other=0.0).to(tl.float32)
    if SILU:  # silu'(a) = σ(a)(1 + a(1 − σ(a))), with a recomputed
        pre = _conv_pre(x_ptr, init_ptr, w_ptr, bias_ptr, pid_b, t, offs_d, mask_d, l, d, s_x_b, s_x_l,
                        W, HAS_BIAS, HAS_INIT, BLOCK_T, BLOCK_D)  # fmt: skip
        sg = sigmoid(pre)
        g = g * sg * (1.0 + pre * (1.0 - sg))
    g = tl.where(m, g, 0.0)
    tl.store(dpre_ptr + rows, g, mask=m)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, tl.sum(g, axis=0), mask=mask_d, sem="relaxed")
    for k in tl.static_range(W):  # dW_k = Σ_t dpre_t · x_{t−(W−1)+k}
        s = t - (W - 1) + k
        ms = ((s >= 0) & (s < l))[:, None] & mask_d[None, :]
        xs = tl.load(row_ptrs(x_ptr, pid_b, s, offs_d, s_x_b, s_x_l), mask=ms, other=0.0)
        if HAS_INIT:
            mi = ((s < 0) & (s >= -(W - 1)))[:, None] & mask_d[None, :]
            off = (pid_b.to(tl.int64) * d + offs_d)[None, :] * (W - 1) + (W - 1 + s)[:, None]
            xs = tl.where(mi, tl.load(init_ptr + off, mask=mi, other=0.0), xs)
        tl.atomic_add(dw_ptr + offs_d * W + k, tl.sum(g * xs.to(tl.float32), axis=0), mask=mask_d, sem="relaxed")


@triton.jit
def _conv_bwd_x_kernel(dpre_ptr, w_ptr, dx_ptr, dinit_ptr, l, d,
                       W: tl.constexpr, HAS_INIT: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """dx (b, l, d) and dinit (b, d, W − 1): over padded positions p = s + W − 1 ∈ [0, l + W − 1),
    d(input s) = Σ_k W_k · dpre_{p−k}."""
    pid_b = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < d
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(W):
        t = p - k
        m = ((t >= 0) & (t < l))[:, None] & mask_d[None, :]
        wk = tl.load(w_ptr + offs_d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        rows = (pid_b.to(tl.int64) * l + t)[:, None] * d + offs_d[None, :]
        acc += wk[None, :] * tl.load(dpre_ptr + rows, mask=m, other=0.0)
    s = p - (W - 1)
    mx = ((s >= 0) & (s < l))[:, None] & mask_d[None, :]
    rows = (pid_b.to(tl.int64) * l + s)[:, None] * d + offs_d[None, :]
    tl.store(dx_ptr + rows, acc.to(dx_ptr.dtype.element_ty), mask=mx)
    if HAS_INIT:
        mi = (p < W - 1)[:, None] & mask_d[None, :]
        off = (pid_b.to(tl.int64) * d + offs_d)[None, :] * (W - 1) + p[:, None]
        tl.store(dinit_ptr + off, acc.to(dinit_ptr.dtype.element_ty), mask=mi)


class _CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, silu):
        b, l, d = x.shape
        w = weight.shape[1]
        x_ = rowwise(x)
        w_ = weight.detach().contiguous()
        bias_ = bias.detach().contiguous() if bias is not None else w_
        init_ = initial_state.detach().contiguous() if initial_state is not None and w > 1 else x_
        y = x_.new_empty(b, l, d)
        flags = dict(W=w, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None and w > 1, SILU=silu)
        grid = (b, triton.cdiv(l, BLOCK_T), triton.cdiv(d, BLOCK_D))
        if y.numel():
            _conv_fwd_kernel[grid](
                x_, init_, w_, bias_, y, l, d, x_.stride(0), x_.stride(1), **flags, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D
            )
        ctx.save_for_backward(x_, init_, w_, bias_)
        ctx.flags = flags
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_, init_, w_, bias_ = ctx.saved_tensors
        flags = ctx.flags
        b, l, d = x_.shape
        w = flags["W"]
        f32 = torch.float32
        dy_ = dy.contiguous()
        dpre = torch.empty(b, l, d, dtype=f32, device=x_.device)
        dw = torch.zeros(d, w, dtype=f32, device=x_.device)
        dbias = torch.zeros(d, dtype=f32, device=x_.device)
        dx = x_.new_empty(b, l, d)
        has_init = ctx.init_dtype is not None
        dinit = x_.new_zeros(b, d, w - 1, dtype=ctx.init_dtype) if has_init else None
        if dx.numel():
            grid = (b, triton.cdiv(l, BLOCK_T), triton.cdiv(d, BLOCK_D))
            _conv_bwd_pre_kernel[grid](
                x_, init_, w_, bias_, dy_, dpre, dw, dbias, l, d, x_.stride(0), x_.stride(1),
                **flags, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
            )
            grid = (b, triton.cdiv(l + w - 1, BLOCK_T), triton.cdiv(d, BLOCK_D))
            _conv_bwd_x_kernel[grid](
                dpre, w_, dx, dinit if flags["HAS_INIT"] else dx, l, d,
                W=w, HAS_INIT=flags["HAS_INIT"], BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
            )  # fmt: skip
        t_w, t_b = ctx.dtypes
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dw.to(t_w) if need[1] else None,
            dbias.to(t_b) if t_b is not None and need[2] else None,
            dinit if has_init and need[3] else None,
            None,
        )


def causal_conv1d_triton(x, weight, bias, initial_state, return_final_state, activation):
    """The Triton conv of checked arguments (mambakit.ops.causal_conv1d); results as causal_conv1d_ref
    (float16, bfloat16, float32)."""
    y = _CausalConv1dTriton.apply(x, weight, bias, initial_state, activation in ("silu", "swish"))
    return (y, conv_final_state(x, initial_state, weight.shape[1])) if return_final_state else y
