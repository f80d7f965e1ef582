"""The selective scan on GPU: Triton kernels for forward and backward, and their autograd Function.

The paper's hardware-aware algorithm (Section 3.3.2) on a GPU: Δ, A, B, C, u are read from HBM once,
discretised, scanned and read out in SRAM/registers, and only y (b, l, d) and the final state go back. The
expanded state (b, l, d, n) never exists in HBM; the backward recomputes it.

- One program per (sequence, block of BLOCK_D channels). The recurrence is diagonal in d, so programs are
  independent. A program walks its sequence in tiles of BLOCK_T steps, carrying the state block h
  (BLOCK_D, n) in registers from tile to tile. Tile sizes: scan_config (benchmarks/gpu.py --sweep times
  alternatives).
- Inside a tile the recurrence h_t = Ā_t h_{t−1} + B̄_t u_t runs as a parallel associative scan over time
  (`tl.associative_scan`) on the pairs (Ā_t, B̄_t u_t), composed as affine maps x ↦ a·x + b. The paper's
  kernel uses the same parallel scan (Section 3.3.2, "work-efficient parallel scan algorithm"); it turns a
  chain of BLOCK_T dependent steps into log2(BLOCK_T) levels, so the GPU's threads are busy along time too.
  The tile's states are then C-contracted to y; the D skip and the SiLU(z) gate are fused. Ā = 2^(Δ·A·log2 e)
  (tl.exp2, one special-function instruction).
- The forward writes the state every CKPT_STEPS = 64 steps (every tile when tiles are longer),
  (b, l/64, d, n) in float32: a quarter of the size of u in float32 with n = 16, never (b, l, d, n).
- The backward walks checkpoint intervals last to first. Where an interval spans several tiles it first runs
  forward from the checkpoint to get each tile's start state (a small per-program scratch in global memory,
  L2-resident). Then, tile by tile backwards, it recomputes the tile's states from the start state with the
  same scan and runs the adjoint recurrence backwards in time as a second scan, with `reverse=True`:
  p_t = Ā_t (C_t dy_t + p_{t+1}), where p_t = ∂L/∂h_{t−1} through h_t. The gradient of h_t itself,
  g_t = C_t dy_t + p_{t+1}, needs the neighbour p_{t+1}: the scan carries, next to each composed map, the
  composition that leaves its own element out (an exclusive scan in the same pass), so no shift of a register
  tensor along time is needed. From h_t and g_t every gradient follows in closed form:
      dC_t = Σ_d dy_t h_t        dB_t = Σ_d g_t Δ_t u_t      du_t = Σ_n g_t Δ_t B_t + D dy_t
      dΔ_t = Σ_n g_t (A (h_t − Δ_t B_t u_t) + B_t u_t)       dA = Σ_t g_t Δ_t (h_t − Δ_t B_t u_t)
  (Ā_t h_{t−1} = h_t − B̄_t u_t, so the previous state is not needed either). dB and dC sum over channels,
  i.e. over programs: float32 atomic adds. dA, dD, d(delta_bias) are per-(sequence, channel) partial sums,
  added over sequences by torch. The final adjoint state is d(initial_state).

Everything is computed in float32; u, delta, z, B, C are read in their own dtype (float32, bfloat16, float16)
and y, du, dΔ, dz are written in it, so no converted copies are made; views whose channels are contiguous
(the model's z, B, C are column slices of its projections) are read through their strides. The decoding step
is in step.py. The entry point trusts its arguments: only mambakit.ops calls it, after checking.

Every state update costs one exp2 on the special-function units (an eighth of the FMA rate): with bf16 inputs
the exps, not memory, bound the forward (the arithmetic is in docs/kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..cpu.primitives import records_grad
from .common import LN2, LOG2E, row_ptrs, rowwise, sigmoid, softplus


# ------------------------------------------------------------------------------------ tile sizes (tunable)
# Overrides for the tile sizes below (benchmarks/gpu.py --sweep sets these to measure alternatives):
# BLOCK_T (steps per tile, shared by forward and backward: the backward recomputes from the forward's
# checkpoints), FWD_D / BWD_D (channels per program), FWD_WARPS / BWD_WARPS.
TILES: dict[str, int] = {}
PROGRAMS = 512  # enough programs for a few per SM on an H100/H200 (132 SMs)
CKPT_STEPS = 64  # the forward saves the state every CKPT_STEPS steps (or every tile, when tiles are longer)


def scan_config(b: int, l: int, d: int, n: int) -> dict:
    """Tile sizes for a scan of b sequences, d channels and n states. BLOCK_N covers n (a power of two).
    BLOCK_D = 16 channels make each row of u, Δ, z, y a 32-byte sector in bfloat16; it is halved (down to 2)
    while there would be fewer than PROGRAMS programs, so a single sequence still fills the GPU (the official
    kernel runs one channel per thread block for the same reason). A program holds (BLOCK_T, BLOCK_D,
    BLOCK_N) tiles in registers: BLOCK_T is chosen for about 2048 elements in the forward, and no longer than
    the sequence; the backward keeps more such tiles alive and takes half the channels. Both compile for sm_90
    without spilling registers (docs/kernels.md); benchmarks/gpu.py --sweep times alternatives."""
    block_n = triton.next_power_of_2(n)
    block_d = 16
    while block_d > 2 and b * triton.cdiv(d, block_d) < PROGRAMS:
        block_d //= 2
    block_d = min(block_d, triton.next_power_of_2(d))
    block_t = TILES.get("BLOCK_T", max(2, min(128, 2048 // (block_d * block_n), triton.next_power_of_2(max(l, 1)))))
    return dict(
        BLOCK_T=block_t,
        CKPT_TILES=TILES.get("CKPT_TILES", max(1, CKPT_STEPS // block_t)),
        BLOCK_N=block_n,
        FWD_D=TILES.get("FWD_D", block_d),
        BWD_D=TILES.get("BWD_D", max(1, block_d // 2)),
        FWD_WARPS=TILES.get("FWD_WARPS", 4),
        BWD_WARPS=TILES.get("BWD_WARPS", 4),
    )


# ---------------------------------------------------------------------------------------- scan helpers
@triton.jit
def _compose(a1, b1, a2, b2):
    """The affine map x ↦ a1·x + b1 followed by x ↦ a2·x + b2 (the earlier step is the left argument)."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _compose_excl(a1, b1, ea1, eb1, a2, b2, ea2, eb2):
    """_compose, plus (ea, eb): the composition of a segment without its last element (identity for a single
    element). Scanned, (ea, eb) at position t is the composition of all elements before t: an exclusive scan
    alongside the inclusive one."""
    return a1 * a2, a2 * b1 + b2, a1 * ea2, ea2 * b1 + eb2


