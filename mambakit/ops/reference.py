"""Every op in plain PyTorch, as the paper writes it: the readable specification the kernels are tested against.

These twins trust their arguments: `mambakit.ops` checks them (shapes, dtypes, devices) before dispatching here
or to a kernel. Any device, any float dtype (float64 included), differentiated by autograd. Results come back
in the input's dtype; everything is computed in `compute_dtype` (float32, float64 for float64 inputs), as the
kernels accumulate.

The selective scan: Mamba (Gu & Dao, 2023), Section 3.2, Algorithm 2, with the official discretisation
(Section 2, eq. 4 for Ā; the simplified Euler step B̄ = Δ·B used by the official kernels):

    Δ_t = softplus(delta_t + delta_bias)              (or delta_t + delta_bias without softplus)
    h_t = exp(Δ_t · A) ⊙ h_{t−1} + Δ_t · B_t · u_t    h: (b, d, n)
    y_t = C_t · h_t + D · u_t                          (contracting n)
    y_t ← y_t · silu(z_t)                              (the block's output gate, fused here as in the kernels)

Sequential over time. The time loop iterates over `unbind` views rather than indexing one step per iteration:
indexing makes autograd zero-fill a full-size gradient per step, which turns the backward quadratic in length.

The causal conv: the Mamba block's short (w = 4) depthwise causal convolution over time (paper §3.4, Figure 3),
y_t = bias + Σ_k weight[:, k]·x_{t−w+1+k}, the w − 1 inputs before t = 0 taken from a state, then SiLU.

The single steps (`*_update`) are one time step of each, for decoding: they update the state in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the ops compute in: float64 for float64 inputs, float32 otherwise (bf16/fp16 accumulate in
    float32, as the official kernels do)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def conv_final_state(x: Tensor, initial_state: Tensor | None, w: int) -> Tensor:
    """The conv's state for the next call: the last w − 1 inputs of [initial_state, x], (b, d, w − 1) in x's
    dtype, in memory of its own (a decoding step shifts it in place; it must not write into x). Every backend
    returns this one (small, and differentiable by autograd)."""
    b, l, d = x.shape
    if l >= w - 1:
        tail = x[:, l - (w - 1) :, :].transpose(1, 2)
    else:
        init = initial_state.to(x.dtype) if initial_state is not None else x.new_zeros(b, d, w - 1)
        tail = torch.cat([init, x.transpose(1, 2)], dim=-1)[..., l:]
    return tail.clone(memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------ the scan
def _discretize_dt(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """Δ (…, d) in float32 or wider: the step size of paper eq. 4, after the optional bias and softplus."""
    dt = delta.float() if delta.dtype in (torch.float16, torch.bfloat16) else delta
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)
    return F.softplus(dt) if delta_softplus else dt


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
):
    """Reference selective scan. u, delta, z: (b, l, d); A: (d, n); B, C: (b, l, n); D, delta_bias: (d,);
    initial_state: (b, d, n). Returns y (b, l, d) in u's dtype, and the final state (b, d, n) in float32
    (or float64 for float64 inputs) when `return_final_state`."""
    out_dtype = u.dtype
    acc = compute_dtype(u)
    b, l, d = u.shape
    n = A.shape[1]
    dt = _discretize_dt(delta, delta_bias, delta_softplus).to(acc)  # (b, l, d)
    u_, A_, B_, C_ = u.to(acc), A.to(acc), B.to(acc), C.to(acc)

    h = (
        initial_state.to(acc)
        if initial_state is not None
        else torch.zeros(b, d, n, dtype=acc, device=u.device)
    )
    ys = []
    for dt_t, u_t, B_t, C_t in zip(dt.unbind(1), u_.unbind(1), B_.unbind(1), C_.unbind(1)):
        dA_t = torch.exp(dt_t.unsqueeze(-1) * A_)  # (b, d, n): Ā_t
        dBu_t = (dt_t * u_t).unsqueeze(-1) * B_t.unsqueeze(1)  # (b, d, n): B̄_t u_t = Δ_t B_t u_t
        h = dA_t * h + dBu_t
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    y = torch.stack(ys, dim=1) if ys else u_.new_zeros(b, 0, d)  # (b, l, d)
    if D is not None:
        y = y + u_ * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(out_dtype)
    return (y, h) if return_final_state else y


def selective_state_update_ref(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """One step of the scan for decoding. state (b, d, n) is updated in place; u, delta, z: (b, d);
    B, C: (b, n). Returns y (b, d) in u's dtype."""
    acc = compute_dtype(state)
    dt = _discretize_dt(delta, delta_bias, delta_softplus).to(acc)  # (b, d)
    u_ = u.to(acc)
    dA = torch.exp(dt.unsqueeze(-1) * A.to(acc))  # (b, d, n)
    dBu = (dt * u_).unsqueeze(-1) * B.to(acc).unsqueeze(1)  # (b, d, n)
    h = dA * state.to(acc) + dBu
    state.copy_(h)
    y = torch.einsum("bdn,bn->bd", h, C.to(acc))
    if D is not None:
        y = y + u_ * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(u.dtype)


