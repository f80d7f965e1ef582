"""SSD (the Mamba-2 scan) on GPU: Triton kernels for the chunked algorithm and for the decoding step.

The chunked algorithm of "Transformers are SSMs" (Dao & Gu 2024, Section 6), written from its math (see
cpu/ssd.py for the same steps in torch GEMMs). Dimensions: b batch, l length, h heads, p head dim, g groups
(head i reads B, C of group i // (h // g)), n state size, Q the chunk size, c = ceil(l / Q) chunks. Per head,
a_t = Δ_t·A ≤ 0 is the log-decay of step t and acs_t its inclusive cumulative sum within the chunk. Four
kernels, each one pass:

1. `_dt_cumsum_kernel`, one program per (sequence, chunk, block of heads): Δ = clamp(softplus(dt + dt_bias))
   and acs = cumsum(Δ·A) over the chunk, (b, h, c·Q) float32 each. Steps past l get Δ = 0 (decay 1, no
   input): they change neither the outputs kept nor the final state, so no other kernel special-cases them.
2. `_chunk_outer_kernel`, per (sequence·chunk, head, block of p): the chunk's own state at its end from a zero
   start, S = Σ_s exp(acs_last − acs_s)·Δ_s x_s B_sᵀ: a (p, Q)·(Q, n) matrix product.
3. `_state_passing_kernel`, per (sequence, head, block of p·n): H_{k+1} = exp(acs_last of chunk k)·H_k + S_k,
   sequential over chunks only. Writes H_k, the state entering each chunk, and the final state (float32).
4. `_chunk_scan_kernel`, per (sequence·chunk, head, block of p × block of queries): the output
       y_t = Σ_{s ≤ t in the chunk} (C_t·B_s) exp(acs_t − acs_s) Δ_s x_s  +  exp(acs_t)·H_k C_t  +  D x_t,
   then y ← y·silu(z). The first term is the dual (attention-like) form, masked to s ≤ t: (C Bᵀ) is formed
   block by block of keys with one matrix product and never stored. exp(min(acs_t − acs_s, 0)) keeps masked
   entries from overflowing; differences of one chunk's float32 cumsum bound the cancellation by Q steps.

Packed sequences (seq_idx) cut every term that crosses a change of sequence, as cpu/ssd.py does: (t, s) pairs
of different sequences, chunk-state tokens not in the chunk's last sequence, the carried state where a chunk
ends in another sequence than the one carried, and the carried state's share for tokens of other sequences.
The state before the first token belongs to sequence 0; steps past l continue the row's last sequence.

Precision: everything accumulates in float32; the matrix products take float16 / bfloat16 operands for those
inputs (tensor cores) and float32 operands in IEEE float32 for float32 inputs (no TF32). Triton's interpreter
(CPU tests) computes bfloat16 products wrongly (Triton 3.9: numpy has no bfloat16), so under it bfloat16
products run in float32.

Backward: four more kernels, the adjoints of the same sums (the formulas are above the backward kernels).
The forward saves Δ, acs (b, h, c·Q) and the states entering each chunk (b, c, h, p, n), float32 (c·p·n per
head, as the paper's memory bound allows); per-step states (b, l, h, p, n) are never formed.
- `_chunk_scan_bwd_query_kernel`, per query block: ∂L/∂y before the gate, dz (recomputing y), dC, dD, and the
  query terms of ∂L/∂acs;
- `_chunk_outer_kernel` again: ∂L/∂(state entering each chunk) through that chunk's outputs;
- `_state_passing_bwd_kernel`: those passed back over the chunks (last first), giving ∂L/∂(each chunk's own
  state), d(initial_states) and the decays' terms of ∂L/∂acs;
- `_chunk_scan_bwd_key_kernel`, per key block: dx, dB, ∂L/∂Δ through Δ·x, and the key terms of ∂L/∂acs.
torch then sums dB and dC over the heads of a group, turns ∂L/∂acs into ∂L/∂(Δ·A) (a reverse cumsum within
each chunk) and differentiates Δ = clamp(softplus(dt + dt_bias)) with autograd: all (b, l, h) or smaller.

The decoding step (`ssd_state_update_triton`) is one kernel: per (sequence, head, block of p) it loads the
state block, decays it, adds Δ x Bᵀ, stores it back in place and reads out y = h C + D x (·silu(z)).

The entry points trust their arguments: only mambakit.ops calls them, after checking.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..cpu.primitives import records_grad
from ..reference import _per_channel_D, ssd_dt
from .common import exp, sigmoid, softplus

# Overrides for the block sizes (tests shrink them so that tiny shapes span several blocks): BLOCK_M (queries
# and keys per block of the chunk), BLOCK_P, BLOCK_H (heads per program of the Δ cumsum), BLOCK_PN (state
# elements per program of the state passing).
TILES: dict[str, int] = {}

# The matrix products' operand type (constexpr DOT): float32 in IEEE, float16, bfloat16.
_DOT_F32, _DOT_F16, _DOT_BF16 = 0, 1, 2


def ssd_config(Q: int, p: int, n: int) -> dict:
    """Block sizes. tl.dot needs every dimension ≥ 16 and a power of two: blocks are padded and masked.
    BLOCK_N covers the whole state (n ≤ 256 in released models) so C Bᵀ is one product per key block. Queries
    and keys of a chunk go in blocks of 32 in the forward, 16 in the backward, 8 warps a program: at
    Q = 256, p = 64, n = 128 every kernel then compiles for sm_90 without spilling registers in bfloat16
    (python benchmarks/gpu.py --compile-only; docs/kernels.md). Untimed: no GPU has run them yet."""
    block_q = max(16, triton.next_power_of_2(Q))
    return dict(
        BLOCK_Q=block_q,
        BLOCK_M=TILES.get("BLOCK_M", min(32, block_q)),
        BLOCK_P=TILES.get("BLOCK_P", min(64, max(16, triton.next_power_of_2(p)))),
        BLOCK_N=max(16, triton.next_power_of_2(n)),
        BLOCK_H=TILES.get("BLOCK_H", 8),
        BLOCK_PN=TILES.get("BLOCK_PN", 1024),
        BWD_M=TILES.get("BWD_M", 16),  # the backward's query/key blocks: it holds more (BLOCK_M, p) tiles
        WARPS=TILES.get("WARPS", 8),
    )


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """a @ b, float32 accumulation; operands cast to the DOT type (float32 products in IEEE, not TF32)."""
    if DOT == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif DOT == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _steps(pid_b, t, s_b, s_l):
    """Offsets of steps t of sequence pid_b in a (b, l, …) tensor with batch and time strides s_b, s_l whose
    trailing dimensions are dense: the model's x, B, C, z, dt are slices of wider projections, read in place."""
    return pid_b.to(tl.int64) * s_b + t.to(tl.int64) * s_l