@triton.jit
def _block(d, n, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's channels (block program_id(1) of BLOCK_D) and the states: their offsets and masks, and
    the (BLOCK_D, BLOCK_N) offsets of the block in a (d, n) matrix with their mask."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    mask_n = offs_n < n
    return offs_d, offs_n, mask_d, mask_n, offs_d[:, None] * n + offs_n[None, :], mask_d[:, None] & mask_n[None, :]


@triton.jit
def _tile(u_ptr, delta_ptr, B_ptr, A2, bias, pid_b, t, offs_d, offs_n, m_td, m_tn,
          s_u_b, s_u_l, s_dt_b, s_dt_l, s_B_b, s_B_l, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):  # fmt: skip
    """One tile's inputs, discretised: x = delta + bias (BLOCK_T, BLOCK_D), Δ, u, B (BLOCK_T, BLOCK_N), and
    Ā = 2^(Δ·A·log2 e), B̄u = Δ·B·u (BLOCK_T, BLOCK_D, BLOCK_N). Steps past l get Δ = 0, so Ā = 1 and
    B̄u = 0: the identity map, which leaves the scan's carry as it is."""
    x = tl.load(row_ptrs(delta_ptr, pid_b, t, offs_d, s_dt_b, s_dt_l), mask=m_td, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = x + bias[None, :]
    if SOFTPLUS:
        dt = softplus(x)
    else:
        dt = x
    dt = tl.where(m_td, dt, 0.0)
    uv = tl.load(row_ptrs(u_ptr, pid_b, t, offs_d, s_u_b, s_u_l), mask=m_td, other=0.0).to(tl.float32)
    Bt = tl.load(row_ptrs(B_ptr, pid_b, t, offs_n, s_B_b, s_B_l), mask=m_tn, other=0.0).to(tl.float32)
    a = tl.exp2(dt[:, :, None] * A2[None, :, :])  # (BLOCK_T, BLOCK_D, BLOCK_N): Ā_t
    bu = (dt * uv)[:, :, None] * Bt[:, None, :]  # B̄_t u_t = Δ_t B_t u_t
    return x, dt, uv, Bt, a, bu


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A2_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, hT_ptr, ckpt_ptr,
    l, d, n, n_tiles,
    s_u_b, s_u_l, s_dt_b, s_dt_l, s_z_b, s_z_l, s_B_b, s_B_l, s_C_b, s_C_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, SAVE: tl.constexpr, CKPT_TILES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """u, delta, z, y: (b, l, d); A2: (d, n) = A·log2(e); B, C: (b, l, n); D, bias: (d,); h0, hT: (b, d, n);
    ckpt: (b, ceil(n_tiles / CKPT_TILES), d, n), the state before every CKPT_TILES-th tile (written when
    SAVE). y, the states and A2 are contiguous; u, delta, z, B, C have the given (batch, time) strides and a
    contiguous last dimension."""
    pid_b = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d, offs_n, mask_d, mask_n, dn, mask_dn = _block(d, n, BLOCK_D, BLOCK_N)
    A2 = tl.load(A2_ptr + dn, mask=mask_dn, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    state_off = pid_b.to(tl.int64) * d * n + dn
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    seq = pid_b.to(tl.int64) * l  # first row of this sequence in y, (b·l, d)
    is_last = (offs_t == BLOCK_T - 1)[:, None, None]
    n_ckpt = tl.cdiv(n_tiles, CKPT_TILES)
    for i in range(n_tiles):
        if SAVE:
            if i % CKPT_TILES == 0:
                tl.store(ckpt_ptr + (pid_b.to(tl.int64) * n_ckpt + i // CKPT_TILES) * d * n + dn, h, mask=mask_dn)
        t = i * BLOCK_T + offs_t
        mask_t = t < l
        row_d = (seq + t)[:, None] * d + offs_d[None, :]  # (BLOCK_T, BLOCK_D) offsets into y
        m_td = mask_t[:, None] & mask_d[None, :]
        m_tn = mask_t[:, None] & mask_n[None, :]
        _, dt, uv, Bt, a, bu = _tile(u_ptr, delta_ptr, B_ptr, A2, bias, pid_b, t, offs_d, offs_n, m_td, m_tn,
                                     s_u_b, s_u_l, s_dt_b, s_dt_l, s_B_b, s_B_l, HAS_BIAS, SOFTPLUS)  # fmt: skip
        Ct = tl.load(row_ptrs(C_ptr, pid_b, t, offs_n, s_C_b, s_C_l), mask=m_tn, other=0.0).to(tl.float32)
        a_cum, b_cum = tl.associative_scan((a, bu), 0, _compose)  # steps t0..t composed
        hs = a_cum * h[None, :, :] + b_cum  # h_t for every step of the tile
        yv = tl.sum(hs * Ct[:, None, :], axis=2)  # (BLOCK_T, BLOCK_D): C_t · h_t
        if HAS_D:
            yv = yv + Dv[None, :] * uv
        if HAS_Z:
            zv = tl.load(row_ptrs(z_ptr, pid_b, t, offs_d, s_z_b, s_z_l), mask=m_td, other=0.0).to(tl.float32)
            yv = yv * zv * sigmoid(zv)
        tl.store(y_ptr + row_d, yv.to(y_ptr.dtype.element_ty), mask=m_td)
        h = tl.sum(tl.where(is_last, hs, 0.0), axis=0)  # the tile's last state (padding steps keep it)
    tl.store(hT_ptr + state_off, h, mask=mask_dn)


# ----------------------------------------------------------------------------------------------- backward
@triton.jit
def _tile_backward(
    u_ptr, delta_ptr, A2, A, B_ptr, C_ptr, Dv, z_ptr, bias, dy_ptr, du_ptr, ddelta_ptr, dz_ptr,
    dB_ptr, dC_ptr, start_ptr, h_ckpt, q, gA, gD, gbias, pid_b, i, l, d, n, seq,
    offs_t, offs_d, offs_n, mask_d, mask_n, mask_dn, is_first, ones, zeros,
    s_u_b, s_u_l, s_dt_b, s_dt_l, s_z_b, s_z_l, s_B_b, s_B_l, s_C_b, s_C_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FROM_SCRATCH: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Tile i of the backward: recomputes its states from its start state (start_ptr when FROM_SCRATCH, else
    h_ckpt), writes dz, du, dΔ, adds to dB, dC; returns the adjoint state before the tile and the running
    sums of dA, dD, d(delta_bias)."""
    t = i * BLOCK_T + offs_t
    mask_t = t < l
    row_d = (seq + t)[:, None] * d + offs_d[None, :]  # offsets into dy, du, ddelta, dz
    row_n = (seq + t)[:, None] * n + offs_n[None, :]  # into dB, dC
    m_td = mask_t[:, None] & mask_d[None, :]
    m_tn = mask_t[:, None] & mask_n[None, :]
    # recompute the tile's states from its start (paper §3.3.2: recomputation instead of storage)
    if FROM_SCRATCH:
        h0 = tl.load(start_ptr, mask=mask_dn, other=0.0)
    else:
        h0 = h_ckpt
    x, dt, uv, Bt, a, bu = _tile(u_ptr, delta_ptr, B_ptr, A2, bias, pid_b, t, offs_d, offs_n, m_td, m_tn,
                                 s_u_b, s_u_l, s_dt_b, s_dt_l, s_B_b, s_B_l, HAS_BIAS, SOFTPLUS)  # fmt: skip
    Ct = tl.load(row_ptrs(C_ptr, pid_b, t, offs_n, s_C_b, s_C_l), mask=m_tn, other=0.0).to(tl.float32)
    a_cum, b_cum = tl.associative_scan((a, bu), 0, _compose)
    hs = a_cum * h0[None, :, :] + b_cum  # h_t
    # the output's gradient through the gate
    dyv = tl.load(dy_ptr + row_d, mask=m_td, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(row_ptrs(z_ptr, pid_b, t, offs_d, s_z_b, s_z_l), mask=m_td, other=0.0).to(tl.float32)
        ypre = tl.sum(hs * Ct[:, None, :], axis=2)  # y before the gate
        if HAS_D:
            ypre = ypre + Dv[None, :] * uv
        sg = sigmoid(zv)
        dzv = dyv * ypre * sg * (1.0 + zv * (1.0 - sg))  # silu'(z) = σ(z)(1 + z(1 − σ(z)))
        tl.store(dz_ptr + row_d, dzv.to(dz_ptr.dtype.element_ty), mask=m_td)
        dyv = dyv * zv * sg
    dC = tl.sum(dyv[:, :, None] * hs, axis=1)  # (BLOCK_T, BLOCK_N), this block's share of Σ_d
    tl.atomic_add(dC_ptr + row_n, dC, mask=m_tn, sem="relaxed")
    ah = hs - bu  # Ā_t h_{t−1}; the last use of hs and bu (fewer tiles alive through the next scan)
    # the adjoint, backwards in time: p_t = Ā_t (C_t dy_t + p_{t+1}); the exclusive part gives p_{t+1}
    c = Ct[:, None, :] * dyv[:, :, None]  # ∂y_t/∂h_t · dy_t
    _, _, ea, eb = tl.associative_scan((a, a * c, ones, zeros), 0, _compose_excl, reverse=True)
    g = c + ea * q[None, :, :] + eb  # g_t = ∂L/∂h_t
    q = tl.sum(tl.where(is_first, a * g, 0.0), axis=0)  # p_{t0}: ∂L/∂(state before the tile)
    gdt = g * dt[:, :, None]
    dB = tl.sum(gdt * uv[:, :, None], axis=1)
    tl.atomic_add(dB_ptr + row_n, dB, mask=m_tn, sem="relaxed")
    duv = tl.sum(gdt * Bt[:, None, :], axis=2)
    if HAS_D:
        duv = duv + Dv[None, :] * dyv
        gD += tl.sum(dyv * uv, axis=0)
    tl.store(du_ptr + row_d, duv.to(du_ptr.dtype.element_ty), mask=m_td)
    ddt = tl.sum(g * (A[None, :, :] * ah + Bt[:, None, :] * uv[:, :, None]), axis=2)
    gA += tl.sum(gdt * ah, axis=0)
    if SOFTPLUS:
        ddt = ddt * sigmoid(x)  # softplus'(x) = σ(x)
    ddt = tl.where(m_td, ddt, 0.0)
    gbias += tl.sum(ddt, axis=0)
    tl.store(ddelta_ptr + row_d, ddt.to(ddelta_ptr.dtype.element_ty), mask=m_td)
    return q, gA, gD, gbias


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A2_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, scratch_ptr, dy_ptr, dhT_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    l, d, n, n_tiles,
    s_u_b, s_u_l, s_dt_b, s_dt_l, s_z_b, s_z_l, s_B_b, s_B_l, s_C_b, s_C_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DHT: tl.constexpr,
    SOFTPLUS: tl.constexpr, CKPT_TILES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Adjoint of _scan_fwd_kernel (its ckpt, with the same BLOCK_T and CKPT_TILES). dy, du, ddelta, dz:
    (b, l, d); dB, dC: (b, l, n) float32, zeroed, accumulated atomically; dA_part, dhT, dh0: (b, d, n);
    dD_part, dbias_part: (b, d); scratch: (b, CKPT_TILES, d, n) float32, the tile start states of the
    current checkpoint interval. The inputs' strides as in the forward; dy and the outputs are contiguous."""
    pid_b = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d, offs_n, mask_d, mask_n, dn, mask_dn = _block(d, n, BLOCK_D, BLOCK_N)
    A2 = tl.load(A2_ptr + dn, mask=mask_dn, other=0.0)
    A = A2 * LN2  # ∂Ā/∂Δ = A·Ā
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    state_off = pid_b.to(tl.int64) * d * n + dn
    if HAS_DHT:
        q = tl.load(dhT_ptr + state_off, mask=mask_dn, other=0.0)  # ∂L/∂h at the end of the current tile
    else:
        q = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    seq = pid_b.to(tl.int64) * l
    is_first = (offs_t == 0)[:, None, None]
    ones = tl.full((BLOCK_T, BLOCK_D, BLOCK_N), 1.0, tl.float32)
    zeros = tl.zeros((BLOCK_T, BLOCK_D, BLOCK_N), dtype=tl.float32)
    is_last = (offs_t == BLOCK_T - 1)[:, None, None]
    scratch = scratch_ptr + pid_b.to(tl.int64) * CKPT_TILES * d * n + dn
    n_ckpt = tl.cdiv(n_tiles, CKPT_TILES)
    for jc in range(n_ckpt):  # checkpoint intervals, last first
        c = n_ckpt - 1 - jc
        first = c * CKPT_TILES
        count = tl.minimum(CKPT_TILES, n_tiles - first)
        h = tl.load(ckpt_ptr + (pid_b.to(tl.int64) * n_ckpt + c) * d * n + dn, mask=mask_dn, other=0.0)
        if CKPT_TILES > 1:  # the interval's tile start states, forwards from its checkpoint, into scratch
            tl.debug_barrier()  # the previous interval's reads of scratch are done
            for k in range(count - 1):
                tl.store(scratch + k * d * n, h, mask=mask_dn)
                t = (first + k) * BLOCK_T + offs_t
                m_td = (t < l)[:, None] & mask_d[None, :]
                m_tn = (t < l)[:, None] & mask_n[None, :]
                _, _, _, _, a, bu = _tile(u_ptr, delta_ptr, B_ptr, A2, bias, pid_b, t, offs_d, offs_n, m_td, m_tn,
                                          s_u_b, s_u_l, s_dt_b, s_dt_l, s_B_b, s_B_l, HAS_BIAS, SOFTPLUS)  # fmt: skip
                a_cum, b_cum = tl.associative_scan((a, bu), 0, _compose)
                h = tl.sum(tl.where(is_last, a_cum * h[None, :, :] + b_cum, 0.0), axis=0)
            tl.store(scratch + (count - 1) * d * n, h, mask=mask_dn)
            tl.debug_barrier()  # scratch written before any thread reads it back
        for kk in range(count):  # the interval's tiles, last first
            k = count - 1 - kk
            q, gA, gD, gbias = _tile_backward(
                u_ptr, delta_ptr, A2, A, B_ptr, C_ptr, Dv, z_ptr, bias, dy_ptr, du_ptr, ddelta_ptr, dz_ptr,
                dB_ptr, dC_ptr, scratch + k * d * n, h, q, gA, gD, gbias, pid_b, first + k, l, d, n, seq,
                offs_t, offs_d, offs_n, mask_d, mask_n, mask_dn, is_first, ones, zeros,
                s_u_b, s_u_l, s_dt_b, s_dt_l, s_z_b, s_z_l, s_B_b, s_B_l, s_C_b, s_C_l,
                HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, CKPT_TILES > 1, BLOCK_T,
            )  # fmt: skip
    tl.store(dh0_ptr + state_off, q, mask=mask_dn)
    tl.store(dA_ptr + state_off, gA, mask=mask_dn)
    tl.store(dD_ptr + pid_b.to(tl.int64) * d + offs_d, gD, mask=mask_d)
    tl.store(dbias_ptr + pid_b.to(tl.int64) * d + offs_d, gbias, mask=mask_d)


# ------------------------------------------------------------------------------------------- the wrappers
def _strides(*xs: Tensor) -> list[int]:
    """(batch, time) strides of each (b, l, ·) tensor."""
    return [s for x in xs for s in (x.stride(0), x.stride(1))]


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save):
        # save: records_grad(...) of the inputs, from the caller (ctx.needs_input_grad is True for parameters
        # under no_grad too): inference writes no checkpoint states
        b, l, d = u.shape
        n = A.shape[1]
        f32 = torch.float32
        u_, delta_, B_, C_ = rowwise(u), rowwise(delta), rowwise(B), rowwise(C)
        A2 = (A.detach().to(f32) * LOG2E).contiguous()  # exp(Δ·A) = 2^(Δ·A·log2 e)
        dummy = u_.new_empty(1, dtype=f32)
        D_ = D.detach().to(f32).contiguous() if D is not None else dummy
        bias_ = delta_bias.detach().to(f32).contiguous() if delta_bias is not None else dummy
        z_ = rowwise(z) if z is not None else u_
        h0 = initial_state.detach().to(f32).contiguous() if initial_state is not None else dummy
        cfg = scan_config(b, l, d, n)
        n_tiles = triton.cdiv(l, cfg["BLOCK_T"])
        ckpt = u_.new_empty((b, triton.cdiv(n_tiles, cfg["CKPT_TILES"]), d, n) if save else (1,), dtype=f32)
        y = u_.new_empty(b, l, d)
        hT = u_.new_empty(b, d, n, dtype=f32)
        if b * d > 0:
            grid = (b, triton.cdiv(d, cfg["FWD_D"]))
            _scan_fwd_kernel[grid](
                u_, delta_, A2, B_, C_, D_, z_, bias_, h0, y, hT, ckpt, l, d, n, n_tiles,
                *_strides(u_, delta_, z_, B_, C_),
                HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                HAS_H0=initial_state is not None, SOFTPLUS=bool(delta_softplus), SAVE=save,
                CKPT_TILES=cfg["CKPT_TILES"],
                BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["FWD_D"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["FWD_WARPS"],
            )  # fmt: skip
        if save:
            ctx.save_for_backward(u_, delta_, A2, B_, C_, D_, z_, bias_, ckpt)
            ctx.meta = (cfg, z is not None, bool(delta_softplus), D is not None, delta_bias is not None)
            ctx.dtypes = tuple(None if x is None else x.dtype for x in (A, B, C, D, delta_bias, initial_state))
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u_, delta_, A2, B_, C_, D_, z_, bias_, ckpt = ctx.saved_tensors
        cfg, has_z, use_softplus, has_D, has_bias = ctx.meta
        t_A, t_B, t_C, t_D, t_bias, t_h0 = ctx.dtypes
        b, l, d = u_.shape
        n = A2.shape[1]
        f32 = torch.float32
        dy_ = dy.contiguous() if dy is not None else u_.new_zeros(b, l, d)
        dhT_ = dhT.to(f32).contiguous() if dhT is not None else A2.new_empty(1)
        du = u_.new_empty(b, l, d)
        ddelta = delta_.new_empty(b, l, d)
        dz = z_.new_empty(b, l, d) if has_z else A2.new_empty(1)
        dB = torch.zeros(b, l, n, dtype=f32, device=u_.device)
        dC = torch.zeros(b, l, n, dtype=f32, device=u_.device)
        dA = A2.new_empty(b, d, n)
        dD = A2.new_empty(b, d)
        dbias = A2.new_empty(b, d)
        dh0 = A2.new_empty(b, d, n)
        scratch = A2.new_empty((b, cfg["CKPT_TILES"], d, n) if cfg["CKPT_TILES"] > 1 else (1,))
        if b * d > 0:
            grid = (b, triton.cdiv(d, cfg["BWD_D"]))
            _scan_bwd_kernel[grid](
                u_, delta_, A2, B_, C_, D_, z_, bias_, ckpt, scratch, dy_, dhT_,
                du, ddelta, dz, dB, dC, dA, dD, dbias, dh0, l, d, n, triton.cdiv(l, cfg["BLOCK_T"]),
                *_strides(u_, delta_, z_, B_, C_),
                HAS_D=has_D, HAS_Z=has_z, HAS_BIAS=has_bias, HAS_DHT=dhT is not None, SOFTPLUS=use_softplus,
                CKPT_TILES=cfg["CKPT_TILES"],
                BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BWD_D"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["BWD_WARPS"],
            )  # fmt: skip
        need = ctx.needs_input_grad
        return (
            du if need[0] else None,
            ddelta if need[1] else None,
            dA.sum(0).to(t_A) if need[2] else None,  # (d, n)
            dB.to(t_B) if need[3] else None,
            dC.to(t_C) if need[4] else None,
            dD.sum(0).to(t_D) if has_D and need[5] else None,
            dz if has_z and need[6] else None,
            dbias.sum(0).to(t_bias) if has_bias and need[7] else None,
            None,
            dh0.to(t_h0) if t_h0 is not None and need[9] else None,
            None,
        )


def selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state):
    """The Triton selective scan of checked arguments (mambakit.ops.selective_scan); results as
    selective_scan_ref (float16, bfloat16 and float32 inputs; float32 state and accumulation)."""
    save = records_grad(u, delta, A, B, C, D, z, delta_bias, initial_state)
    y, h = _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, save)
    return (y, h) if return_final_state else y