# ------------------------------------------------------------------------------------------ the conv
def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    activation: str | None = None,
):
    """Reference conv: x (b, l, d), weight (d, w), bias (d,), initial_state (b, d, w−1). y (b, l, d) in x's
    dtype; with `return_final_state` also the state for the next call (`conv_final_state`)."""
    b, l, d = x.shape
    w = weight.shape[1]
    acc = compute_dtype(x)
    init = initial_state if initial_state is not None else x.new_zeros(b, d, w - 1)
    xp = torch.cat([init.to(acc), x.to(acc).transpose(1, 2)], dim=-1)  # (b, d, w−1+l)
    y = F.conv1d(xp, weight.to(acc).unsqueeze(1), None if bias is None else bias.to(acc), groups=d)  # (b, d, l)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    y = y.transpose(1, 2).to(x.dtype)  # (b, l, d)
    return (y, conv_final_state(x, initial_state, w)) if return_final_state else y


def causal_conv1d_update_ref(
    conv_state: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """One step: conv_state (b, d, w−1) holds the previous inputs and is shifted in place; x, y: (b, d)."""
    acc = compute_dtype(x)
    window = torch.cat([conv_state.to(acc), x.to(acc).unsqueeze(-1)], dim=-1)  # (b, d, w)
    y = (window * weight.to(acc)).sum(-1)
    if bias is not None:
        y = y + bias.to(acc)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    conv_state.copy_(window[..., 1:])
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------- SSD (Mamba-2)
# Dimensions (Mamba-2, Dao & Gu 2024, "Transformers are SSMs"): b batch, l length, h heads, p head dim,
# g groups of heads sharing B and C (head i uses group i // (h // g)), n state size.
#
#     Δ_t = clamp(softplus(dt_t + dt_bias), dt_limit)     (softplus and clamp optional, in this order)
#     h_t = exp(Δ_t·A) · h_{t−1} + Δ_t · x_t B_tᵀ          h: (b, h, p, n); A one negative scalar per head
#     y_t = h_t C_t + D ⊙ x_t                              then y_t ← y_t · silu(z_t) if z is given
#
# With seq_idx (packed sequences) the state is reset to zero wherever seq_idx changes; the initial state
# belongs to seq_idx 0 (a row whose first token has another index starts from zero), as in the official
# `mamba_chunk_scan_combined`.
def ssd_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]) -> Tensor:
    """Δ (…, h) in float32 or wider, in the official order: + dt_bias, softplus, clamp to dt_limit. The clamp is
    skipped at the default (0, inf), as the official op does, so negative dt keeps its gradient there."""
    out = dt.float() if dt.dtype in (torch.float16, torch.bfloat16) else dt
    if dt_bias is not None:
        out = out + dt_bias.to(out.dtype)
    if dt_softplus:
        out = F.softplus(out)  # threshold 20 (softplus(v) = v above it), as the official kernels
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if (lo, hi) != (0.0, float("inf")):
        out = out.clamp(min=lo, max=hi)
    return out


def _per_channel_D(D: Tensor, p: int) -> Tensor:
    """D (h,) or (h, p) as (h, p), the shape that multiplies x (…, h, p)."""
    return D.unsqueeze(-1).expand(-1, p) if D.dim() == 1 else D