@triton.jit
def _seq_at(seq_ptr, pid_b, t, l):
    """seq_idx of steps t of sequence pid_b; steps past l continue the last one."""
    return tl.load(seq_ptr + pid_b.to(tl.int64) * l + tl.minimum(t, l - 1))


# ------------------------------------------------------------------------------- 1. Δ and its cumsum
@triton.jit
def _dt_cumsum_kernel(
    dt_ptr, A_ptr, bias_ptr, delta_ptr, acs_ptr, l, h, Q, n_chunks, lo, hi, s_dt_b, s_dt_l,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """dt: (b, l, h) (batch and time strides given); A, bias: (h,); delta, acs: (b, h, c·Q) float32."""
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = pid_c * Q + offs_q
    m_t = (offs_q < Q) & (t < l)
    m_h = offs_h < h
    m = m_t[:, None] & m_h[None, :]  # (BLOCK_Q, BLOCK_H)
    v = tl.load(dt_ptr + _steps(pid_b, t, s_dt_b, s_dt_l)[:, None] + offs_h[None, :], mask=m, other=0.0)
    v = v.to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + offs_h, mask=m_h, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        v = softplus(v)
    if HAS_LIMIT:
        v = tl.minimum(tl.maximum(v, lo), hi)
    delta = tl.where(m, v, 0.0)
    A = tl.load(A_ptr + offs_h, mask=m_h, other=0.0).to(tl.float32)
    acs = tl.cumsum(delta * A[None, :], axis=0)
    out = (pid_b.to(tl.int64) * h + offs_h)[None, :] * (n_chunks * Q) + t[:, None]  # (b, h, c·Q)
    keep = (offs_q < Q)[:, None] & m_h[None, :]
    tl.store(delta_ptr + out, delta, mask=keep)
    tl.store(acs_ptr + out, acs, mask=keep)


# ------------------------------------------------------------------------------------- 2. chunk states
@triton.jit
def _chunk_outer_kernel(
    v_ptr, u_ptr, delta_ptr, acs_ptr, seq_ptr, out_ptr, l, h, p, g, n, Q, n_chunks, s_v_b, s_v_l, s_u_b, s_u_l,
    TO_END: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Σ_t w_t v_t u_tᵀ over each chunk, (b, c, h, p, n) float32; v: (b, l, h, p); u: (b, l, g, n) (the head's
    group), both with the given batch and time strides; delta, acs: (b, h, c·Q); seq: (b, l) int32. Two uses:
    - TO_END, the chunk's state from a zero start: v = x, u = B, w_t = exp(acs_last − acs_t)·Δ_t, only tokens
      of the chunk's last sequence;
    - not TO_END (the backward), ∂L/∂(state entering the chunk) through the outputs: v = ∂L/∂y (before the
      gate), u = C, w_t = exp(acs_t), only tokens of the carried state's sequence."""
    pid_bc, hd = tl.program_id(0), tl.program_id(1)
    pid_b, pid_c = pid_bc // n_chunks, pid_bc % n_chunks
    grp = hd // (h // g)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    m_p, m_n = offs_p < p, offs_n < n
    row = (pid_b.to(tl.int64) * h + hd) * (n_chunks * Q) + pid_c * Q  # this chunk in delta, acs
    acs_last = tl.load(acs_ptr + row + Q - 1)
    if HAS_SEQ:
        if TO_END:
            seq_own = _seq_at(seq_ptr, pid_b, pid_c * Q + Q - 1, l)
        else:
            seq_own = tl.where(pid_c > 0, _seq_at(seq_ptr, pid_b, tl.maximum(pid_c * Q - 1, 0), l), 0)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Q, BLOCK_M):
        offs_s = k0 + tl.arange(0, BLOCK_M)
        t = pid_c * Q + offs_s
        m_s = (offs_s < Q) & (t < l)
        vs = tl.load(v_ptr + _steps(pid_b, t, s_v_b, s_v_l)[:, None] + hd * p + offs_p[None, :],
                     mask=m_s[:, None] & m_p[None, :], other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_P)
        us = tl.load(u_ptr + _steps(pid_b, t, s_u_b, s_u_l)[:, None] + grp * n + offs_n[None, :],
                     mask=m_s[:, None] & m_n[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        a_s = tl.load(acs_ptr + row + offs_s, mask=m_s, other=0.0)
        if TO_END:
            w = exp(acs_last - a_s) * tl.load(delta_ptr + row + offs_s, mask=m_s, other=0.0)
        else:
            w = exp(a_s)
        w = tl.where(m_s, w, 0.0)
        if HAS_SEQ:
            w = tl.where(_seq_at(seq_ptr, pid_b, t, l) == seq_own, w, 0.0)
        acc += _mm(tl.trans(vs * w[:, None]), us, DOT)
    out = ((pid_b.to(tl.int64) * n_chunks + pid_c) * h + hd) * p * n
    tl.store(out_ptr + out + offs_p[:, None] * n + offs_n[None, :], acc, mask=m_p[:, None] & m_n[None, :])


# ------------------------------------------------------------------------------------ 3. state passing
@triton.jit
def _state_passing_kernel(
    S_ptr, acs_ptr, h0_ptr, seq_ptr, Hin_ptr, final_ptr, l, h, pn, Q, n_chunks,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_PN: tl.constexpr,
):  # fmt: skip
    """S, Hin: (b, c, h, p·n) float32; acs: (b, h, c·Q); h0, final: (b, h, p·n) float32. Hin[k] is the state
    entering chunk k: Hin[0] = h0, Hin[k+1] = exp(acs_last of k)·Hin[k] + S[k]; final = Hin[c]."""
    pid_b, hd = tl.program_id(0), tl.program_id(1)
    offs = tl.program_id(2) * BLOCK_PN + tl.arange(0, BLOCK_PN)
    m = offs < pn
    own = (pid_b.to(tl.int64) * h + hd) * pn + offs
    if HAS_H0:
        carried = tl.load(h0_ptr + own, mask=m, other=0.0)
    else:
        carried = tl.zeros((BLOCK_PN,), dtype=tl.float32)
    seq_before = pid_b * 0  # the sequence the carried state belongs to: 0 before the first token
    for k in range(n_chunks):
        at = ((pid_b.to(tl.int64) * n_chunks + k) * h + hd) * pn + offs
        tl.store(Hin_ptr + at, carried, mask=m)
        decay = exp(tl.load(acs_ptr + (pid_b.to(tl.int64) * h + hd) * (n_chunks * Q) + k * Q + Q - 1))
        if HAS_SEQ:
            seq_last = _seq_at(seq_ptr, pid_b, k * Q + Q - 1, l)
            decay = tl.where(seq_last == seq_before, decay, 0.0)  # the carry stops where a sequence ends
            seq_before = seq_last
        carried = decay * carried + tl.load(S_ptr + at, mask=m, other=0.0)
    tl.store(final_ptr + own, carried, mask=m)


# ---------------------------------------------------------------------------------------- 4. chunk scan
@triton.jit
def _chunk_scan_kernel(
    x_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_ptr, acs_ptr, Hin_ptr, seq_ptr, y_ptr, l, h, p, g, n, Q, n_chunks,
    s_x_b, s_x_l, s_B_b, s_B_l, s_C_b, s_C_l, s_z_b, s_z_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """x, z, y: (b, l, h, p); B, C: (b, l, g, n); D: (h, p) float32; delta, acs: (b, h, c·Q); Hin: (b, c, h, p, n)
    float32; seq: (b, l) int32. x, B, C, z have the given batch and time strides; y is contiguous. Program
    axis 2 runs over (block of queries, block of p), queries major."""
    pid_bc, hd = tl.program_id(0), tl.program_id(1)
    pid_b, pid_c = pid_bc // n_chunks, pid_bc % n_chunks
    n_pblocks = tl.cdiv(p, BLOCK_P)
    pid_m, pid_p = tl.program_id(2) // n_pblocks, tl.program_id(2) % n_pblocks
    grp = hd // (h // g)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # queries, within the chunk
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    m_p, m_n = offs_p < p, offs_n < n
    t_m = pid_c * Q + offs_m
    m_m = (offs_m < Q) & (t_m < l)
    base = pid_b.to(tl.int64) * l
    row = (pid_b.to(tl.int64) * h + hd) * (n_chunks * Q) + pid_c * Q
    a_m = tl.load(acs_ptr + row + offs_m, mask=offs_m < Q, other=0.0)
    Cm = tl.load(C_ptr + _steps(pid_b, t_m, s_C_b, s_C_l)[:, None] + grp * n + offs_n[None, :],
                 mask=m_m[:, None] & m_n[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
    if HAS_SEQ:
        seq_m = _seq_at(seq_ptr, pid_b, t_m, l)

    # the incoming state's share, exp(acs_t)·H C_t, only for tokens of the carried state's sequence
    Hin = tl.load(Hin_ptr + ((pid_b.to(tl.int64) * n_chunks + pid_c) * h + hd) * p * n + offs_p[None, :] * n
                  + offs_n[:, None], mask=m_n[:, None] & m_p[None, :], other=0.0)  # Hᵀ: (BLOCK_N, BLOCK_P)
    from_start = exp(a_m)
    if HAS_SEQ:
        # the sequence the carried state belongs to: that of the previous chunk's last token (0 before t = 0)
        seq_before = tl.where(pid_c > 0, _seq_at(seq_ptr, pid_b, tl.maximum(pid_c * Q - 1, 0), l), 0)
        from_start = tl.where(seq_m == seq_before, from_start, 0.0)
    acc = _mm(Cm, Hin, DOT) * from_start[:, None]  # (BLOCK_M, BLOCK_P)

    # inside the chunk: Σ_{s ≤ t} (C_t·B_s) exp(acs_t − acs_s) Δ_s x_s, key blocks up to this query block
    for k0 in range(0, (pid_m + 1) * BLOCK_M, BLOCK_M):
        offs_s = k0 + tl.arange(0, BLOCK_M)
        t_s = pid_c * Q + offs_s
        m_s = (offs_s < Q) & (t_s < l)
        Bs = tl.load(B_ptr + _steps(pid_b, t_s, s_B_b, s_B_l)[None, :] + grp * n + offs_n[:, None],
                     mask=m_n[:, None] & m_s[None, :], other=0.0)  # Bᵀ (BLOCK_N, BLOCK_M)
        CB = _mm(Cm, Bs, DOT)  # (BLOCK_M queries, BLOCK_M keys)
        a_s = tl.load(acs_ptr + row + offs_s, mask=offs_s < Q, other=0.0)
        d_s = tl.load(delta_ptr + row + offs_s, mask=m_s, other=0.0)
        keep = (offs_m[:, None] >= offs_s[None, :]) & m_s[None, :]
        if HAS_SEQ:
            keep = keep & (seq_m[:, None] == _seq_at(seq_ptr, pid_b, t_s, l)[None, :])
        scores = tl.where(keep, CB * exp(tl.minimum(a_m[:, None] - a_s[None, :], 0.0)) * d_s[None, :], 0.0)
        xs = tl.load(x_ptr + _steps(pid_b, t_s, s_x_b, s_x_l)[:, None] + hd * p + offs_p[None, :],
                     mask=m_s[:, None] & m_p[None, :], other=0.0)  # (BLOCK_M, BLOCK_P)
        acc += _mm(scores, xs, DOT)

    at = ((base + t_m)[:, None] * h + hd) * p + offs_p[None, :]  # into y
    m_mp = m_m[:, None] & m_p[None, :]
    if HAS_D:
        xm = tl.load(x_ptr + _steps(pid_b, t_m, s_x_b, s_x_l)[:, None] + hd * p + offs_p[None, :], mask=m_mp,
                     other=0.0).to(tl.float32)  # fmt: skip
        acc += tl.load(D_ptr + hd * p + offs_p, mask=m_p, other=0.0)[None, :] * xm
    if HAS_Z:
        zm = tl.load(z_ptr + _steps(pid_b, t_m, s_z_b, s_z_l)[:, None] + hd * p + offs_p[None, :], mask=m_mp,
                     other=0.0).to(tl.float32)  # fmt: skip
        acc = acc * zm * sigmoid(zm)
    tl.store(y_ptr + at, acc.to(y_ptr.dtype.element_ty), mask=m_mp)


# -------------------------------------------------------------------------------------------- backward
# Per chunk and head, with x̄_s = Δ_s x_s, L_ts = exp(acs_t − acs_s) (s ≤ t, same sequence), M = (C Bᵀ) ∘ L,
# y_t = Σ_s M_ts x̄_s + e_t H C_t (+ D x_t, ·silu(z_t)), e_t = exp(acs_t), and S = Σ_s w_s x̄_s B_sᵀ with
# w_s = exp(acs_last − acs_s). With dy the output's gradient before the gate and G_ts = dy_t·x̄_s:
#   dx̄_s = Σ_t M_ts dy_t + w_s dS B_s             dB_s = Σ_t (G∘L)_ts C_t + w_s dSᵀ x̄_s
#   dC_t = Σ_s (G∘L)_ts B_s + e_t Hᵀ dy_t           dH = Σ_t e_t dy_t C_tᵀ (+ the next chunk's, passed back)
#   ∂L/∂acs_t = Σ_s (G∘M)_ts + dy_t·(e_t H C_t) − Σ_{t'} (G∘M)_{t's} − w_t x̄_t·(dS B_t), and at the chunk's
#   last step + Σ_s w_s x̄_s·(dS B_s) + exp(acs_last) dH_next·H.
# acs is a cumsum of Δ·A: ∂L/∂(Δ_t A) is the reverse cumsum of ∂L/∂acs within the chunk (done in torch).
@triton.jit
def _chunk_scan_bwd_query_kernel(
    x_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dy_ptr, delta_ptr, acs_ptr, Hin_ptr, seq_ptr,
    dyg_ptr, dz_ptr, dC_ptr, dacs_ptr, dD_ptr, l, h, p, g, n, Q, n_chunks,
    s_x_b, s_x_l, s_B_b, s_B_l, s_C_b, s_C_l, s_z_b, s_z_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The query side, per (sequence·chunk, head, block of queries t), all of p (BLOCK_P ≥ p): recomputes y
    before the gate for dz, writes dyg = ∂L/∂y before the gate (b, l, h, p) float32, dz, dC per head
    (b, l, h, n) float32, the query terms of ∂L/∂acs (b, h, c·Q) and dD's partial sums (b·c, blocks, h, p).
    x, B, C, z have the given batch and time strides; dy and the outputs are contiguous."""
    pid_bc, hd, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_b, pid_c = pid_bc // n_chunks, pid_bc % n_chunks
    grp = hd // (h // g)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    m_p, m_n = offs_p < p, offs_n < n
    t_m = pid_c * Q + offs_m
    m_m = (offs_m < Q) & (t_m < l)
    base = pid_b.to(tl.int64) * l
    row = (pid_b.to(tl.int64) * h + hd) * (n_chunks * Q) + pid_c * Q
    a_m = tl.load(acs_ptr + row + offs_m, mask=offs_m < Q, other=0.0)
    Cm = tl.load(C_ptr + _steps(pid_b, t_m, s_C_b, s_C_l)[:, None] + grp * n + offs_n[None, :],
                 mask=m_m[:, None] & m_n[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
    at = ((base + t_m)[:, None] * h + hd) * p + offs_p[None, :]  # into dy, dyg, dz
    m_mp = m_m[:, None] & m_p[None, :]
    dyv = tl.load(dy_ptr + at, mask=m_mp, other=0.0).to(tl.float32)
    if HAS_Z:
        zm = tl.load(z_ptr + _steps(pid_b, t_m, s_z_b, s_z_l)[:, None] + hd * p + offs_p[None, :], mask=m_mp,
                     other=0.0).to(tl.float32)  # fmt: skip
        sg = sigmoid(zm)
        dyg = dyv * zm * sg
    else:
        dyg = dyv
    tl.store(dyg_ptr + at, dyg, mask=m_mp)
    if HAS_SEQ:
        seq_m = _seq_at(seq_ptr, pid_b, t_m, l)
    ypre = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    dC = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dacs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, (pid_m + 1) * BLOCK_M, BLOCK_M):
        offs_s = k0 + tl.arange(0, BLOCK_M)
        t_s = pid_c * Q + offs_s
        m_s = (offs_s < Q) & (t_s < l)
        Bs = tl.load(B_ptr + _steps(pid_b, t_s, s_B_b, s_B_l)[:, None] + grp * n + offs_n[None, :],
                     mask=m_s[:, None] & m_n[None, :], other=0.0)  # (BLOCK_M keys, BLOCK_N)
        a_s = tl.load(acs_ptr + row + offs_s, mask=offs_s < Q, other=0.0)
        d_s = tl.load(delta_ptr + row + offs_s, mask=m_s, other=0.0)
        keep = (offs_m[:, None] >= offs_s[None, :]) & m_s[None, :]
        if HAS_SEQ:
            keep = keep & (seq_m[:, None] == _seq_at(seq_ptr, pid_b, t_s, l)[None, :])
        L = tl.where(keep, exp(tl.minimum(a_m[:, None] - a_s[None, :], 0.0)), 0.0)  # (queries, keys)
        M = _mm(Cm, tl.trans(Bs), DOT) * L
        xbar = tl.load(x_ptr + _steps(pid_b, t_s, s_x_b, s_x_l)[:, None] + hd * p + offs_p[None, :],
                       mask=m_s[:, None] & m_p[None, :], other=0.0).to(tl.float32) * d_s[:, None]
        ypre += _mm(M, xbar, DOT)
        G = _mm(dyg, tl.trans(xbar), DOT)  # G_ts = dy_t·x̄_s
        dC += _mm(G * L, Bs, DOT)
        dacs += tl.sum(G * M, axis=1)
    # the incoming state's share e_t H C_t
    Hin = tl.load(Hin_ptr + ((pid_b.to(tl.int64) * n_chunks + pid_c) * h + hd) * p * n
                  + offs_p[:, None] * n + offs_n[None, :], mask=m_p[:, None] & m_n[None, :], other=0.0)  # (P, N)
    e = exp(a_m)
    if HAS_SEQ:
        seq_before = tl.where(pid_c > 0, _seq_at(seq_ptr, pid_b, tl.maximum(pid_c * Q - 1, 0), l), 0)
        e = tl.where(seq_m == seq_before, e, 0.0)
    yoff = _mm(Cm, tl.trans(Hin), DOT) * e[:, None]
    dC += _mm(dyg, Hin, DOT) * e[:, None]
    dacs += tl.sum(dyg * yoff, axis=1)
    ypre += yoff
    if HAS_D:
        xm = tl.load(x_ptr + _steps(pid_b, t_m, s_x_b, s_x_l)[:, None] + hd * p + offs_p[None, :], mask=m_mp,
                     other=0.0).to(tl.float32)  # fmt: skip
        ypre += tl.load(D_ptr + hd * p + offs_p, mask=m_p, other=0.0)[None, :] * xm
        n_mblocks = tl.num_programs(2)
        tl.store(dD_ptr + ((pid_bc * n_mblocks + pid_m) * h + hd) * p + offs_p, tl.sum(dyg * xm, axis=0), mask=m_p)
    if HAS_Z:
        dzv = dyv * ypre * sg * (1.0 + zm * (1.0 - sg))  # silu'(z) = σ(z)(1 + z(1 − σ(z)))
        tl.store(dz_ptr + at, dzv.to(dz_ptr.dtype.element_ty), mask=m_mp)
    tl.store(dC_ptr + ((base + t_m)[:, None] * h + hd) * n + offs_n[None, :], dC, mask=m_m[:, None] & m_n[None, :])
    tl.store(dacs_ptr + row + offs_m, dacs, mask=offs_m < Q)


@triton.jit
def _state_passing_bwd_kernel(
    dHd_ptr, Hin_ptr, acs_ptr, dfinal_ptr, seq_ptr, dS_ptr, dh0_ptr, dlast_ptr, l, h, pn, Q, n_chunks,
    HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_PN: tl.constexpr,
):  # fmt: skip
    """Adjoint of _state_passing_kernel, chunks last first. dHd: ∂L/∂Hin[k] through chunk k's outputs;
    Hin, dHd, dS: (b, c, h, p·n) float32; dfinal, dh0: (b, h, p·n). dS[k] = ∂L/∂Hin[k+1] (= ∂L/∂S[k]);
    dlast (b, h, c, blocks): this block's share of ∂L/∂(acs_last of chunk k) through the decay."""
    pid_b, hd, pid_pn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = pid_pn * BLOCK_PN + tl.arange(0, BLOCK_PN)
    m = offs < pn
    own = (pid_b.to(tl.int64) * h + hd) * pn + offs
    if HAS_DFINAL:
        G = tl.load(dfinal_ptr + own, mask=m, other=0.0)
    else:
        G = tl.zeros((BLOCK_PN,), dtype=tl.float32)
    arow = (pid_b.to(tl.int64) * h + hd) * (n_chunks * Q)
    for kk in range(n_chunks):
        k = n_chunks - 1 - kk
        at = ((pid_b.to(tl.int64) * n_chunks + k) * h + hd) * pn + offs
        tl.store(dS_ptr + at, G, mask=m)
        decay = exp(tl.load(acs_ptr + arow + k * Q + Q - 1))
        if HAS_SEQ:
            seq_before = tl.where(k > 0, _seq_at(seq_ptr, pid_b, tl.maximum(k * Q - 1, 0), l), 0)
            decay = tl.where(_seq_at(seq_ptr, pid_b, k * Q + Q - 1, l) == seq_before, decay, 0.0)
        ddecay = tl.sum(G * tl.load(Hin_ptr + at, mask=m, other=0.0), axis=0)
        tl.store(dlast_ptr + ((pid_b.to(tl.int64) * h + hd) * n_chunks + k) * tl.num_programs(2) + pid_pn,
                 ddecay * decay)
        G = decay * G + tl.load(dHd_ptr + at, mask=m, other=0.0)
    tl.store(dh0_ptr + own, G, mask=m)


@triton.jit
def _chunk_scan_bwd_key_kernel(
    x_ptr, B_ptr, C_ptr, D_ptr, dyg_ptr, delta_ptr, acs_ptr, dS_ptr, seq_ptr,
    dx_ptr, dB_ptr, ddelta_ptr, dacs_ptr, dlast_ptr, l, h, p, g, n, Q, n_chunks,
    s_x_b, s_x_l, s_B_b, s_B_l, s_C_b, s_C_l,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The key side, per (sequence·chunk, head, block of keys s), all of p: writes dx (b, l, h, p), dB per head
    (b, l, h, n) float32, ∂L/∂Δ through x̄ and the key terms of ∂L/∂acs (b, h, c·Q), and adds the chunk state's
    term of ∂L/∂acs_last to dlast (b, h, c) (atomically: one add per key block). x, B, C have the given batch
    and time strides; dyg and the outputs are contiguous."""
    pid_bc, hd, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_b, pid_c = pid_bc // n_chunks, pid_bc % n_chunks
    grp = hd // (h // g)
    offs_s = pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    m_p, m_n = offs_p < p, offs_n < n
    t_s = pid_c * Q + offs_s
    m_s = (offs_s < Q) & (t_s < l)
    base = pid_b.to(tl.int64) * l
    row = (pid_b.to(tl.int64) * h + hd) * (n_chunks * Q) + pid_c * Q
    a_s = tl.load(acs_ptr + row + offs_s, mask=offs_s < Q, other=0.0)
    d_s = tl.load(delta_ptr + row + offs_s, mask=m_s, other=0.0)
    at = ((base + t_s)[:, None] * h + hd) * p + offs_p[None, :]  # into dyg, dx
    m_sp = m_s[:, None] & m_p[None, :]
    xs = tl.load(x_ptr + _steps(pid_b, t_s, s_x_b, s_x_l)[:, None] + hd * p + offs_p[None, :], mask=m_sp,
                 other=0.0).to(tl.float32)  # fmt: skip
    xbar = xs * d_s[:, None]
    Bs = tl.load(B_ptr + _steps(pid_b, t_s, s_B_b, s_B_l)[:, None] + grp * n + offs_n[None, :],
                 mask=m_s[:, None] & m_n[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
    # the chunk state's terms: S = Σ_s w_s x̄_s B_sᵀ
    dS = tl.load(dS_ptr + ((pid_b.to(tl.int64) * n_chunks + pid_c) * h + hd) * p * n
                 + offs_p[:, None] * n + offs_n[None, :], mask=m_p[:, None] & m_n[None, :], other=0.0)  # (P, N)
    w = tl.where(m_s, exp(tl.load(acs_ptr + row + Q - 1) - a_s), 0.0)
    if HAS_SEQ:
        seq_s = _seq_at(seq_ptr, pid_b, t_s, l)
        w = tl.where(seq_s == _seq_at(seq_ptr, pid_b, pid_c * Q + Q - 1, l), w, 0.0)
    BdS = _mm(Bs, tl.trans(dS), DOT)  # (BLOCK_M, BLOCK_P): dS B_s
    dxbar = BdS * w[:, None]
    dB = _mm(xbar, dS, DOT) * w[:, None]
    dw = tl.sum(xbar * BdS, axis=1) * w
    tl.atomic_add(dlast_ptr + (pid_b.to(tl.int64) * h + hd) * n_chunks + pid_c, tl.sum(dw, axis=0), sem="relaxed")
    dacs = -dw
    # the dual form's terms, query blocks from this key block to the chunk's end
    for t0 in range(pid_s * BLOCK_M, Q, BLOCK_M):
        offs_t = t0 + tl.arange(0, BLOCK_M)
        t_t = pid_c * Q + offs_t
        m_t = (offs_t < Q) & (t_t < l)
        Ct = tl.load(C_ptr + _steps(pid_b, t_t, s_C_b, s_C_l)[:, None] + grp * n + offs_n[None, :],
                     mask=m_t[:, None] & m_n[None, :], other=0.0)  # (BLOCK_M queries, BLOCK_N)
        dyt = tl.load(dyg_ptr + ((base + t_t)[:, None] * h + hd) * p + offs_p[None, :],
                      mask=m_t[:, None] & m_p[None, :], other=0.0)
        a_t = tl.load(acs_ptr + row + offs_t, mask=offs_t < Q, other=0.0)
        keep = (offs_t[None, :] >= offs_s[:, None]) & m_t[None, :] & m_s[:, None]
        if HAS_SEQ:
            keep = keep & (seq_s[:, None] == _seq_at(seq_ptr, pid_b, t_t, l)[None, :])
        Lt = tl.where(keep, exp(tl.minimum(a_t[None, :] - a_s[:, None], 0.0)), 0.0)  # Lᵀ (keys, queries)
        Mt = _mm(Bs, tl.trans(Ct), DOT) * Lt
        dxbar += _mm(Mt, dyt, DOT)
        Gt = _mm(xbar, tl.trans(dyt), DOT)  # Gᵀ
        dB += _mm(Gt * Lt, Ct, DOT)
        dacs -= tl.sum(Gt * Mt, axis=1)
    dxv = dxbar * d_s[:, None]
    if HAS_D:
        Dv = tl.load(D_ptr + hd * p + offs_p, mask=m_p, other=0.0)
        dxv += Dv[None, :] * tl.load(dyg_ptr + at, mask=m_sp, other=0.0)
    tl.store(dx_ptr + at, dxv.to(dx_ptr.dtype.element_ty), mask=m_sp)
    tl.store(dB_ptr + ((base + t_s)[:, None] * h + hd) * n + offs_n[None, :], dB, mask=m_s[:, None] & m_n[None, :])
    tl.store(ddelta_ptr + row + offs_s, tl.sum(xs * dxbar, axis=1), mask=offs_s < Q)
    tl.store(dacs_ptr + row + offs_s, dacs, mask=offs_s < Q)


# ------------------------------------------------------------------------------------------ the forward
def _dot_type(x: Tensor) -> int:
    if x.dtype == torch.float16:
        return _DOT_F16
    if x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") != "1":
        return _DOT_BF16
    return _DOT_F32


def _rows(x: Tensor | None, lead: int = 2) -> Tensor | None:
    """x (detached) itself when its dimensions after the `lead` leading ones (batch, time) are dense, as in the
    model's slices of its projections: the kernels take the leading strides. Else a contiguous copy."""
    if x is None:
        return None
    x = x.detach()
    return x if x.numel() and x[(0,) * lead].is_contiguous() else x.contiguous()


def _strides(*xs: Tensor) -> list[int]:
    """(batch, time) strides of each (b, l, …) tensor."""
    return [s for x in xs for s in (x.stride(0), x.stride(1))]


def _own(x: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
    """x detached and contiguous (in `dtype` if given): the kernels index dense row-major memory."""
    if x is None:
        return None
    x = x.detach()
    return (x.to(dtype) if dtype is not None else x).contiguous()


def _ssd_forward(x, dt, A, B, C, Q, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx):
    """The four kernels: y (b, l, h, p) in x's dtype, the final states (b, h, p, n) float32, and for the
    backward Δ and acs (b, h, c·Q) and the states entering each chunk (b, c, h, p, n), float32."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    c = triton.cdiv(l, Q)
    cfg = ssd_config(Q, p, n)
    f32 = torch.float32
    dummy = x.new_empty(1, dtype=f32)
    seq = seq_idx if seq_idx is not None else dummy
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    dot = _dot_type(x)

    delta = x.new_empty(b, h, c * Q, dtype=f32)
    acs = torch.empty_like(delta)
    _dt_cumsum_kernel[(b, c, triton.cdiv(h, cfg["BLOCK_H"]))](
        dt, A, dt_bias if dt_bias is not None else dummy, delta, acs, l, h, Q, c, lo, hi, *_strides(dt),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=(lo, hi) != (0.0, float("inf")),
        BLOCK_Q=cfg["BLOCK_Q"], BLOCK_H=cfg["BLOCK_H"],
    )  # fmt: skip
    S = x.new_empty(b, c, h, p, n, dtype=f32)
    _chunk_outer_kernel[(b * c, h, triton.cdiv(p, cfg["BLOCK_P"]))](
        x, B, delta, acs, seq, S, l, h, p, g, n, Q, c, *_strides(x, B),
        TO_END=True, HAS_SEQ=seq_idx is not None, DOT=dot,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["WARPS"],
    )  # fmt: skip
    Hin = torch.empty_like(S)
    final = x.new_empty(b, h, p, n, dtype=f32)
    _state_passing_kernel[(b, h, triton.cdiv(p * n, cfg["BLOCK_PN"]))](
        S, acs, initial_states if initial_states is not None else dummy, seq, Hin, final, l, h, p * n, Q, c,
        HAS_H0=initial_states is not None, HAS_SEQ=seq_idx is not None, BLOCK_PN=cfg["BLOCK_PN"],
    )  # fmt: skip
    y = x.new_empty(x.shape)  # contiguous, whatever x's strides
    grid = (b * c, h, triton.cdiv(Q, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_P"]))
    _chunk_scan_kernel[grid](
        x, B, C, D if D is not None else dummy, z if z is not None else x, delta, acs, Hin, seq, y,
        l, h, p, g, n, Q, c, *_strides(x, B, C, z if z is not None else x),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, DOT=dot,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["WARPS"],
    )  # fmt: skip
    return y, final, delta, acs, Hin


def _ssd_backward(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, seq_idx, delta, acs, Hin, Q, dt_softplus, dt_limit):
    """The gradients of _ssd_forward's y and final states: dx, dΔ-chain (dt, dt_bias), dA, dB, dC, dD (h, p),
    dz, dh0. Four kernels (query side, ∂L/∂states through the outputs, state passing backwards, key side),
    then torch for the per-group and per-head sums and the chain through cumsum and softplus (all
    O(b·l·h) or smaller)."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    c = triton.cdiv(l, Q)
    cfg = ssd_config(Q, p, n)
    bp = max(16, triton.next_power_of_2(p))  # the backward holds all of p: dC, dB and ∂L/∂acs sum over it
    f32 = torch.float32
    dummy = x.new_empty(1, dtype=f32)
    seq = seq_idx if seq_idx is not None else dummy
    dot = _dot_type(x)
    n_m = triton.cdiv(Q, cfg["BWD_M"])
    blocks = dict(BLOCK_M=cfg["BWD_M"], BLOCK_P=bp, BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["WARPS"])

    dyg = x.new_empty(b, l, h, p, dtype=f32)
    dz = z.new_empty(z.shape) if z is not None else dummy
    dC_h = x.new_empty(b, l, h, n, dtype=f32)
    dacs_q = torch.zeros_like(acs)
    dD_part = x.new_empty(b * c, n_m, h, p, dtype=f32) if D is not None else dummy
    _chunk_scan_bwd_query_kernel[(b * c, h, n_m)](
        x, B, C, D if D is not None else dummy, z if z is not None else x, dy, delta, acs, Hin, seq,
        dyg, dz, dC_h, dacs_q, dD_part, l, h, p, g, n, Q, c, *_strides(x, B, C, z if z is not None else x),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, DOT=dot, **blocks,
    )  # fmt: skip
    dHd = torch.empty_like(Hin)
    _chunk_outer_kernel[(b * c, h, triton.cdiv(p, cfg["BLOCK_P"]))](
        dyg, C, delta, acs, seq, dHd, l, h, p, g, n, Q, c, *_strides(dyg, C),
        TO_END=False, HAS_SEQ=seq_idx is not None, DOT=dot,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["WARPS"],
    )  # fmt: skip
    dS = torch.empty_like(Hin)
    dh0 = x.new_empty(b, h, p, n, dtype=f32)
    n_pn = triton.cdiv(p * n, cfg["BLOCK_PN"])
    dlast_pass = x.new_empty(b, h, c, n_pn, dtype=f32)
    _state_passing_bwd_kernel[(b, h, n_pn)](
        dHd, Hin, acs, dfinal if dfinal is not None else dummy, seq, dS, dh0, dlast_pass, l, h, p * n, Q, c,
        HAS_DFINAL=dfinal is not None, HAS_SEQ=seq_idx is not None, BLOCK_PN=cfg["BLOCK_PN"],
    )  # fmt: skip
    dx = x.new_empty(x.shape)
    dB_h = x.new_empty(b, l, h, n, dtype=f32)
    ddelta = torch.zeros_like(acs)
    dacs_k = torch.zeros_like(acs)
    dlast = dlast_pass.sum(-1)  # (b, h, c); the key kernel adds the chunk states' term
    _chunk_scan_bwd_key_kernel[(b * c, h, n_m)](
        x, B, C, D if D is not None else dummy, dyg, delta, acs, dS, seq, dx, dB_h, ddelta, dacs_k, dlast,
        l, h, p, g, n, Q, c, *_strides(x, B, C), HAS_D=D is not None, HAS_SEQ=seq_idx is not None, DOT=dot,
        **blocks,
    )  # fmt: skip

    # acs = cumsum of Δ·A within each chunk: ∂L/∂(Δ_t A) = Σ_{t' ≥ t in the chunk} ∂L/∂acs_t'
    dacs = (dacs_q + dacs_k).view(b, h, c, Q)
    dacs[..., -1] += dlast
    da = dacs.flip(-1).cumsum(-1).flip(-1).view(b, h, c * Q)  # (b, h, c·Q)
    dA = (da * delta).sum((0, 2))  # (h,)
    ddelta = (ddelta + da * A.view(1, h, 1)).transpose(1, 2)[:, :l]  # (b, l, h)
    dB = dB_h.view(b, l, g, h // g, n).sum(3)  # (b, l, g, n): the heads of a group share B
    dC = dC_h.view(b, l, g, h // g, n).sum(3)
    dD = dD_part.sum((0, 1)) if D is not None else None  # (h, p)
    return dx, ddelta, dA, dB, dC, dD, (dz if z is not None else None), dh0


class _SSDTriton(torch.autograd.Function):
    """Forward and backward: the Triton kernels above."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, Q, dt_softplus, dt_limit, save):
        # save: records_grad(...) from the caller (ctx.needs_input_grad is True under no_grad too)
        f32 = torch.float32
        p = x.shape[-1]
        x_, dt_, B_, C_, z_ = _rows(x), _rows(dt), _rows(B), _rows(C), _rows(z)  # views read in place
        A_, bias_, h0 = _own(A, f32), _own(dt_bias, f32), _own(initial_states, f32)
        D_ = _own(_per_channel_D(D.detach(), p), f32) if D is not None else None  # (h, p)
        seq = _own(seq_idx, torch.int32)
        y, final, delta, acs, Hin = _ssd_forward(x_, dt_, A_, B_, C_, Q, D_, z_, bias_, dt_softplus, dt_limit,
                                                 h0, seq)  # fmt: skip
        if save:
            ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero tensor read back
            ctx.save_for_backward(x_, dt_, A_, B_, C_, D_, z_, bias_, seq, delta, acs, Hin)
            ctx.meta = (Q, dt_softplus, dt_limit)
            ctx.dtypes = tuple(None if t is None else t.dtype for t in (dt, A, B, C, D, dt_bias, initial_states))
            ctx.D_per_head = D is not None and D.dim() == 1
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, z, dt_bias, seq, delta, acs, Hin = ctx.saved_tensors
        Q, dt_softplus, dt_limit = ctx.meta
        t_dt, t_A, t_B, t_C, t_D, t_bias, t_h0 = ctx.dtypes
        dy = dy.contiguous() if dy is not None else torch.zeros_like(x)
        dfinal = dfinal.to(torch.float32).contiguous() if dfinal is not None else None
        dx, ddelta, dA, dB, dC, dD, dz, dh0 = _ssd_backward(dy, dfinal, x, dt, A, B, C, D, z, dt_bias, seq, delta,
                                                            acs, Hin, Q, dt_softplus, dt_limit)  # fmt: skip
        need = ctx.needs_input_grad
        ddt = dbias = None
        if need[1] or need[7]:  # Δ = clamp(softplus(dt + dt_bias)): elementwise, (b, l, h), through autograd
            with torch.enable_grad():
                leaves = [dt.detach().requires_grad_()]
                if dt_bias is not None:
                    leaves.append(dt_bias.detach().requires_grad_())
                d = ssd_dt(leaves[0], leaves[1] if dt_bias is not None else None, dt_softplus, dt_limit)
                grads = torch.autograd.grad(d, leaves, ddelta)
            ddt = grads[0]
            dbias = grads[1].to(t_bias) if dt_bias is not None else None
        if dD is not None and ctx.D_per_head:
            dD = dD.sum(-1)
        return (
            dx if need[0] else None,
            ddt if need[1] else None,
            dA.to(t_A) if need[2] else None,
            dB.to(t_B) if need[3] else None,
            dC.to(t_C) if need[4] else None,
            dD.to(t_D) if dD is not None and need[5] else None,
            dz if need[6] else None,
            dbias if need[7] else None,
            dh0.to(t_h0) if t_h0 is not None and need[8] else None,
            None, None, None, None, None,
        )


def ssd_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
               return_final_states, cu_seqlens=None, return_varlen_states=False):  # fmt: skip
    """The Triton SSD of checked arguments (mambakit.ops.ssd); results as ssd_ref (float16, bfloat16 and
    float32 inputs; float32 states and accumulation). The varlen states (cu_seqlens) are computed from the
    forward's per-chunk states by cpu/ssd.py's torch `varlen_states`, forward only (the backward does not take
    their gradient, as in the official op)."""
    from ..reference import ssd_results

    if x.numel() == 0:  # b = 0 or p = 0: nothing to launch; the twin returns the empty results
        from ..reference import ssd_ref

        return ssd_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
                       return_final_states, cu_seqlens, return_varlen_states)  # fmt: skip
    save = records_grad(x, dt, A, B, C, D, z, dt_bias, initial_states)
    if return_varlen_states:
        if save:
            raise NotImplementedError(
                "return_varlen_states on the Triton backend is forward only (as the official op): call it without "
                "autograd recording (torch.no_grad()), or use backend='cpu' / 'reference' to differentiate them")
        return _ssd_triton_varlen(x, dt, A, B, C, int(chunk_size), D, z, dt_bias, bool(dt_softplus),
                                  tuple(dt_limit), initial_states, seq_idx, return_final_states, cu_seqlens)
    y, final = _SSDTriton.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, int(chunk_size),
                                bool(dt_softplus), tuple(dt_limit), save)  # fmt: skip
    return ssd_results(y, final, None, return_final_states)


def _ssd_triton_varlen(x, dt, A, B, C, Q, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
                       return_final_states, cu_seqlens):  # fmt: skip
    """The forward kernels, then the state after each packed sequence's last token from the states entering each
    chunk (Hin) and the cumulated log-decays they return."""
    from ..cpu.ssd import varlen_states
    from ..reference import ssd_results

    f32 = torch.float32
    b, l, h, p = x.shape
    c = triton.cdiv(l, Q)
    D_ = _own(_per_channel_D(D.detach(), p), f32) if D is not None else None
    y, final, delta, acs, Hin = _ssd_forward(
        _rows(x), _rows(dt), _own(A, f32), _rows(B), _rows(C), Q, D_, _rows(z), _own(dt_bias, f32), dt_softplus,
        dt_limit, _own(initial_states, f32), _own(seq_idx, torch.int32))  # fmt: skip
    acs_c = acs.view(b, h, c, Q).transpose(1, 2)  # (b, c, h, Q)
    delta_t = delta[:, :, :l].transpose(1, 2)  # (b, l, h)
    varlen = varlen_states(x[0].detach().to(f32), delta_t[0], acs_c[0], Hin[0], B[0].detach(), seq_idx[0],
                           cu_seqlens, None if initial_states is None else initial_states.detach().to(f32), Q)
    return ssd_results(y, final, varlen, return_final_states)


# ---------------------------------------------------------------------------------- the decoding step
@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, h, p, g, n, lo, hi,
    s_x_b, s_dt_b, s_B_b, s_C_b, s_z_b,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """state: (b, h, p, n), in place; x, z, y: (b, h, p); dt: (b, h); A, bias: (h,); B, C: (b, g, n);
    D: (h, p) float32. x, dt, B, C, z have the given batch strides (dense otherwise); state and y are
    contiguous."""
    pid_b, hd = tl.program_id(0), tl.program_id(1)
    grp = hd // (h // g)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    m_p, m_n = offs_p < p, offs_n < n
    m_pn = m_p[:, None] & m_n[None, :]
    bh = pid_b.to(tl.int64) * h + hd
    pb = pid_b.to(tl.int64)
    dt = tl.load(dt_ptr + pb * s_dt_b + hd).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + hd).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    decay = exp(dt * tl.load(A_ptr + hd).to(tl.float32))
    xv = tl.load(x_ptr + pb * s_x_b + hd * p + offs_p, mask=m_p, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + pb * s_B_b + grp * n + offs_n, mask=m_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pb * s_C_b + grp * n + offs_n, mask=m_n, other=0.0).to(tl.float32)
    sp = state_ptr + bh * p * n + offs_p[:, None] * n + offs_n[None, :]
    s = tl.load(sp, mask=m_pn, other=0.0).to(tl.float32)
    s = decay * s + (dt * xv)[:, None] * Bv[None, :]  # exp(Δ·A) h + Δ x Bᵀ
    tl.store(sp, s.to(state_ptr.dtype.element_ty), mask=m_pn)
    yv = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        yv += tl.load(D_ptr + hd * p + offs_p, mask=m_p, other=0.0) * xv
    if HAS_Z:
        zv = tl.load(z_ptr + pb * s_z_b + hd * p + offs_p, mask=m_p, other=0.0).to(tl.float32)
        yv = yv * zv * sigmoid(zv)
    tl.store(y_ptr + bh * p + offs_p, yv.to(y_ptr.dtype.element_ty), mask=m_p)


def ssd_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit):
    """The Triton SSD decoding step of checked arguments (mambakit.ops.ssd_state_update); results as
    ssd_state_update_ref. The state is updated in place (through a copy when it is not contiguous), computed
    in float32 and stored back in its own dtype."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    f32 = torch.float32
    st = state if state.is_contiguous() else state.contiguous()
    x_, dt_, B_, C_ = _rows(x, 1), _rows(dt, 1), _rows(B, 1), _rows(C, 1)  # the model's slices, read in place
    z_ = _rows(z, 1) if z is not None else x_
    y = x.new_empty(x.shape)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(triton.next_power_of_2(p), 4096 // block_n))  # one (p, n) state block a program
    if y.numel():
        _ssd_step_kernel[(b, h, triton.cdiv(p, block_p))](
            st, x_, dt_, _own(A, f32), B_, C_, _own(_per_channel_D(D.detach(), p), f32) if D is not None else x_,
            z_, _own(dt_bias, f32) if dt_bias is not None else x_, y, h, p, g, n, lo, hi,
            x_.stride(0), dt_.stride(0), B_.stride(0), C_.stride(0), z_.stride(0),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
            HAS_LIMIT=(lo, hi) != (0.0, float("inf")), BLOCK_P=block_p, BLOCK_N=block_n,
        )  # fmt: skip
    if st.data_ptr() != state.data_ptr():
        state.copy_(st)
    return y
