"""SSD (the Mamba-2 scan) on GPU: Triton kernels for the chunked algorithm and for the decoding step.

The chunked algorithm of "Transformers are SSMs" (Dao & Gu 2024, Section 6), written from its math (see
cpu/ssd.py for the same steps in torch GEMMs). Dimensions: b batch, l length, h heads, p head dim, g groups
(head i reads B, C of group i // (h // g)), n state size, Q the chunk size, c = ceil(l / Q) chunks. Per head,
a_t = Δ_t·A ≤ 0 is the log-decay of step t and acs_t its inclusive cumulative sum within the chunk. Four
kernels, each one pass:

1. `_dt_cumsum_kernel`, one program per (sequence, chunk, block of heads): Δ = clamp(softplus(dt + dt_bias))
   and acs = cumsum(Δ·A) over the chunk, (b, h, c·Q) float32 each. Steps past l get Δ = 0 (decay 1, no
   input): they change neither the outputs kept nor the final state, so no other kernel special-cases them.
2. `_chunk_state_kernel`, per (sequence·chunk, head, block of p): the chunk's own state at its end from a zero
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

Backward: the forward kernels save nothing but the inputs; the backward recomputes the forward with the
chunked torch path (cpu/ssd.py, which runs on any device and is tested against the reference to 1e-10 in
float64, gradcheck included) and differentiates that with autograd. A Triton backward would be faster; this
keeps every gradient exact to a tested path (docs/kernels.md).

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
from ..reference import _per_channel_D
from .common import exp, sigmoid, softplus

# Overrides for the block sizes (tests shrink them so that tiny shapes span several blocks): BLOCK_M (queries
# and keys per block of the chunk), BLOCK_P, BLOCK_H (heads per program of the Δ cumsum), BLOCK_PN (state
# elements per program of the state passing).
TILES: dict[str, int] = {}

# The matrix products' operand type (constexpr DOT): float32 in IEEE, float16, bfloat16.
_DOT_F32, _DOT_F16, _DOT_BF16 = 0, 1, 2


def ssd_config(Q: int, p: int, n: int) -> dict:
    """Block sizes. tl.dot needs every dimension ≥ 16 and a power of two: blocks are padded and masked.
    BLOCK_N covers the whole state (n ≤ 256 in released models) so C Bᵀ is one product per key block; queries
    and keys of a chunk go in blocks of 64 (a 256-step chunk: 4 × 4 blocks, half of them masked out)."""
    block_q = max(16, triton.next_power_of_2(Q))
    return dict(
        BLOCK_Q=block_q,
        BLOCK_M=TILES.get("BLOCK_M", min(64, block_q)),
        BLOCK_P=TILES.get("BLOCK_P", min(64, max(16, triton.next_power_of_2(p)))),
        BLOCK_N=max(16, triton.next_power_of_2(n)),
        BLOCK_H=TILES.get("BLOCK_H", 8),
        BLOCK_PN=TILES.get("BLOCK_PN", 1024),
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
def _seq_at(seq_ptr, pid_b, t, l):
    """seq_idx of steps t of sequence pid_b; steps past l continue the last one."""
    return tl.load(seq_ptr + pid_b.to(tl.int64) * l + tl.minimum(t, l - 1))


# ------------------------------------------------------------------------------- 1. Δ and its cumsum
@triton.jit
def _dt_cumsum_kernel(
    dt_ptr, A_ptr, bias_ptr, delta_ptr, acs_ptr, l, h, Q, n_chunks, lo, hi,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """dt: (b, l, h); A, bias: (h,); delta, acs: (b, h, c·Q) float32."""
    pid_b, pid_c = tl.program_id(0), tl.program_id(1)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = pid_c * Q + offs_q
    m_t = (offs_q < Q) & (t < l)
    m_h = offs_h < h
    m = m_t[:, None] & m_h[None, :]  # (BLOCK_Q, BLOCK_H)
    v = tl.load(dt_ptr + (pid_b.to(tl.int64) * l + t)[:, None] * h + offs_h[None, :], mask=m, other=0.0)
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
def _chunk_state_kernel(
    x_ptr, B_ptr, delta_ptr, acs_ptr, seq_ptr, S_ptr, l, h, p, g, n, Q, n_chunks,
    HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """x: (b, l, h, p); B: (b, l, g, n); delta, acs: (b, h, c·Q); seq: (b, l) int32; S: (b, c, h, p, n) float32,
    S = Σ_s exp(acs_last − acs_s) Δ_s x_s B_sᵀ over the chunk."""
    pid_bc, hd = tl.program_id(0), tl.program_id(1)
    pid_b, pid_c = pid_bc // n_chunks, pid_bc % n_chunks
    grp = hd // (h // g)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    m_p, m_n = offs_p < p, offs_n < n
    row = (pid_b.to(tl.int64) * h + hd) * (n_chunks * Q) + pid_c * Q  # this chunk in delta, acs
    acs_last = tl.load(acs_ptr + row + Q - 1)
    if HAS_SEQ:
        seq_last = _seq_at(seq_ptr, pid_b, pid_c * Q + Q - 1, l)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Q, BLOCK_M):
        offs_s = k0 + tl.arange(0, BLOCK_M)
        t = pid_c * Q + offs_s
        m_s = (offs_s < Q) & (t < l)
        xs = tl.load(x_ptr + ((pid_b.to(tl.int64) * l + t)[:, None] * h + hd) * p + offs_p[None, :],
                     mask=m_s[:, None] & m_p[None, :], other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_P)
        Bs = tl.load(B_ptr + ((pid_b.to(tl.int64) * l + t)[:, None] * g + grp) * n + offs_n[None, :],
                     mask=m_s[:, None] & m_n[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        d_s = tl.load(delta_ptr + row + offs_s, mask=m_s, other=0.0)
        a_s = tl.load(acs_ptr + row + offs_s, mask=m_s, other=0.0)
        w = tl.where(m_s, exp(acs_last - a_s) * d_s, 0.0)
        if HAS_SEQ:
            w = tl.where(_seq_at(seq_ptr, pid_b, t, l) == seq_last, w, 0.0)
        acc += _mm(tl.trans(xs * w[:, None]), Bs, DOT)
    out = ((pid_b.to(tl.int64) * n_chunks + pid_c) * h + hd) * p * n
    tl.store(S_ptr + out + offs_p[:, None] * n + offs_n[None, :], acc, mask=m_p[:, None] & m_n[None, :])


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
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """x, z, y: (b, l, h, p); B, C: (b, l, g, n); D: (h, p) float32; delta, acs: (b, h, c·Q); Hin: (b, c, h, p, n)
    float32; seq: (b, l) int32. Program axis 2 runs over (block of queries, block of p), queries major."""
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
    Cm = tl.load(C_ptr + ((base + t_m)[:, None] * g + grp) * n + offs_n[None, :],
                 mask=m_m[:, None] & m_n[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
    if HAS_SEQ:
        seq_m = _seq_at(seq_ptr, pid_b, t_m, l)

    # the incoming state's share, exp(acs_t)·H C_t, only for tokens of the carried state's sequence
    Hin = tl.load(Hin_ptr + ((pid_b.to(tl.int64) * n_chunks + pid_c) * h + hd) * p * n
                  + offs_p[None, :] * n + offs_n[:, None], mask=m_n[:, None] & m_p[None, :], other=0.0)  # Hᵀ (BLOCK_N, BLOCK_P)
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
        Bs = tl.load(B_ptr + ((base + t_s)[None, :] * g + grp) * n + offs_n[:, None],
                     mask=m_n[:, None] & m_s[None, :], other=0.0)  # Bᵀ (BLOCK_N, BLOCK_M)
        CB = _mm(Cm, Bs, DOT)  # (BLOCK_M queries, BLOCK_M keys)
        a_s = tl.load(acs_ptr + row + offs_s, mask=offs_s < Q, other=0.0)
        d_s = tl.load(delta_ptr + row + offs_s, mask=m_s, other=0.0)
        keep = (offs_m[:, None] >= offs_s[None, :]) & m_s[None, :]
        if HAS_SEQ:
            keep = keep & (seq_m[:, None] == _seq_at(seq_ptr, pid_b, t_s, l)[None, :])
        scores = tl.where(keep, CB * exp(tl.minimum(a_m[:, None] - a_s[None, :], 0.0)) * d_s[None, :], 0.0)
        xs = tl.load(x_ptr + ((base + t_s)[:, None] * h + hd) * p + offs_p[None, :],
                     mask=m_s[:, None] & m_p[None, :], other=0.0)  # (BLOCK_M, BLOCK_P)
        acc += _mm(scores, xs, DOT)

    at = ((base + t_m)[:, None] * h + hd) * p + offs_p[None, :]
    m_mp = m_m[:, None] & m_p[None, :]
    if HAS_D:
        xm = tl.load(x_ptr + at, mask=m_mp, other=0.0).to(tl.float32)
        acc += tl.load(D_ptr + hd * p + offs_p, mask=m_p, other=0.0)[None, :] * xm
    if HAS_Z:
        zm = tl.load(z_ptr + at, mask=m_mp, other=0.0).to(tl.float32)
        acc = acc * zm * sigmoid(zm)
    tl.store(y_ptr + at, acc.to(y_ptr.dtype.element_ty), mask=m_mp)


# ------------------------------------------------------------------------------------------ the forward
def _dot_type(x: Tensor) -> int:
    if x.dtype == torch.float16:
        return _DOT_F16
    if x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") != "1":
        return _DOT_BF16
    return _DOT_F32


def _own(x: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
    """x detached and contiguous (in `dtype` if given): the kernels index dense row-major memory."""
    if x is None:
        return None
    x = x.detach()
    return (x.to(dtype) if dtype is not None else x).contiguous()


def _ssd_forward(x, dt, A, B, C, Q, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx):
    """The four kernels: y (b, l, h, p) in x's dtype and the final states (b, h, p, n) float32."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    c = triton.cdiv(l, Q)
    cfg = ssd_config(Q, p, n)
    f32 = torch.float32
    x_, dt_, B_, C_ = _own(x), _own(dt), _own(B), _own(C)
    dummy = x_.new_empty(1, dtype=f32)
    seq = _own(seq_idx, torch.int32) if seq_idx is not None else dummy
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    dot = _dot_type(x)

    delta = x_.new_empty(b, h, c * Q, dtype=f32)
    acs = torch.empty_like(delta)
    _dt_cumsum_kernel[(b, c, triton.cdiv(h, cfg["BLOCK_H"]))](
        dt_, _own(A, f32), _own(dt_bias, f32) if dt_bias is not None else dummy, delta, acs, l, h, Q, c, lo, hi,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=(lo, hi) != (0.0, float("inf")),
        BLOCK_Q=cfg["BLOCK_Q"], BLOCK_H=cfg["BLOCK_H"],
    )  # fmt: skip
    S = x_.new_empty(b, c, h, p, n, dtype=f32)
    _chunk_state_kernel[(b * c, h, triton.cdiv(p, cfg["BLOCK_P"]))](
        x_, B_, delta, acs, seq, S, l, h, p, g, n, Q, c,
        HAS_SEQ=seq_idx is not None, DOT=dot, BLOCK_M=cfg["BLOCK_M"], BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"],
    )  # fmt: skip
    Hin = torch.empty_like(S)
    final = x_.new_empty(b, h, p, n, dtype=f32)
    h0 = _own(initial_states, f32) if initial_states is not None else dummy
    _state_passing_kernel[(b, h, triton.cdiv(p * n, cfg["BLOCK_PN"]))](
        S, acs, h0, seq, Hin, final, l, h, p * n, Q, c,
        HAS_H0=initial_states is not None, HAS_SEQ=seq_idx is not None, BLOCK_PN=cfg["BLOCK_PN"],
    )  # fmt: skip
    y = torch.empty_like(x_)
    D_ = _own(_per_channel_D(D.detach(), p), f32) if D is not None else dummy  # (h, p)
    grid = (b * c, h, triton.cdiv(min(Q, cfg["BLOCK_Q"]), cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_P"]))
    _chunk_scan_kernel[grid](
        x_, B_, C_, D_, _own(z) if z is not None else x_, delta, acs, Hin, seq, y, l, h, p, g, n, Q, c,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, DOT=dot,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"],
    )  # fmt: skip
    return y, final


class _SSDTriton(torch.autograd.Function):
    """Forward: the Triton kernels. Backward: recomputes through the chunked torch path (cpu/ssd.py) and
    differentiates it (see the module's docstring)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, Q, dt_softplus, dt_limit, save):
        # save: records_grad(...) from the caller (ctx.needs_input_grad is True under no_grad too)
        y, final = _ssd_forward(x, dt, A, B, C, Q, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx)
        if save:
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
            ctx.meta = (Q, dt_softplus, dt_limit)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        from ..cpu.ssd import ssd_cpu

        saved = ctx.saved_tensors
        Q, dt_softplus, dt_limit = ctx.meta
        need = ctx.needs_input_grad[:9]  # x, dt, A, B, C, D, z, dt_bias, initial_states
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() if t is not None and nd else (t.detach() if t is not None else None)
                      for t, nd in zip(saved[:9], need)]  # fmt: skip
            x, dt, A, B, C, D, z, dt_bias, h0 = leaves
            y, final = ssd_cpu(x, dt, A, B, C, Q, D, z, dt_bias, dt_softplus, dt_limit, h0, saved[9], True)
            outs, grads_out = [], []
            for o, go in ((y, dy), (final, dfinal)):
                if go is not None:
                    outs.append(o)
                    grads_out.append(go)
            wanted = [t for t, nd in zip(leaves, need) if t is not None and nd]
            grads = iter(torch.autograd.grad(outs, wanted, grads_out, allow_unused=True) if wanted else ())
        result = []
        for t, nd in zip(leaves, need):
            gr = next(grads) if t is not None and nd else None
            result.append(torch.zeros_like(t) if gr is None and t is not None and nd else gr)
        return (*result, None, None, None, None, None)


def ssd_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
               return_final_states):  # fmt: skip
    """The Triton SSD of checked arguments (mambakit.ops.ssd); results as ssd_ref (float16, bfloat16 and
    float32 inputs; float32 states and accumulation)."""
    save = records_grad(x, dt, A, B, C, D, z, dt_bias, initial_states)
    y, final = _SSDTriton.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, int(chunk_size),
                                bool(dt_softplus), tuple(dt_limit), save)  # fmt: skip
    return (y, final) if return_final_states else y


# ---------------------------------------------------------------------------------- the decoding step
@triton.jit
def _ssd_step_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, h, p, g, n, lo, hi,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """state: (b, h, p, n), in place; x, z, y: (b, h, p); dt: (b, h); A, bias: (h,); B, C: (b, g, n);
    D: (h, p) float32."""
    pid_b, hd = tl.program_id(0), tl.program_id(1)
    grp = hd // (h // g)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    m_p, m_n = offs_p < p, offs_n < n
    m_pn = m_p[:, None] & m_n[None, :]
    bh = pid_b.to(tl.int64) * h + hd
    dt = tl.load(dt_ptr + bh).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + hd).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    decay = exp(dt * tl.load(A_ptr + hd).to(tl.float32))
    xv = tl.load(x_ptr + bh * p + offs_p, mask=m_p, other=0.0).to(tl.float32)
    gn = (pid_b.to(tl.int64) * g + grp) * n + offs_n
    Bv = tl.load(B_ptr + gn, mask=m_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + gn, mask=m_n, other=0.0).to(tl.float32)
    sp = state_ptr + bh * p * n + offs_p[:, None] * n + offs_n[None, :]
    s = tl.load(sp, mask=m_pn, other=0.0).to(tl.float32)
    s = decay * s + (dt * xv)[:, None] * Bv[None, :]  # exp(Δ·A) h + Δ x Bᵀ
    tl.store(sp, s.to(state_ptr.dtype.element_ty), mask=m_pn)
    yv = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        yv += tl.load(D_ptr + hd * p + offs_p, mask=m_p, other=0.0) * xv
    if HAS_Z:
        zv = tl.load(z_ptr + bh * p + offs_p, mask=m_p, other=0.0).to(tl.float32)
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
    x_ = _own(x)
    y = torch.empty_like(x_)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(triton.next_power_of_2(p), 4096 // block_n))  # one (p, n) state block a program
    if y.numel():
        _ssd_step_kernel[(b, h, triton.cdiv(p, block_p))](
            st, x_, _own(dt), _own(A, f32), _own(B), _own(C),
            _own(_per_channel_D(D.detach(), p), f32) if D is not None else x_,
            _own(z) if z is not None else x_, _own(dt_bias, f32) if dt_bias is not None else x_, y,
            h, p, g, n, lo, hi,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
            HAS_LIMIT=(lo, hi) != (0.0, float("inf")), BLOCK_P=block_p, BLOCK_N=block_n,
        )  # fmt: skip
    if st.data_ptr() != state.data_ptr():
        state.copy_(st)
    return y
