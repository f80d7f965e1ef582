"""Causal depthwise conv1d on CPU: the fused numba kernels (forward, backward), and the decoding step.

The Mamba block runs a short (w = 4) depthwise causal convolution over time before the scan (paper §3.4,
Figure 3; the specification is reference.causal_conv1d_ref). In the time-major layout (b, l, d) the fused
kernel vectorises over contiguous channels and parallelises over (sequence × time chunks); the bias and the
SiLU are fused. The w − 1 inputs before t = 0 come from initial_state, so a long sequence can be processed in
pieces: the kernel runs on the padded input [initial_state, x], and autograd splits its gradient between the
two. The entry points trust their arguments: only mambakit.ops calls them, after checking.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from ..reference import compute_dtype, conv_final_state
from .primitives import fma, kernel_options, kernel_tensor, narrow, owned, records_grad, set_threads, sigmoid, widen

TIME_CHUNK = 64  # time steps per task


# ------------------------------------------------------------------------------------------ fused kernels
@njit(**kernel_options())
def _conv_fwd_kernel(xp, Wt, bias, silu, y):
    """xp: (b, l + w − 1, d) the padded input; Wt: (w, d); bias: (d,); y: (b, l, d). Wt and bias in the
    compute dtype; xp and y in it too, or both bfloat16 bits (int16; see primitives.widen/narrow)."""
    b, l, d = y.shape
    w = Wt.shape[0]
    nt = (l + TIME_CHUNK - 1) // TIME_CHUNK
    for task in prange(b * nt):
        bi = task // nt
        t0 = (task % nt) * TIME_CHUNK
        acc = np.empty(d, dtype=Wt.dtype)
        for t in range(t0, min(l, t0 + TIME_CHUNK)):
            for j in range(d):
                acc[j] = bias[j]
            for k in range(w):  # y_t = bias + Σ_k W[k]·x_{t−w+1+k}; row t + k of xp is input t − w + 1 + k
                for j in range(d):
                    acc[j] = fma(Wt[k, j], widen(xp[bi, t + k, j]), acc[j])
            if silu:
                for j in range(d):
                    acc[j] = acc[j] * sigmoid(acc[j])
            for j in range(d):
                y[bi, t, j] = narrow(acc[j], y)


@njit(**kernel_options())
def _conv_bwd_kernel(xp, Wt, bias, silu, dy, dpre, dxp, dW_part, dbias_part):
    """dy, dpre: (b, l, d); dxp: (b, l + w − 1, d); dW_part: (b·chunks, w, d); dbias_part: (b·chunks, d)."""
    b, l, d = dy.shape
    w = Wt.shape[0]
    lp = xp.shape[1]
    nt = (l + TIME_CHUNK - 1) // TIME_CHUNK
    # pass 1: the gradient before the activation, and the weight/bias partial sums of each task
    for task in prange(b * nt):
        bi = task // nt
        t0 = (task % nt) * TIME_CHUNK
        acc = np.empty(d, dtype=dy.dtype)
        for j in range(d):
            dbias_part[task, j] = 0
        for k in range(w):
            for j in range(d):
                dW_part[task, k, j] = 0
        for t in range(t0, min(l, t0 + TIME_CHUNK)):
            if silu:  # recompute the pre-activation; silu'(a) = σ(a)·(1 + a·(1 − σ(a)))
                for j in range(d):
                    acc[j] = bias[j]
                for k in range(w):
                    for j in range(d):
                        acc[j] = fma(Wt[k, j], xp[bi, t + k, j], acc[j])
                for j in range(d):
                    sg = sigmoid(acc[j])
                    acc[j] = dy[bi, t, j] * sg * (1 + acc[j] * (1 - sg))
            else:
                for j in range(d):
                    acc[j] = dy[bi, t, j]
            for j in range(d):
                dpre[bi, t, j] = acc[j]
                dbias_part[task, j] += acc[j]
            for k in range(w):
                for j in range(d):
                    dW_part[task, k, j] = fma(acc[j], xp[bi, t + k, j], dW_part[task, k, j])
    # pass 2: dxp[s] = Σ_k W[k]·dpre[s − k], gathered (no two tasks write one row)
    ns = (lp + TIME_CHUNK - 1) // TIME_CHUNK
    for task in prange(b * ns):
        bi = task // ns
        s0 = (task % ns) * TIME_CHUNK
        acc = np.empty(d, dtype=dy.dtype)
        for s in range(s0, min(lp, s0 + TIME_CHUNK)):
            for j in range(d):
                acc[j] = 0
            for k in range(max(0, s - l + 1), min(w, s + 1)):
                for j in range(d):
                    acc[j] = fma(Wt[k, j], dpre[bi, s - k, j], acc[j])
            for j in range(d):
                dxp[bi, s, j] = acc[j]


class _CausalConv1dCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, weight, bias, silu, need_grad):
        # need_grad: records_grad(xp, weight, bias), from the caller (see records_grad)
        kd = compute_dtype(xp)
        b, lp, d = xp.shape
        w = weight.shape[1]
        Wt = owned(weight, kd).t().contiguous()  # (w, d)
        bias_ = owned(bias, kd) if bias is not None else torch.zeros(d, dtype=kd)
        if xp.dtype == torch.bfloat16:  # read and written as bits by the kernel: no float32 copies
            xp_k = xp.detach().contiguous()
            y = torch.empty(b, lp - (w - 1), d, dtype=torch.bfloat16)
            xp_np, y_np = xp_k.view(torch.int16).numpy(), y.view(torch.int16).numpy()
        else:
            xp_k = xp.detach().to(kd).contiguous()
            y = torch.empty(b, lp - (w - 1), d, dtype=kd)
            xp_np, y_np = xp_k.numpy(), y.numpy()
        set_threads()
        _conv_fwd_kernel(xp_np, Wt.numpy(), bias_.numpy(), silu, y_np)
        if need_grad:
            ctx.save_for_backward(xp_k.to(kd), Wt, bias_)  # the backward kernel reads the compute dtype
        ctx.silu = silu
        ctx.dtypes = (xp.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.to(xp.dtype)

    @staticmethod
    def backward(ctx, dy):
        xp_, Wt, bias_ = ctx.saved_tensors
        b, lp, d = xp_.shape
        w = Wt.shape[0]
        l = lp - (w - 1)
        tasks = b * -(-l // TIME_CHUNK)
        dy_ = dy.to(xp_.dtype).contiguous()
        dpre = torch.empty_like(dy_)
        dxp = torch.empty_like(xp_)
        dW_part = xp_.new_empty(tasks, w, d)
        dbias_part = xp_.new_empty(tasks, d)
        set_threads()
        _conv_bwd_kernel(
            xp_.numpy(), Wt.numpy(), bias_.numpy(), ctx.silu, dy_.numpy(), dpre.numpy(), dxp.numpy(),
            dW_part.numpy(), dbias_part.numpy(),
        )  # fmt: skip
        t_x, t_w, t_b = ctx.dtypes
        need = ctx.needs_input_grad
        return (
            dxp.to(t_x) if need[0] else None,
            dW_part.sum(0).t().to(t_w) if need[1] else None,  # (d, w)
            dbias_part.sum(0).to(t_b) if t_b is not None and need[2] else None,
            None,
            None,
        )


def causal_conv1d_cpu(x, weight, bias, initial_state, return_final_state, activation):
    """The fused CPU conv of checked arguments (mambakit.ops.causal_conv1d); results as causal_conv1d_ref."""
    b, l, d = x.shape
    w = weight.shape[1]
    init = initial_state if initial_state is not None else x.new_zeros(b, d, w - 1)
    xp = torch.cat([init.to(x.dtype).transpose(1, 2), x], dim=1)  # (b, w − 1 + l, d): [initial_state, x]
    y = _CausalConv1dCPU.apply(xp, weight, bias, activation in ("silu", "swish"), records_grad(xp, weight, bias))
    return (y, conv_final_state(x, initial_state, w)) if return_final_state else y


# ---------------------------------------------------------------------------------------- the decoding step
@njit(**kernel_options(parallel=False))
def _conv_update_kernel(conv_state, x, weight, bias, silu, y):
    """One step, in place. conv_state: (b, d, w − 1); x, y: (b, d); weight: (d, w); bias: (d,).
    Serial: b·d·w multiply-adds cost less than waking a thread pool."""
    b, d, wm1 = conv_state.shape
    for bi in range(b):
        for j in range(d):
            acc = fma(weight[j, wm1], x[bi, j], bias[j])
            for k in range(wm1):
                acc = fma(weight[j, k], conv_state[bi, j, k], acc)
            for k in range(wm1 - 1):  # shift the window left; the new input enters last
                conv_state[bi, j, k] = conv_state[bi, j, k + 1]
            if wm1 > 0:
                conv_state[bi, j, wm1 - 1] = x[bi, j]
            y[bi, j] = acc
        if silu:
            for j in range(d):
                y[bi, j] = y[bi, j] * sigmoid(y[bi, j])


def causal_conv1d_update_cpu(conv_state, x, weight, bias, activation):
    """The fused decoding step of checked arguments (mambakit.ops.causal_conv1d_update); results as
    causal_conv1d_update_ref. conv_state is updated in place when it is already in the compute dtype and
    contiguous, else through a copy."""
    kd = compute_dtype(x)
    d = x.shape[1]
    cs = kernel_tensor(conv_state, kd)
    x_ = kernel_tensor(x, kd)
    y = torch.empty_like(x_)
    _conv_update_kernel(
        cs.numpy(), x_.numpy(), kernel_tensor(weight, kd).numpy(),
        (kernel_tensor(bias, kd) if bias is not None else x_.new_zeros(d)).numpy(), activation in ("silu", "swish"),
        y.numpy(),
    )  # fmt: skip
    if cs.data_ptr() != conv_state.data_ptr():
        conv_state.copy_(cs)
    return y.to(x.dtype)
