"""One SSD decoding step on CPU (Mamba-2's `selective_state_update`) in one numba kernel.

Why: a decoding step reads and writes the whole state, (b, h, p, n) float32 a layer (768 KiB a sequence at the
130m shape), and the torch version (ssd.py `ssd_state_update_cpu`) passes over it three times (decay, outer
product, read-out). Here one task per (row, head) passes once: for each of the head's p channels,
    h ← exp(Δ·A)·h + (Δ·x)·B,   y = h·C + D·x,   y ← y·silu(z),
with h·C summed over n in 16 partial sums (lanes) added in a fixed order at the end: the lanes vectorise
without reassociation, and the order does not depend on the machine or on the thread count.
The reference twin is `reference.ssd_state_update_ref`; tests compare the two.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from ..reference import _per_channel_D, ssd_dt
from .primitives import fexp, kernel_options, kernel_tensor, set_threads, sigmoid

_F32 = np.float32
LANES = 16  # partial sums of h·C: one AVX-512 register of float32


@njit(**kernel_options())
def _step(state, x, delta, A, B, C, Dm, has_D, z, has_z, y):
    """state (b, h, p, n) updated in place; x, z, y (b, h, p); delta (b, h); A (h,); B, C (b, g, n); Dm (h, p)."""
    b, h, p, n = state.shape
    g = B.shape[1]
    hg = h // g
    n_lanes = n - n % LANES
    for task in prange(b * h):
        bb = task // h
        hh = task - bb * h
        gg = hh // hg
        d = delta[bb, hh]
        decay = fexp(d * A[hh])
        part = np.empty(LANES, dtype=np.float32)
        for i in range(p):
            dx = d * x[bb, hh, i]
            for q in range(LANES):
                part[q] = _F32(0.0)
            for j0 in range(0, n_lanes, LANES):
                for q in range(LANES):
                    v = state[bb, hh, i, j0 + q] * decay + dx * B[bb, gg, j0 + q]
                    state[bb, hh, i, j0 + q] = v
                    part[q] += v * C[bb, gg, j0 + q]
            for j in range(n_lanes, n):  # n not a multiple of LANES: the rest into lane 0
                v = state[bb, hh, i, j] * decay + dx * B[bb, gg, j]
                state[bb, hh, i, j] = v
                part[0] += v * C[bb, gg, j]
            width = LANES  # fixed-order pairwise sum of the lanes
            while width > 1:
                width //= 2
                for q in range(width):
                    part[q] += part[q + width]
            out = part[0]
            if has_D:
                out += Dm[hh, i] * x[bb, hh, i]
            if has_z:
                zi = z[bb, hh, i]
                out *= zi * sigmoid(zi)
            y[bb, hh, i] = out


def ssd_state_update_fused(
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
    """`reference.ssd_state_update_ref` for CPU tensors with a float32 state: the same arguments and result."""
    f32 = torch.float32
    b, h, p = x.shape
    delta = ssd_dt(dt.detach(), None if dt_bias is None else dt_bias.detach(), dt_softplus, dt_limit).to(f32).contiguous()  # (b, h)
    x32 = x.detach().to(f32).contiguous()
    Dm = _per_channel_D(D.detach().to(f32), p).contiguous() if D is not None else torch.zeros(1, 1)  # (h, p)
    z32 = z.detach().to(f32).contiguous() if z is not None else torch.zeros(1, 1, 1)
    work = kernel_tensor(state, f32)  # the state's own memory when it is contiguous float32
    y = torch.empty(b, h, p, dtype=f32)
    set_threads()
    _step(work.numpy(), x32.numpy(), delta.numpy(), A.detach().to(f32).contiguous().numpy(),
          B.detach().to(f32).contiguous().numpy(), C.detach().to(f32).contiguous().numpy(), Dm.numpy(),
          D is not None, z32.numpy(), z is not None, y.numpy())
    if work.data_ptr() != state.data_ptr():
        state.copy_(work)
    return y.to(x.dtype)
