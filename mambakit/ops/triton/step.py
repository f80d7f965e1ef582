"""The single decoding step on GPU: Triton kernels for the scan's state update and the conv's window shift.

Generation (paper §3.4: a Mamba decodes in constant time per token with a fixed-size state) calls these once
per layer and token. Each is one pass over its state, updated in place: one program per (sequence, block of
channels) loads the state block, updates it, reads out y and writes the state back, so a step costs one read
and one write of the state. Same semantics as selective_state_update_ref / causal_conv1d_update_ref. The
entry points trust their arguments: only mambakit.ops calls them, after checking.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import exp, sigmoid, softplus


@triton.jit
def _state_update_kernel(
    state_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, d, n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """state: (b, d, n), in place; u, delta, z, y: (b, d); A: (d, n); B, C: (b, n); D, bias: (d,)."""
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * n + offs_n[None, :]
    row = pid_b.to(tl.int64) * d + offs_d
    dt = tl.load(delta_ptr + row, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    uv = tl.load(u_ptr + row, mask=mask_d, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + pid_b.to(tl.int64) * n + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b.to(tl.int64) * n + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    sp = state_ptr + pid_b.to(tl.int64) * d * n + dn
    h = tl.load(sp, mask=mask_dn, other=0.0).to(tl.float32)
    h = exp(dt[:, None] * A) * h + (dt * uv)[:, None] * Bv[None, :]  # Ā h + B̄ u
    tl.store(sp, h.to(state_ptr.dtype.element_ty), mask=mask_dn)
    yv = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        yv += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * uv
    if HAS_Z:
        zv = tl.load(z_ptr + row, mask=mask_d, other=0.0).to(tl.float32)
        yv = yv * zv * sigmoid(zv)
    tl.store(y_ptr + row, yv.to(y_ptr.dtype.element_ty), mask=mask_d)


def _own(x: Tensor) -> Tensor:
    return x.detach().contiguous()


def selective_state_update_triton(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The Triton decoding step of checked arguments (mambakit.ops.selective_state_update); results as
    selective_state_update_ref. The state is updated in place (through a copy when it is not contiguous); it
    is computed in float32 and stored back in its own dtype."""
    b, d, n = state.shape
    st = state if state.is_contiguous() else state.contiguous()
    u_ = _own(u)
    y = torch.empty_like(u_)
    block_n = triton.next_power_of_2(n)
    block_d = max(1, min(triton.next_power_of_2(d), 1024 // block_n))  # more, smaller programs: a step is latency
    if y.numel():
        _state_update_kernel[(b, triton.cdiv(d, block_d))](
            st, u_, _own(delta), _own(A), _own(B), _own(C), _own(D) if D is not None else u_,
            _own(z) if z is not None else u_, _own(delta_bias) if delta_bias is not None else u_, y, d, n,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus), BLOCK_D=block_d, BLOCK_N=block_n,
        )  # fmt: skip
    if st.data_ptr() != state.data_ptr():
        state.copy_(st)
    return y


@triton.jit
def _conv_update_kernel(state_ptr, x_ptr, w_ptr, bias_ptr, y_ptr, d,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr):  # fmt: skip
    """conv state: (b, d, W − 1), shifted in place; x, y: (b, d); w: (d, W); bias: (d,)."""
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_W)  # the window's taps 0 … W − 1; tap W − 1 is the new input
    mask_d = offs_d < d
    row = pid_b.to(tl.int64) * d + offs_d
    xv = tl.load(x_ptr + row, mask=mask_d, other=0.0)
    sp = state_ptr + row[:, None] * (W - 1) + offs_k[None, :]
    m_old = mask_d[:, None] & (offs_k < W - 1)[None, :]
    window = tl.load(sp, mask=m_old, other=0.0).to(tl.float32)
    window = tl.where((offs_k == W - 1)[None, :], xv.to(tl.float32)[:, None], window)  # (BLOCK_D, BLOCK_W)
    wt = tl.load(w_ptr + offs_d[:, None] * W + offs_k[None, :], mask=mask_d[:, None] & (offs_k < W)[None, :], other=0.0)
    acc = tl.sum(window * wt.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        acc = acc * sigmoid(acc)
    # the shift: new state[k] = old state[k + 1] (k < W − 2), new state[W − 2] = x (taps 1 … W − 1)
    shifted = tl.load(sp + 1, mask=mask_d[:, None] & (offs_k < W - 2)[None, :], other=0.0)
    shifted = tl.where((offs_k == W - 2)[None, :], xv[:, None].to(shifted.dtype), shifted)
    tl.debug_barrier()  # every load of the old state precedes the first store
    tl.store(sp, shifted.to(state_ptr.dtype.element_ty), mask=m_old)
    tl.store(y_ptr + row, acc.to(y_ptr.dtype.element_ty), mask=mask_d)


def causal_conv1d_update_triton(conv_state, x, weight, bias, activation):
    """The Triton conv decoding step of checked arguments (mambakit.ops.causal_conv1d_update); results as
    causal_conv1d_update_ref."""
    b, d = x.shape
    w = weight.shape[1]
    cs = conv_state if conv_state.is_contiguous() else conv_state.contiguous()
    x_ = _own(x)
    y = torch.empty_like(x_)
    block_w = triton.next_power_of_2(w)
    block_d = max(1, min(triton.next_power_of_2(d), 1024 // block_w))
    if y.numel():
        _conv_update_kernel[(b, triton.cdiv(d, block_d))](
            cs, x_, _own(weight), _own(bias) if bias is not None else x_, y, d,
            W=w, HAS_BIAS=bias is not None, SILU=activation in ("silu", "swish"), BLOCK_D=block_d, BLOCK_W=block_w,
        )  # fmt: skip
    if cs.data_ptr() != conv_state.data_ptr():
        conv_state.copy_(cs)
    return y
