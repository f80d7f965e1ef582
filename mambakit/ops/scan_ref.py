"""The selective scan, as the paper writes it: the readable specification every fast kernel is tested against.

Mamba (Gu & Dao, 2023), Section 3.2, Algorithm 2, with the official discretisation (Section 2, eq. 4 for Ā;
the simplified Euler step B̄ = Δ·B used by the official kernels):

    Δ_t = softplus(delta_t + delta_bias)              (or delta_t + delta_bias without softplus)
    h_t = exp(Δ_t · A) ⊙ h_{t−1} + Δ_t · B_t · u_t    h: (b, d, n)
    y_t = C_t · h_t + D · u_t                          (contracting n)
    y_t ← y_t · silu(z_t)                              (the block's output gate, fused here as in the kernels)

Sequential over time, any device and dtype (float64 included), differentiated by autograd. The time loop
iterates over `unbind` views rather than indexing one step per iteration: indexing makes autograd zero-fill a
full-size gradient per step, which turns the backward quadratic in length (see shared/peers.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32  # accumulate in fp32 at least
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
    acc = torch.float64 if state.dtype == torch.float64 else torch.float32
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