def ssd_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 256,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    return_final_states: bool = False,
    cu_seqlens: Tensor | None = None,
    return_varlen_states: bool = False,
):
    """Reference SSD: the sequential recurrence, one token at a time. x, z: (b, l, h, p); dt: (b, l, h); A: (h,);
    B, C: (b, l, g, n); D: (h,) or (h, p); dt_bias: (h,); initial_states: (b, h, p, n); seq_idx: (b, l) int.
    chunk_size is the chunked kernels' block length: the result does not depend on it, so it is ignored here.
    Returns y (b, l, h, p) in x's dtype, and the final states (b, h, p, n) in float32 (float64 for float64
    inputs) with `return_final_states`: the state after each row's last token. With `return_varlen_states`
    (b = 1, cu_seqlens (m + 1,) the sequences' boundaries, seq_idx the matching indices): also the state after
    each sequence's last token, (m, h, p, n) (`varlen_initial` for an empty one). Results in the order
    y, then the final states if asked, then the varlen states if asked."""
    acc = compute_dtype(x)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    delta = ssd_dt(dt, dt_bias, dt_softplus, dt_limit).to(acc)  # (b, l, h)
    x_ = x.to(acc)
    # Each head reads its group's B and C: repeat the groups over their h // g heads, group-major.
    B_ = B.to(acc).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    C_ = C.to(acc).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    A_ = A.to(acc)
    state = initial_states.to(acc) if initial_states is not None else x_.new_zeros(b, h, p, n)
    if seq_idx is not None:
        # keep_t = 0 where a new sequence starts; the token before t = 0 counts as seq_idx 0
        prev = torch.cat([seq_idx.new_zeros(b, 1), seq_idx[:, :-1]], dim=1)
        keep = (seq_idx == prev).to(acc).unbind(1)  # l × (b,)
    else:
        keep = [None] * l
    # varlen: the sequences ending after each step t (their last token is t)
    ends: dict[int, list[int]] = {}
    varlen = []
    if return_varlen_states:
        cu = [int(v) for v in cu_seqlens.tolist()]
        varlen = [varlen_initial(i, cu, initial_states, (h, p, n), x_) for i in range(len(cu) - 1)]
        for i in range(len(cu) - 1):
            if cu[i + 1] > cu[i]:
                ends.setdefault(cu[i + 1] - 1, []).append(i)
    ys = []
    for t, (d_t, x_t, B_t, C_t, k_t) in enumerate(zip(delta.unbind(1), x_.unbind(1), B_.unbind(1), C_.unbind(1),
                                                      keep)):
        decay = torch.exp(d_t * A_)  # (b, h)
        if k_t is not None:
            decay = decay * k_t.unsqueeze(-1)
        upd = (d_t.unsqueeze(-1) * x_t).unsqueeze(-1) * B_t.unsqueeze(2)  # (b, h, p, n): Δ_t x_t B_tᵀ
        state = decay[..., None, None] * state + upd
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C_t))
        for i in ends.get(t, ()):
            varlen[i] = state[0]
    y = torch.stack(ys, dim=1) if ys else x_.new_zeros(b, 0, h, p)  # (b, l, h, p)
    if D is not None:
        y = y + x_ * _per_channel_D(D.to(acc), p)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(x.dtype)
    return ssd_results(y, state, torch.stack(varlen) if return_varlen_states else None, return_final_states)


def ssd_results(y: Tensor, final: Tensor, varlen: Tensor | None, return_final_states: bool):
    """The SSD ops' results in the official order: y, then the final states if asked for, then the varlen states
    if asked for (varlen not None)."""
    out = (y,) + ((final,) if return_final_states else ()) + ((varlen,) if varlen is not None else ())
    return out if len(out) > 1 else y


def varlen_initial(i: int, cu: list[int], initial_states: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The state sequence i of cu_seqlens starts from (and keeps, if it is empty): initial_states for the first
    one (the state before the first token counts as sequence 0), zeros for the others."""
    if i == 0 and initial_states is not None:
        return initial_states[0].to(like.dtype)
    return like.new_zeros(shape)


def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, l: int) -> Tensor:
    """(1, l) int64: the index i of the sequence each token belongs to, cu_seqlens[i] <= t < cu_seqlens[i + 1]
    (empty sequences own no token, so their indices are skipped)."""
    t = torch.arange(l, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64).contiguous(), t, right=True).unsqueeze(0)


def ssd_state_update_ref(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> Tensor:
    """One SSD step for decoding. state (b, h, p, n) is updated in place; x, z: (b, h, p); dt: (b, h);
    B, C: (b, g, n). Returns y (b, h, p) in x's dtype."""
    acc = compute_dtype(state)
    h, p = x.shape[1], x.shape[2]
    g = B.shape[1]
    delta = ssd_dt(dt, dt_bias, dt_softplus, dt_limit).to(acc)  # (b, h)
    x_ = x.to(acc)
    B_ = B.to(acc).repeat_interleave(h // g, dim=1)  # (b, h, n)
    C_ = C.to(acc).repeat_interleave(h // g, dim=1)  # (b, h, n)
    decay = torch.exp(delta * A.to(acc))  # (b, h)
    new = decay[..., None, None] * state.to(acc) + (delta.unsqueeze(-1) * x_).unsqueeze(-1) * B_.unsqueeze(2)
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, C_)
    if D is not None:
        y = y + x_ * _per_channel_D(D.to(acc), p)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)
