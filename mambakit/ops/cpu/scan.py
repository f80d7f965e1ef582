"""The fused selective scan on CPU: numba kernels for forward and backward, their autograd Function, and the
decoding step. The entry points trust their arguments: only mambakit.ops calls them, after checking.

The paper's hardware-aware algorithm (Section 3.3.2) keeps the expanded state (b, l, d, n) out of slow memory:
it loads Δ, A, B, C, discretises, scans and reads out y in fast memory, and recomputes states in the backward
pass. On a CPU "fast memory" is registers and L1/L2, and the same plan reads:

- Work is split into tasks of (one sequence) × (a block of BLOCK contiguous channels); tasks are independent
  (the recurrence is diagonal in d), so they run in parallel threads with no synchronisation.
- A task keeps its state block h (n, BLOCK) in L1 and walks the sequence once. It gathers delta/u/z for its
  channels (contiguous in the time-major layout) TILE steps at a time, so the strided rows' cache misses
  overlap, and every inner loop runs over contiguous channels, which LLVM vectorises (16 float32 lanes with
  AVX-512). Ā = exp(ΔA) is 2^(Δ·A·log2 e) by a polynomial (see primitives.py), so it vectorises too. softplus,
  the D skip and the SiLU(z) gate are fused into the same pass: the only tensors written are y (b, l, d) and
  the final state.
- For the backward, the forward also writes the state at every CHUNK-th step (b, l/CHUNK, n, d): 1/CHUNK of
  the (b, l, d, n) tensor. The backward walks chunks from last to first, recomputes the chunk's states (and
  keeps their Ā) from its checkpoint into per-task buffers (CHUNK + 1, n, BLOCK) that stay in L2, then runs
  the adjoint recurrence g_{t−1} = Ā_t ⊙ (g_t + C_t dy_t) backwards through them.
- dB and dC sum over channels, i.e. across tasks: each task writes its own partial (b, tasks, l, n) and torch
  sums them. dA, dD, d(delta_bias) sum over time within a task and over sequences in torch.

Kernels compute in float32 (float64 when given float64, for gradcheck); bfloat16/float16 inputs are
converted on the way in and gradients converted back, as the official kernels accumulate in float32.
The decoding step (selective_state_update_cpu) is at the end of the file.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from ..reference import compute_dtype
from .primitives import (fexp, fexp2, fma, halve, kernel_options, kernel_tensor, narrow, owned, records_grad,
                         set_threads, sigmoid, softplus, widen)

BLOCK = 128  # channels per task: 8 AVX-512 vectors of float32; the state block is n·128·4 bytes
assert BLOCK == 128, "the backward sums a block's channels by halving 64, 32, …, 1 (primitives.halve)"
LOG2E = 1.4426950408889634
TILE = 16  # the forward gathers inputs TILE steps at a time
PARALLEL_STEP_UPDATES = 1 << 17  # a decoding step this large (b·d·n) is worth waking the thread pool for
CHUNK_BYTES = 1 << 18  # the backward's per-task buffers of states and Ā, (CHUNK, n, BLOCK) each, about this size


def chunk_len(n: int, itemsize: int) -> int:
    """Steps between state checkpoints: as many as fit the backward's buffer in L2, within [8, 256]."""
    return int(min(256, max(8, CHUNK_BYTES // (n * BLOCK * itemsize))))


# -------------------------------------------------------------------------------------------------- kernels
@njit(**kernel_options())
def _scan_fwd_kernel(u, delta, At2, B, C, D, z, bias, h0, has_z, use_softplus, chunk, ckpt, y, hT):
    """u, delta, z, y: (b, l, d); At2: (n, d), A transposed and scaled by log2(e) (exp(ΔA) = 2^(Δ·At2));
    B, C: (b, l, n); D, bias: (d,);
    h0, hT: (b, n, d); ckpt: (b, ceil(l/chunk), n, d) or empty (then no checkpoints are written).
    At2, D, bias, h0, hT, ckpt are in the compute dtype (float32/64); u, delta, B, C, z, y either in it too or
    all bfloat16 bits (int16), widened on load and rounded on store (see primitives.widen/narrow)."""
    b, l, d = u.shape
    n = At2.shape[0]
    kd = At2.dtype
    nblk = (d + BLOCK - 1) // BLOCK
    save = ckpt.shape[0] > 0
    for task in prange(b * nblk):
        bi = task // nblk
        d0 = (task % nblk) * BLOCK
        w = min(BLOCK, d - d0)
        # Local buffers are BLOCK wide whatever w is (lanes past w stay 0): the hot loops then have a
        # constant trip count, which LLVM unrolls into whole vectors with no remainder loop.
        h = np.zeros((n, BLOCK), dtype=kd)  # the state block, (n, channels)
        A2_blk = np.zeros((n, BLOCK), dtype=kd)
        du = np.zeros(BLOCK, dtype=kd)
        acc = np.zeros(BLOCK, dtype=kd)  # y for this step
        bias_blk = np.zeros(BLOCK, dtype=kd)
        D_blk = np.zeros(BLOCK, dtype=kd)
        dts = np.zeros((TILE, BLOCK), dtype=kd)  # a tile of Δ, u, z, y rows
        us = np.zeros((TILE, BLOCK), dtype=kd)
        zs = np.zeros((TILE, BLOCK), dtype=kd)
        ys = np.zeros((TILE, BLOCK), dtype=kd)
        for j in range(w):
            bias_blk[j] = bias[d0 + j]
            D_blk[j] = D[d0 + j]
        for s in range(n):
            for j in range(w):
                h[s, j] = h0[bi, s, d0 + j]
                A2_blk[s, j] = At2[s, d0 + j]
        for t0 in range(0, l, TILE):
            nt = min(TILE, l - t0)
            # Gather a tile of steps first: TILE strided rows per input, loaded back to back, so their cache
            # misses overlap instead of stalling each step (rows are d apart: one page per row at large d).
            for k in range(nt):
                for j in range(w):
                    dts[k, j] = widen(delta[bi, t0 + k, d0 + j])
                    us[k, j] = widen(u[bi, t0 + k, d0 + j])
                if has_z:
                    for j in range(w):
                        zs[k, j] = widen(z[bi, t0 + k, d0 + j])
            for k in range(nt):  # discretise the whole tile, BLOCK wide: branch-free, whole vectors
                if use_softplus:
                    for j in range(BLOCK):
                        dts[k, j] = softplus(dts[k, j] + bias_blk[j])
                else:
                    for j in range(BLOCK):
                        dts[k, j] = dts[k, j] + bias_blk[j]
            for k in range(nt):
                t = t0 + k
                if save and t % chunk == 0:
                    for s in range(n):
                        for j in range(w):
                            ckpt[bi, t // chunk, s, d0 + j] = h[s, j]
                for j in range(BLOCK):
                    du[j] = dts[k, j] * us[k, j]
                    acc[j] = D_blk[j] * us[k, j]  # the D skip
                for s in range(n):
                    bs = widen(B[bi, t, s])
                    cs = widen(C[bi, t, s])
                    for j in range(BLOCK):
                        hv = fma(fexp2(dts[k, j] * A2_blk[s, j]), h[s, j], du[j] * bs)  # Ā h + B̄ u
                        h[s, j] = hv
                        acc[j] = fma(hv, cs, acc[j])
                if has_z:
                    for j in range(BLOCK):
                        acc[j] = acc[j] * zs[k, j] * sigmoid(zs[k, j])
                for j in range(BLOCK):
                    ys[k, j] = acc[j]
            for k in range(nt):
                for j in range(w):
                    y[bi, t0 + k, d0 + j] = narrow(ys[k, j], y)
        for s in range(n):
            for j in range(w):
                hT[bi, s, d0 + j] = h[s, j]


@njit(**kernel_options())
def _scan_bwd_kernel(
    u, delta, At, At2, B, C, D, z, bias, has_z, use_softplus, chunk, ckpt, dy, dhT,
    du_out, ddelta_out, dz_out, dB_part, dC_part, dA_part, dD_part, dbias_part, dh0,
):  # fmt: skip
    """Adjoint of _scan_fwd_kernel. dy, du_out, ddelta_out, dz_out: (b, l, d); dhT, dh0, dA_part: (b, n, d);
    dB_part, dC_part: (b, tasks per sequence, l, n); dD_part, dbias_part: (b, d)."""
    b, l, d = u.shape
    n = At.shape[0]
    nblk = (d + BLOCK - 1) // BLOCK
    nch = (l + chunk - 1) // chunk
    for task in prange(b * nblk):
        bi = task // nblk
        blk = task % nblk
        d0 = blk * BLOCK
        w = min(BLOCK, d - d0)
        # BLOCK-wide local buffers, lanes past w kept at 0 (see the forward kernel)
        g = np.zeros((n, BLOCK), dtype=u.dtype)  # adjoint state ∂L/∂h_t, (n, channels)
        A_blk = np.zeros((n, BLOCK), dtype=u.dtype)
        A2_blk = np.zeros((n, BLOCK), dtype=u.dtype)
        gA = np.zeros((n, BLOCK), dtype=u.dtype)
        hs = np.zeros((chunk + 1, n, BLOCK), dtype=u.dtype)  # hs[k] = state before step t0 + k
        As = np.zeros((chunk, n, BLOCK), dtype=u.dtype)  # As[k] = Ā of step t0 + k, kept from the recompute
        dts = np.zeros((chunk, BLOCK), dtype=u.dtype)  # Δ of the chunk's steps
        xs = np.zeros((chunk, BLOCK), dtype=u.dtype)  # delta + bias of the chunk's steps
        us = np.zeros((chunk, BLOCK), dtype=u.dtype)  # u of the chunk's steps
        bias_blk = np.zeros(BLOCK, dtype=u.dtype)
        D_blk = np.zeros(BLOCK, dtype=u.dtype)
        dus = np.zeros((chunk, BLOCK), dtype=u.dtype)  # Δ·u of the chunk's steps
        pc = np.zeros(BLOCK, dtype=u.dtype)  # a step's terms of dC_t[s] and dB_t[s], summed by `halve`
        pb = np.zeros(BLOCK, dtype=u.dtype)
        dyv = np.zeros(BLOCK, dtype=u.dtype)
        zv = np.zeros(BLOCK, dtype=u.dtype)
        dux = np.zeros(BLOCK, dtype=u.dtype)
        ddt = np.zeros(BLOCK, dtype=u.dtype)
        ysum = np.zeros(BLOCK, dtype=u.dtype)
        gD = np.zeros(BLOCK, dtype=u.dtype)
        gbias = np.zeros(BLOCK, dtype=u.dtype)
        for j in range(w):
            bias_blk[j] = bias[d0 + j]
            D_blk[j] = D[d0 + j]
        for s in range(n):
            for j in range(w):
                g[s, j] = dhT[bi, s, d0 + j]
                A_blk[s, j] = At[s, d0 + j]
                A2_blk[s, j] = At2[s, d0 + j]
        for c in range(nch - 1, -1, -1):
            t0 = c * chunk
            t1 = min(l, t0 + chunk)
            # recompute the chunk's states from its checkpoint (paper §3.3.2: recomputation, not storage)
            for s in range(n):
                for j in range(w):
                    hs[0, s, j] = ckpt[bi, c, s, d0 + j]
            for t in range(t0, t1):
                k = t - t0
                for j in range(w):
                    xs[k, j] = delta[bi, t, d0 + j]
                    us[k, j] = u[bi, t, d0 + j]
                for j in range(BLOCK):
                    xs[k, j] += bias_blk[j]
                if use_softplus:
                    for j in range(BLOCK):
                        dts[k, j] = softplus(xs[k, j])
                else:
                    for j in range(BLOCK):
                        dts[k, j] = xs[k, j]
                for j in range(BLOCK):
                    dus[k, j] = dts[k, j] * us[k, j]
                for s in range(n):
                    bs = B[bi, t, s]
                    for j in range(BLOCK):
                        a = fexp2(dts[k, j] * A2_blk[s, j])
                        As[k, s, j] = a
                        hs[k + 1, s, j] = fma(a, hs[k, s, j], dus[k, j] * bs)  # as the forward rounds it
            # the adjoint recurrence, last step first
            for t in range(t1 - 1, t0 - 1, -1):
                k = t - t0
                for j in range(w):
                    dyv[j] = dy[bi, t, d0 + j]
                if has_z:  # y = (C·h + D·u)·silu(z): recompute the pre-gate output for dz
                    for j in range(w):
                        zv[j] = z[bi, t, d0 + j]
                    for j in range(BLOCK):
                        ysum[j] = D_blk[j] * us[k, j]
                    for s in range(n):
                        cs = C[bi, t, s]
                        for j in range(BLOCK):
                            ysum[j] = fma(hs[k + 1, s, j], cs, ysum[j])
                    for j in range(BLOCK):
                        sg = sigmoid(zv[j])
                        ysum[j] = dyv[j] * ysum[j] * sg * (1 + zv[j] * (1 - sg))  # now dz
                        dyv[j] = dyv[j] * zv[j] * sg
                    for j in range(w):
                        dz_out[bi, t, d0 + j] = ysum[j]
                for j in range(BLOCK):
                    gD[j] = fma(dyv[j], us[k, j], gD[j])
                    dux[j] = dyv[j] * D_blk[j]
                    ddt[j] = 0
                for s in range(n):
                    bs = B[bi, t, s]
                    cs = C[bi, t, s]
                    for j in range(BLOCK):
                        dtv = dts[k, j]
                        a = As[k, s, j]
                        ahp = a * hs[k, s, j]  # Ā h_{t−1}
                        gv = fma(cs, dyv[j], g[s, j])  # ∂L/∂h_t, with y_t's own contribution
                        pc[j] = dyv[j] * hs[k + 1, s, j]
                        pb[j] = gv * dus[k, j]
                        ddt[j] = fma(gv, fma(A_blk[s, j], ahp, bs * us[k, j]), ddt[j])
                        dux[j] = fma(gv * dtv, bs, dux[j])
                        gA[s, j] = fma(gv * dtv, ahp, gA[s, j])
                        g[s, j] = gv * a  # ∂L/∂h_{t−1} through h_t = Ā_t h_{t−1} + …
                    # dC_t[s], dB_t[s]: sums over the block's channels, pairwise in a fixed order
                    halve(pc, 64), halve(pc, 32), halve(pc, 16), halve(pc, 8), halve(pc, 4), halve(pc, 2), halve(pc, 1)
                    halve(pb, 64), halve(pb, 32), halve(pb, 16), halve(pb, 8), halve(pb, 4), halve(pb, 2), halve(pb, 1)
                    dC_part[bi, blk, t, s] = pc[0]
                    dB_part[bi, blk, t, s] = pb[0]
                if use_softplus:  # dsoftplus(x)/dx = sigmoid(x)
                    for j in range(BLOCK):
                        ddt[j] = ddt[j] * sigmoid(xs[k, j])
                for j in range(BLOCK):
                    gbias[j] += ddt[j]
                for j in range(w):
                    ddelta_out[bi, t, d0 + j] = ddt[j]
                    du_out[bi, t, d0 + j] = dux[j]
        for s in range(n):
            for j in range(w):
                dh0[bi, s, d0 + j] = g[s, j]
                dA_part[bi, s, d0 + j] = gA[s, j]
        for j in range(w):
            dD_part[bi, d0 + j] = gD[j]
            dbias_part[bi, d0 + j] = gbias[j]


# -------------------------------------------------------------------------------------------- the wrappers
def _np(x: Tensor) -> np.ndarray:
    return x.detach().numpy()


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, need_grad):
        # need_grad: records_grad(...) of the inputs, from the caller (see records_grad)
        kd = compute_dtype(u)
        b, l, d = u.shape
        n = A.shape[1]

        def prep(x):  # the kernel's dtype, contiguous
            return kernel_tensor(x, kd)

        # All-bfloat16 inputs (a bf16 model) go to the kernel as their bits, read and written in place of a
        # float32 copy of u, Δ, z, B, C and of y (one pass over memory each way fewer); anything else is
        # converted to the compute dtype first.
        streams = (u, delta, B, C) + ((z,) if z is not None else ())
        bits = all(x.dtype == torch.bfloat16 for x in streams)
        if bits:
            def kernel_in(x):
                return x.detach().contiguous().view(torch.int16)

            y = torch.empty(b, l, d, dtype=torch.bfloat16)
            y_out = y.view(torch.int16)
        else:
            kernel_in = prep
            y = y_out = torch.empty(b, l, d, dtype=kd)
        zeros = torch.zeros(d, dtype=kd)
        At = owned(A, kd).t().contiguous()  # (n, d): rows of A over contiguous channels
        At2 = At * LOG2E  # exp(Δ·A) = 2^(Δ·A·log2 e)
        D_ = owned(D, kd) if D is not None else zeros
        bias_ = owned(delta_bias, kd) if delta_bias is not None else zeros
        u_k, delta_k, B_k, C_k = kernel_in(u), kernel_in(delta), kernel_in(B), kernel_in(C)
        z_k = kernel_in(z) if z is not None else u_k[:1, :1, :1]  # not read when there is no z
        h0 = (
            initial_state.detach().to(kd).transpose(1, 2).contiguous()  # (b, n, d)
            if initial_state is not None
            else torch.zeros(b, n, d, dtype=kd)
        )
        chunk = chunk_len(n, zeros.element_size())
        ckpt = torch.empty((b, -(-l // chunk), n, d) if need_grad else (0, 0, 0, 0), dtype=kd)
        hT = torch.empty(b, n, d, dtype=kd)
        set_threads()
        _scan_fwd_kernel(
            _np(u_k), _np(delta_k), _np(At2), _np(B_k), _np(C_k), _np(D_), _np(z_k),
            _np(bias_), _np(h0), z is not None, bool(delta_softplus), chunk, _np(ckpt), _np(y_out), _np(hT),
        )  # fmt: skip
        if need_grad:
            # the backward kernel reads the compute dtype
            saved = (u_k, delta_k, B_k, C_k, z_k) if not bits else tuple(map(prep, (u, delta, B, C))) + (
                prep(z) if z is not None else torch.empty(1, 1, 1, dtype=kd),)
            u_, delta_, B_, C_, z_ = saved
            ctx.save_for_backward(u_, delta_, At, At2, B_, C_, D_, z_, bias_, ckpt)
            ctx.meta = (chunk, z is not None, bool(delta_softplus), D is not None, delta_bias is not None)
            ctx.dtypes = tuple(None if x is None else x.dtype for x in (u, delta, A, B, C, D, z, delta_bias, initial_state))
        return y.to(u.dtype), hT.transpose(1, 2)  # final state (b, d, n)

    @staticmethod
    def backward(ctx, dy, dhT):
        u_, delta_, At, At2, B_, C_, D_, z_, bias_, ckpt = ctx.saved_tensors
        chunk, has_z, use_softplus, has_D, has_bias = ctx.meta
        kd = u_.dtype
        b, l, d = u_.shape
        n = At.shape[0]
        nblk = -(-d // BLOCK)
        dy_ = dy.to(kd).contiguous() if dy is not None else torch.zeros_like(u_)
        dhT_ = dhT.to(kd).transpose(1, 2).contiguous() if dhT is not None else u_.new_zeros(b, n, d)
        du = torch.empty_like(u_)
        ddelta = torch.empty_like(u_)
        dz = torch.empty_like(u_) if has_z else u_.new_empty(1, 1, 1)
        dB_part = u_.new_empty(b, nblk, l, n)
        dC_part = u_.new_empty(b, nblk, l, n)
        dA_part = u_.new_empty(b, n, d)
        dD_part = u_.new_empty(b, d)
        dbias_part = u_.new_empty(b, d)
        dh0 = u_.new_empty(b, n, d)
        set_threads()
        _scan_bwd_kernel(
            _np(u_), _np(delta_), _np(At), _np(At2), _np(B_), _np(C_), _np(D_), _np(z_), _np(bias_), has_z, use_softplus,
            chunk, _np(ckpt), _np(dy_), _np(dhT_), _np(du), _np(ddelta), _np(dz), _np(dB_part), _np(dC_part),
            _np(dA_part), _np(dD_part), _np(dbias_part), _np(dh0),
        )  # fmt: skip
        t_u, t_delta, t_A, t_B, t_C, t_D, t_z, t_bias, t_h0 = ctx.dtypes

        def out(x, dtype, needed):
            return x.to(dtype) if needed else None

        need = ctx.needs_input_grad
        return (
            out(du, t_u, need[0]),
            out(ddelta, t_delta, need[1]),
            out(dA_part.sum(0).t(), t_A, need[2]),  # (d, n)
            out(dB_part.sum(1), t_B, need[3]),  # (b, l, n)
            out(dC_part.sum(1), t_C, need[4]),
            out(dD_part.sum(0), t_D, has_D and need[5]),
            out(dz, t_z, has_z and need[6]),
            out(dbias_part.sum(0), t_bias, has_bias and need[7]),
            None,
            out(dh0.transpose(1, 2), t_h0, t_h0 is not None and need[9]),  # (b, d, n)
            None,
        )


def selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state):
    """The fused CPU selective scan of checked arguments (mambakit.ops.selective_scan); results as
    selective_scan_ref."""
    need_grad = records_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    y, h = _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, need_grad)
    return (y, h) if return_final_state else y


# ---------------------------------------------------------------------------------------- the decoding step
@njit(inline="always", **kernel_options(parallel=False))
def _state_update_row(state, u, delta, A, B, C, D, z, bias, has_z, use_softplus, y, bi):
    """One step of sequence bi, in place: Δ and the gate vectorised over channels, the update over states."""
    d, n = A.shape
    dt = np.empty(d, dtype=state.dtype)
    for j in range(d):
        dt[j] = delta[bi, j] + bias[j]
    if use_softplus:
        for j in range(d):
            dt[j] = softplus(dt[j])
    for j in range(d):
        dtj = dt[j]
        du = dtj * u[bi, j]
        acc = D[j] * u[bi, j]
        for s in range(n):
            hv = fma(fexp(dtj * A[j, s]), state[bi, j, s], du * B[bi, s])
            state[bi, j, s] = hv
            acc = fma(hv, C[bi, s], acc)
        y[bi, j] = acc
    if has_z:
        for j in range(d):
            y[bi, j] = y[bi, j] * z[bi, j] * sigmoid(z[bi, j])


@njit(**kernel_options())
def _state_update_kernel(state, u, delta, A, B, C, D, z, bias, has_z, use_softplus, y):
    """One step, in place, sequences in parallel. state: (b, d, n); u, delta, z, y: (b, d); A: (d, n);
    B, C: (b, n); D, bias: (d,)."""
    for bi in prange(state.shape[0]):
        _state_update_row(state, u, delta, A, B, C, D, z, bias, has_z, use_softplus, y, bi)


@njit(**kernel_options(parallel=False))
def _state_update_kernel_serial(state, u, delta, A, B, C, D, z, bias, has_z, use_softplus, y):
    """_state_update_kernel in the calling thread, for small steps: waking a thread pool would cost more."""
    for bi in range(state.shape[0]):
        _state_update_row(state, u, delta, A, B, C, D, z, bias, has_z, use_softplus, y, bi)


def selective_state_update_cpu(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The fused decoding step of checked arguments (mambakit.ops.selective_state_update); results as
    selective_state_update_ref. Called once per layer and token: tensors already in the kernel's dtype and
    layout are passed without a copy, and a float32 (float64) contiguous state is updated in place; any other
    state goes through a copy."""
    kd = compute_dtype(state)
    b, d, n = state.shape

    def prep(x):
        return _np(kernel_tensor(x, kd))

    st = kernel_tensor(state, kd)
    u_ = kernel_tensor(u, kd)
    zeros = u_.new_zeros(d) if D is None or delta_bias is None else None
    y = torch.empty_like(u_)
    kernel = _state_update_kernel if b * d * n >= PARALLEL_STEP_UPDATES else _state_update_kernel_serial
    set_threads()
    kernel(
        _np(st), _np(u_), prep(delta), prep(A), prep(B), prep(C), prep(D) if D is not None else _np(zeros),
        prep(z) if z is not None else _np(u_), prep(delta_bias) if delta_bias is not None else _np(zeros),
        z is not None, bool(delta_softplus), _np(y),
    )  # fmt: skip
    if st.data_ptr() != state.data_ptr():
        state.copy_(st)
    return y.to(u.dtype)
