"""SSD (the Mamba-2 scan) on CPU as the chunked algorithm of "Transformers are SSMs" (Dao & Gu 2024, Section 6):
batched matrix multiplications, so the work runs in oneDNN/BLAS GEMMs, and autograd differentiates it.
The entry points trust their arguments: only mambakit.ops calls them, after checking.

Dimensions: b batch, l length, h heads, p head dim, g groups (head i reads B, C of group i // (h // g); the
heads of one group are contiguous, so h views as (g, hg) with hg = h // g), n state size, Q the chunk size,
c = ceil(l / Q) chunks. a_t = Δ_t·A ≤ 0 is the log-decay of step t; acs its cumulative sum within a chunk.

Per chunk (Section 6, the four steps of the block decomposition):
1. Inside the chunk, the dual quadratic form: y = (L ∘ C Bᵀ) (Δ·x) with L[t, s] = exp(acs_t − acs_s) for
   s ≤ t (0 above the diagonal). C Bᵀ is computed once per group, not per head.
2. The chunk's own state at its end, from a zero start: Σ_s exp(acs_Q − acs_s) Δ_s x_s B_sᵀ.
3. States passed between chunks: H_{k+1} = exp(acs_Q of chunk k)·H_k + (state of chunk k); sequential over
   chunks only (c steps of (b, h, p, n)).
4. The incoming state's share of each output: exp(acs_t)·H_k C_t.

Steps 1 and 4 are summed by `intra_chunk`. Without autograd (inference, float32 compute) the whole forward runs
instead as ssd_fused.py's `chunked_inference`: the same GEMMs, with everything between them in three numba
kernels, chunk group by chunk group through reused workspaces (this file stays its torch twin).

Packed variable-length sequences (cu_seqlens, batch 1) run as seq_idx; `varlen_states` then gives the state
after each sequence's last token from the states entering the chunks.

Memory: the inputs padded to c·Q, the (b, c, h, Q, Q) decay and score blocks (b·l·h·Q elements, the same
order as x for Q ≲ p) and the (b, c, h, p, n) chunk states; never the (b, l, h, p, n) states of every step.

Packed sequences (seq_idx): every term that crosses a change of seq_idx is masked out: L[t, s] where
seq_idx_t ≠ seq_idx_s, a chunk's state keeps only tokens of its last token's sequence, the carried state is
dropped where the chunk ends in another sequence than the one it was carried from, and it reaches only the
tokens of that sequence. The state before the first token counts as sequence 0 (the official convention, so
initial_states feeds seq_idx 0).

Precision: float64 inputs compute in float64 and float32 inputs in float32. For bfloat16 inputs the GEMM
operands are bfloat16 (oneDNN's bf16 dot products, float32 accumulation inside) and their outputs are widened
at once; decays, cumulative sums, the passed states and the final states stay float32. float16 computes in
float32 (its range is too small for unscaled scores, and CPU float16 GEMMs are not faster).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import _per_channel_D, compute_dtype, ssd_dt, ssd_results, varlen_initial
from .primitives import records_grad


# The longest block the CPU path uses, whatever chunk_size asks for (smaller ones are honoured). The chunk size is a
# tiling choice (256 suits the official GPU kernel); on this CPU, training (forward + backward through autograd)
# ran 1.7× faster with 128-token blocks than with 256 (64 about the same as 128) and inference no slower
# (`benchmarks/ssd.py`; the figures are in docs/kernels.md).
CPU_BLOCK = 128
# The same cap for inference (the fused path of ssd_fused.py, no autograd): 64-token blocks halve the masked
# intra-chunk GEMM and the scores, and ran as fast as 128 or faster at the 130m shape (1.15× in bfloat16 at l =
# 4096; docs/kernels.md).
CPU_INFERENCE_BLOCK = 64


def _gemm(a: Tensor, b: Tensor, gemm_dtype: torch.dtype, acc: torch.dtype) -> Tensor:
    """a @ b with operands in gemm_dtype and the result in acc."""
    return torch.matmul(a.to(gemm_dtype), b.to(gemm_dtype)).to(acc)


def _pad_time(t: Tensor, pad: int) -> Tensor:
    """t (b, l, …) with `pad` zero steps appended: padded steps have Δ = 0 (decay 1, no input), so they
    change neither the outputs kept nor the final state."""
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], pad) + tuple(t.shape[2:]))], dim=1)


def intra_chunk(xbar: Tensor, acs: Tensor, CB: Tensor, y_in: Tensor, from_start: Tensor, seq: Tensor | None,
                gemm: torch.dtype) -> Tensor:
    """Steps 1 and 4 of the chunked SSD summed: y_t = from_start_t · y_in_t + Σ_{s ≤ t} exp(acs_t − acs_s)·CB[t, s]·x̄_s
    over the tokens s of t's chunk and sequence, in plain torch (autograd differentiates it).

    xbar (b, L, h, p) = Δ·x, L = c·Q; acs (b, c, h, Q) log-decays cumulated from each chunk's start; CB
    (b, c, g, Q_t, Q_s) = C_t·B_s; y_in (b, c, g, Q, hg·p) = C_t·H of the chunk's incoming state; from_start
    (b, c, h, Q) = exp(acs_t), zero where t is not in the carried state's sequence; seq (b, L) or None; gemm:
    the GEMM operands' dtype. Returns y (b, L, h, p) in acs's dtype."""
    b, c, h, Q = acs.shape
    g, p = CB.shape[2], xbar.shape[-1]
    hg = h // g
    acc = acs.dtype
    mask = torch.ones(Q, Q, dtype=torch.bool, device=xbar.device).tril()  # (Q_t, Q_s)
    if seq is not None:
        sc = seq.view(b, c, Q)
        mask = (mask & (sc.unsqueeze(-1) == sc.unsqueeze(-2))).unsqueeze(2)  # (b, c, 1, Q_t, Q_s)
    # Differences of one chunk's cumsum, as the official kernel: the cumsum restarts every chunk, so its
    # magnitude (and the cancellation) stays bounded by Q steps. Masked entries go to −inf before exp: above the
    # diagonal acs_t − acs_s > 0 could overflow, and exp(−inf) = 0 has a zero gradient.
    seg = acs.unsqueeze(-1) - acs.unsqueeze(-2)  # (b, c, h, Q_t, Q_s)
    decay = torch.exp(seg.masked_fill_(~mask, float("-inf")))  # in place: the subtraction saves nothing for backward
    scores = decay.view(b, c, g, hg, Q, Q) * CB.unsqueeze(3)  # (b, c, g, hg, Q_t, Q_s)
    xb = xbar.reshape(b, c, Q, g, hg, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, hg, Q, p)
    y = _gemm(scores, xb, gemm, acc)  # (b, c, g, hg, Q, p)
    y_in = y_in.view(b, c, g, Q, hg, p).transpose(3, 4)  # (b, c, g, hg, Q, p)
    y = y + y_in * from_start.view(b, c, g, hg, Q, 1)
    return y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * Q, h, p)  # time-major


def ssd_cpu(
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
    """The chunked SSD; arguments and results as `reference.ssd_ref`."""
    acc = compute_dtype(x)
    gemm = torch.bfloat16 if x.dtype == torch.bfloat16 else acc
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    # Inference (no autograd) on the CPU in float32/bfloat16 arithmetic runs the fused kernels of ssd_fused.py.
    inference = acc == torch.float32 and x.device.type == "cpu" and not records_grad(
        x, dt, A, B, C, D, z, dt_bias, initial_states)
    Q = int(chunk_size)
    if x.device.type == "cpu":  # a block length, not a result: see CPU_BLOCK
        Q = min(Q, CPU_INFERENCE_BLOCK if inference else CPU_BLOCK)
    c = max(1, -(-l // Q))
    pad = c * Q - l
    L = c * Q

    # 0. Discretise; pad time to whole chunks; chunk-major views.
    delta = _pad_time(ssd_dt(dt, dt_bias, dt_softplus, dt_limit).to(acc), pad)  # (b, L, h)
    acs = (delta * A.to(acc)).reshape(b, c, Q, h).cumsum(2).transpose(2, 3)  # (b, c, h, Q): log-decay from chunk start
    Bc = _pad_time(B, pad).reshape(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)
    Cc = _pad_time(C, pad).reshape(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)
    to_end = torch.exp(acs[..., -1:] - acs)  # (b, c, h, Q): decay from each token to its chunk's end
    chunk_decay = torch.exp(acs[..., -1])  # (b, c, h)
    from_start = torch.exp(acs)  # (b, c, h, Q): decay from the chunk's start to each token
    seq = None
    if seq_idx is not None:
        # padded steps continue the row's last sequence, so they keep its state
        s = torch.cat([seq_idx, seq_idx[:, -1:].expand(b, pad)], dim=1).reshape(b, c, Q)  # (b, c, Q)
        last = s[:, :, -1]  # (b, c): the sequence each chunk ends in
        before = torch.cat([last.new_zeros(b, 1), last[:, :-1]], dim=1)  # (b, c): the carried state's sequence
        to_end = to_end * (s == last.unsqueeze(-1)).unsqueeze(2)  # a chunk's state: only its last sequence
        chunk_decay = chunk_decay * (last == before).unsqueeze(-1)  # the carry stops where a sequence ends
        from_start = from_start * (s == before.unsqueeze(-1)).unsqueeze(2)  # the carried state: its sequence only
        seq = s.reshape(b, L)
    carried = initial_states.to(acc) if initial_states is not None else x.new_zeros(b, h, p, n, dtype=acc)

    if inference:
        from .ssd_fused import chunked_inference

        Dm = _per_channel_D(D.to(acc), p) if D is not None else None
        y, final, incoming = chunked_inference(x, delta, acs, to_end, chunk_decay, from_start, Bc, Cc, seq, Dm, z,
                                               carried.clone(), gemm, keep_incoming=return_varlen_states)
        varlen = None
        if return_varlen_states:
            varlen = varlen_states(x[0].to(acc), delta[0, :l], acs[0], incoming[0], B[0], seq_idx[0], cu_seqlens,
                                   initial_states, Q)
        return ssd_results(y.to(x.dtype), final, varlen, return_final_states)

    xbar_t = _pad_time(x.to(acc) * delta.narrow(1, 0, l).unsqueeze(-1), pad)  # (b, L, h, p): Δ·x
    xbar = xbar_t.reshape(b, c, Q, g, hg, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, hg, Q, p)

    # 1. C·Bᵀ inside each chunk, once per group (the rest of step 1 is summed with step 4 below).
    CB = _gemm(Cc, Bc.transpose(-1, -2), gemm, acc)  # (b, c, g, Q_t, Q_s)

    # 2. Each chunk's state at its end from a zero start; the heads of a group share one GEMM with B.
    weighted = (xbar * to_end.view(b, c, g, hg, Q, 1)).transpose(-1, -2)  # (b, c, g, hg, p, Q)
    states = _gemm(weighted.reshape(b, c, g, hg * p, Q), Bc, gemm, acc)  # (b, c, g, hg·p, n)
    states = states.view(b, c, h, p, n)

    # 3. Pass states between chunks (sequential over c only).
    incoming = []
    for k in range(c):
        incoming.append(carried)
        carried = chunk_decay[:, k, :, None, None] * carried + states[:, k]
    final = carried  # (b, h, p, n)
    incoming = torch.stack(incoming, dim=1)  # (b, c, h, p, n)

    # 4. The incoming state's share: exp(acs_t)·H C_t, one GEMM per group (the decay applied with step 1).
    Hg = incoming.view(b, c, g, hg * p, n).transpose(-1, -2)  # (b, c, g, n, hg·p)
    y_in = _gemm(Cc, Hg, gemm, acc)  # (b, c, g, Q, hg·p)
    # Steps 1 and 4 summed, time-major.
    y = intra_chunk(xbar_t, acs, CB, y_in, from_start, seq, gemm)[:, :l]  # (b, l, h, p)

    # 5. The skip and the gate.
    if D is not None:
        y = y + x.to(acc) * _per_channel_D(D.to(acc), p)
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(x.dtype)
    varlen = None
    if return_varlen_states:
        varlen = varlen_states(x[0].to(acc), delta[0, :l], acs[0], incoming[0], B[0], seq_idx[0], cu_seqlens,
                               initial_states, Q)
    return ssd_results(y, final, varlen, return_final_states)


# Gathered tokens per batch of sequences in varlen_states (bounds its temporaries: 4M elements, 16 MB float32).
_VARLEN_BATCH = 1 << 22


def varlen_states(x: Tensor, delta: Tensor, acs: Tensor, incoming: Tensor, B: Tensor, seq: Tensor, cu_seqlens: Tensor,
                  initial_states: Tensor | None, Q: int) -> Tensor:
    """The state after each packed sequence's last token (the official `return_varlen_states`), from the chunked
    forward's pieces, in torch (autograd differentiates it; the Triton path calls it too).

    For batch row 0: x (l, h, p) and delta (l, h) in the compute dtype; acs (c, h, Q) the log-decays cumulated
    from each chunk's start; incoming (c, h, p, n) the state entering each chunk; B (l, g, n); seq (l,) the
    sequence of each token (from cu_seqlens); cu_seqlens (m + 1,). Returns (m, h, p, n) in incoming's dtype.

    Sequence i ends at token e in chunk k = e // Q, at q = e % Q. Its state is the entering state decayed to q,
    if that state is i's (the chunk's predecessor ended inside sequence i), plus the tokens s ≤ q of chunk k in
    sequence i: Σ_s exp(acs_q − acs_s)·Δ_s x_s B_sᵀ. An empty sequence keeps its starting state
    (`reference.varlen_initial`)."""
    l, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    hg = h // g
    cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
    m = cu.numel() - 1
    acc = incoming.dtype
    cu_list = [int(v) for v in cu.tolist()]
    out = torch.stack([varlen_initial(i, cu_list, initial_states, (h, p, n), incoming) for i in range(m)])
    ids_all = torch.nonzero(cu[1:] > cu[:-1]).squeeze(1)  # (m',): the sequences that have tokens
    step = max(1, _VARLEN_BATCH // (Q * h * p))
    ar = torch.arange(Q, device=x.device)
    for j in range(0, ids_all.numel(), step):
        ids = ids_all[j:j + step]  # (s,)
        e = cu[ids + 1] - 1  # (s,): each sequence's last token
        k, q = e // Q, e % Q
        pos = (k.unsqueeze(1) * Q + ar).clamp(max=l - 1)  # (s, Q): the tokens of chunk k (clamped past l: unused)
        used = (ar <= q.unsqueeze(1)) & (seq[pos] == ids.unsqueeze(1))  # (s, Q): s ≤ q, in sequence i
        a = acs[k]  # (s, h, Q)
        a_end = a.gather(2, q.view(-1, 1, 1).expand(-1, h, 1))  # (s, h, 1)
        w = torch.exp((a_end - a).masked_fill(~used.unsqueeze(1), float("-inf")))  # (s, h, Q)
        xw = x[pos] * (delta[pos] * w.transpose(1, 2)).unsqueeze(-1)  # (s, Q, h, p): Δ_s·x_s·decay to q
        xw = xw.reshape(-1, Q, g, hg * p).permute(0, 2, 3, 1)  # (s, g, hg·p, Q)
        part = torch.matmul(xw, B[pos].to(acc).transpose(1, 2)).reshape(-1, h, p, n)  # (s, h, p, n)
        # the state entering chunk k is sequence `before`'s: that of token kQ − 1 (sequence 0 for k = 0)
        before = torch.where(k > 0, seq[(k * Q - 1).clamp(min=0)], torch.zeros_like(k))
        carry = torch.exp(a_end.squeeze(-1)) * (before == ids).unsqueeze(1)  # (s, h)
        st = carry[..., None, None] * incoming[k] + part
        out = out.index_put((ids,), st)
    return out


def ssd_state_update_cpu(
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
    """One SSD step; arguments as `reference.ssd_state_update_ref`. A float32 state on the CPU takes the numba
    kernel of ssd_step.py; otherwise (float64, other devices) this torch version runs. Groups are read through a (b, g, hg, …) view
    rather than copied per head, and the state is scaled and accumulated in place (no (b, h, p, n) temporaries
    beyond one outer product)."""
    if state.device.type == "cpu" and state.dtype == torch.float32:
        from .ssd_step import ssd_state_update_fused  # one pass over the state (ssd_step.py)

        return ssd_state_update_fused(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit)
    acc = compute_dtype(state)
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    hg = h // g
    delta = ssd_dt(dt, dt_bias, dt_softplus, dt_limit).to(acc)  # (b, h)
    x_ = x.to(acc)
    work = state if state.dtype == acc and state.is_contiguous() else state.to(acc).contiguous()
    work.mul_(torch.exp(delta * A.to(acc))[..., None, None])
    dx = (delta.unsqueeze(-1) * x_).reshape(b, g, hg * p, 1)  # (b, g, hg·p, 1): Δ·x
    work.view(b, g, hg * p, n).add_(dx * B.to(acc).unsqueeze(2))  # + Δ x Bᵀ, B (b, g, 1, n)
    y = torch.matmul(work.view(b, g, hg * p, n), C.to(acc).unsqueeze(-1)).view(b, h, p)  # h_t C_t
    if work is not state:
        state.copy_(work)
    if D is not None:
        y = y + x_ * _per_channel_D(D.to(acc), p)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)
