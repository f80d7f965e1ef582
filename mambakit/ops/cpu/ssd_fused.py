"""The chunked SSD (ssd.py) for inference: every step that is not a GEMM in three numba kernels, so that a
forward makes a few passes over memory around the four GEMMs and no more.

Why: written in torch, the steps between the GEMMs (Δ·x, its decay-weighted copy, the (b, c, h, Q, Q) decay
and score blocks, the state passing, the skip, the gate, the casts) each make a full pass over memory, and at
the 130m shape those passes cost more than the GEMMs. A hand-written intra-chunk product (y_t = Σ_s w_ts x̄_s,
one output row at a time) cannot keep its accumulators in registers without fast-math, so it ran at a fraction
of a GEMM's speed; here the scores are built once and multiplied in a batched GEMM instead.

The pipeline (b batch, c chunks of Q tokens, h heads of p channels, g groups, hg = h // g, n state size):

    prepare   (numba)  x̄ = Δ·x per chunk and head (b, c, h, Q, p); the same weighted by the decay to the chunk's
                       end, laid out per group (b, c, g, Q, hg·p); the scores S_ts = exp(acs_t − acs_s)·(C_t·B_s)
                       for s ≤ t in t's sequence, 0 elsewhere (b, c, h, Q, Q)
    states    (GEMM)   each chunk's own final state, (x̄·decay)ᵀ B per group: (b, c, g, hg·p, n)
    pass      (numba)  the states entering each chunk, H_{k+1} = exp(acs_Q)·H_k + S_k: (b, c, h, p, n); the final
    y_in      (GEMM)   the entering state's share C_t·H per group: (b, c, g, Q, hg·p)
    intra     (GEMM)   S x̄ per chunk and head: (b, c, h, Q, p)
    combine   (numba)  y = intra + exp(acs_t)·y_in + D·x, · silu(z), time-major, in x's dtype

The GEMM operands are float32 for float32 inputs and bfloat16 for bfloat16 ones (oneDNN's bf16 dot products, as
ssd.py's autograd path uses): the kernels write them in that dtype directly, and read the GEMMs' outputs in it.
Decays, cumulative sums and the passed states are float32. Every inner loop runs along p or n, elementwise (no
reductions), so it vectorises without fast-math, and each value is computed by one thread in a fixed order.

The kernels trust their arguments (ssd.py calls them, after mambakit.ops checked them). The torch twin of this
whole path is ssd.py's autograd path, which the tests compare it with, and `ssd_ref`.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from .primitives import fexp, kernel_options, narrow, set_threads, sigmoid, widen

_F32 = np.float32

# Tokens (of all rows together) per group of chunks that chunked_inference takes through every step at once, and
# the largest workspace kept between calls (see _workspace): 27 MB at the 130m shape in float32, 64-token chunks.
BLOCK_TOKENS = 512
KEEP_BYTES = 64 << 20


@njit(**kernel_options())
def _prepare(x, delta, acs, to_end, CB, seq, has_seq, k0, xh, xw, S):
    """For the chunks k0 … k0 + nk − 1: x (b, l, h, p) (float32 or bfloat16 bits); delta (b, L, h); acs, to_end
    (b, c, h, Q); CB (b, nk, g, Q, Q) (lower triangle read); seq (b, L) int64 when has_seq. Writes xh (b, nk, h, Q, p)
    = Δ·x, xw (b, nk, g, Q, hg·p) = Δ·x·to_end and S (b, nk, h, Q, Q), in their own element types; tokens t ≥ l (the
    padding) get zeros."""
    b, nk, h, Q, p = xh.shape
    g = CB.shape[2]
    hg = h // g
    l = x.shape[1]
    zero = _F32(0.0)
    for task in prange(b * nk * h):
        bb = task // (nk * h)
        kk = (task // h) % nk
        k = k0 + kk
        hh = task % h
        gg = hh // hg
        col = (hh - gg * hg) * p  # this head's columns in xw
        a = acs[bb, k, hh]  # (Q,)
        # Rows as 1-d views: their inner loops vectorise (indexing the 4-d and 5-d arrays did not). The loops are
        # kept free of branches around the stores (the padding has a loop of its own): with one, numba's SSA
        # pass mishandled the inlined bfloat16 rounding and the kernel ran 2× slower in bfloat16.
        valid = min(Q, l - k * Q)  # tokens of this chunk before l
        for tq in range(valid):
            t = k * Q + tq
            x_r = x[bb, t, hh]
            xh_r = xh[bb, kk, hh, tq]
            xw_r = xw[bb, kk, gg, tq, col:col + p]
            d = delta[bb, t, hh]
            e = to_end[bb, k, hh, tq]
            for i in range(p):
                v = widen(x_r[i]) * d
                xh_r[i] = narrow(v, xh_r)
                xw_r[i] = narrow(v * e, xw_r)
        for tq in range(valid, Q):  # padding: Δ = 0, no input
            xh_r = xh[bb, kk, hh, tq]
            xw_r = xw[bb, kk, gg, tq, col:col + p]
            for i in range(p):
                xh_r[i] = 0  # 0.0 in float32 and in bfloat16 bits
                xw_r[i] = 0
        first = 0  # in-chunk index where the current token's sequence starts
        for tq in range(Q):
            t = k * Q + tq
            if has_seq and tq > 0 and seq[bb, t] != seq[bb, t - 1]:
                first = tq
            a_t = a[tq]
            S_r = S[bb, kk, hh, tq]
            CB_r = CB[bb, kk, gg, tq]
            # The whole row, masked by a select: branch-free, so it vectorises (loops over the triangle's
            # variable extent did not, and ran 3.5× slower for half the entries). min(·, 0) keeps the exp
            # finite above the diagonal, where the value is discarded.
            for sq in range(Q):
                w = fexp(min(a_t - a[sq], zero)) * CB_r[sq]
                S_r[sq] = narrow(w if (sq <= tq) & (sq >= first) else zero, S_r)


@njit(**kernel_options())
def _pass(states, decay, k0, incoming, final, kept, keep):
    """For the chunks k0 … k0 + nk − 1: states (b, nk, h, p, n), each chunk's own (float32 or bfloat16 bits); decay
    (b, c, h); final (b, h, p, n) float32 holds the state entering chunk k0 and is left holding the state after
    chunk k0 + nk − 1. Writes incoming (b, nk, h, p, n), the state entering each chunk, in its element type, and
    with `keep` the same in float32 into kept (b, c, h, p, n) at chunks k0 …"""
    b, nk, h, p, n = states.shape
    for task in prange(b * h):
        bb = task // h
        hh = task % h
        for kk in range(nk):
            dk = decay[bb, k0 + kk, hh]
            for i in range(p):
                f_r = final[bb, hh, i]  # (n,)
                in_r = incoming[bb, kk, hh, i]
                s_r = states[bb, kk, hh, i]
                if keep:
                    kept_r = kept[bb, k0 + kk, hh, i]
                    for j in range(n):
                        kept_r[j] = f_r[j]
                for j in range(n):
                    v = f_r[j]
                    in_r[j] = narrow(v, in_r)
                    f_r[j] = dk * v + widen(s_r[j])


@njit(**kernel_options())
def _combine(yi, yin, from_start, x, Dm, has_D, z, has_z, k0, y):
    """For the chunks k0 … k0 + nk − 1: yi (b, nk, h, Q, p) the intra-chunk products; yin (b, nk, g, Q, hg·p) the
    entering states' shares (both float32 or bfloat16 bits); from_start (b, c, h, Q); x, z, y (b, l, h, p) (y
    written, in its element type); Dm (h, p)."""
    b, nk, h, Q, p = yi.shape
    g = yin.shape[2]
    hg = h // g
    l = y.shape[1]
    for task in prange(b * nk * h):
        bb = task // (nk * h)
        kk = (task // h) % nk
        k = k0 + kk
        hh = task % h
        gg = hh // hg
        col = (hh - gg * hg) * p
        for tq in range(min(Q, l - k * Q)):
            t = k * Q + tq
            f = from_start[bb, k, hh, tq]
            yi_r = yi[bb, kk, hh, tq]
            yin_r = yin[bb, kk, gg, tq, col:col + p]
            x_r = x[bb, t, hh]
            z_r = z[bb, t, hh] if has_z else x_r
            y_r = y[bb, t, hh]
            D_r = Dm[hh] if has_D else Dm[0]
            for i in range(p):
                v = widen(yi_r[i]) + f * widen(yin_r[i])
                if has_D:
                    v = v + D_r[i] * widen(x_r[i])
                if has_z:
                    zz = widen(z_r[i])
                    v = v * (zz * sigmoid(zz))
                y_r[i] = narrow(v, y_r)


def _kernel_view(t: Tensor) -> np.ndarray:
    """A CPU tensor as the array a kernel reads or writes: bfloat16 as its 16 bits (int16)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _io(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype` (float32 or bfloat16), contiguous: no copy when it already is."""
    return t.detach().to(dtype).contiguous()


_local = threading.local()


def _workspace(b: int, nk: int, h: int, p: int, g: int, n: int, Q: int, gemm: torch.dtype) -> dict[str, Tensor]:
    """The buffers of one group of nk chunks, kept between calls (per thread, for the last two shapes asked for:
    a full group and a shorter last one) when they fit in KEEP_BYTES. Why: allocated afresh, each large buffer
    is new memory for the process, and its first touch page-faults (under the benchmarks' fixed mmap threshold,
    on every call); at the 130m shape that cost several milliseconds a layer. Their size is bounded by the
    group (BLOCK_TOKENS tokens of all rows together, at least one chunk), not by l."""
    key = (b, nk, h, p, g, n, Q, gemm)
    cache = getattr(_local, "spaces", None)
    if cache is None:
        cache = _local.spaces = {}
    if key in cache:
        return cache[key]
    hg = h // g
    # normal tensors even when asked for under inference mode (generate): an inference tensor kept here could not
    # be written by a later call outside it (a plain no_grad forward)
    with torch.inference_mode(False):
        w = dict(CB=torch.empty(b, nk, g, Q, Q, dtype=gemm), xh=torch.empty(b, nk, h, Q, p, dtype=gemm),
                 xw=torch.empty(b, nk, g, Q, hg * p, dtype=gemm), S=torch.empty(b, nk, h, Q, Q, dtype=gemm),
                 states=torch.empty(b, nk, g, hg * p, n, dtype=gemm), incoming=torch.empty(b, nk, h, p, n, dtype=gemm),
                 y_in=torch.empty(b, nk, g, Q, hg * p, dtype=gemm), yi=torch.empty(b, nk, h, Q, p, dtype=gemm))
    if sum(t.nbytes for t in w.values()) <= KEEP_BYTES:
        if len(cache) >= 2:
            cache.pop(next(iter(cache)))
        cache[key] = w
    return w


def chunked_inference(x: Tensor, delta: Tensor, acs: Tensor, to_end: Tensor, chunk_decay: Tensor,
                      from_start: Tensor, Bc: Tensor, Cc: Tensor, seq: Tensor | None, Dm: Tensor | None,
                      z: Tensor | None, carried: Tensor, gemm: torch.dtype,
                      keep_incoming: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """The chunked SSD without autograd, from ssd.py's discretised inputs.

    x (b, l, h, p); delta (b, L, h) float32, L = c·Q; acs, to_end, from_start (b, c, h, Q) and chunk_decay (b, c, h)
    float32 (masked for packed sequences as ssd.py builds them); Bc, Cc (b, c, g, Q, n) (padded); seq (b, L) or
    None; Dm (h, p) float32 or None; z like x or None; carried (b, h, p, n) float32, the initial states (used as
    the working buffer: the caller passes its own copy); gemm: float32 or bfloat16, the GEMM operands' dtype.
    Returns y (b, l, h, p) in x's dtype (float32 for float16 x), the final states (b, h, p, n) float32, and with
    keep_incoming the states entering each chunk (b, c, h, p, n) float32 (else None).

    The chunks go in groups of about BLOCK_TOKENS tokens (all rows), every step for one group before the next, through
    workspaces kept between calls (`_workspace`): the group's scores, operands and products stay in the caches,
    and no large buffer is new memory to fault in."""
    b, l, h, p = x.shape
    _, c, g, Q, n = Bc.shape
    hg = h // g
    io = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32  # the dtype the kernels read and write
    xk = _io(x, io)
    zk = _io(z, io) if z is not None else xk
    D_arr = _io(Dm, torch.float32) if Dm is not None else torch.zeros(1, 1)
    seq_arr = seq.to(torch.int64).contiguous() if seq is not None else torch.zeros(1, 1, dtype=torch.int64)
    y = torch.empty(b, l, h, p, dtype=io)
    Bg, Cg = Bc.to(gemm), Cc.to(gemm)  # (b, c, g, Q, n)
    delta_a, acs_a, to_end_a = (_kernel_view(_io(t, torch.float32)) for t in (delta, acs, to_end))
    decay_a, from_start_a = _kernel_view(_io(chunk_decay, torch.float32)), _kernel_view(_io(from_start, torch.float32))
    final = carried
    kept = torch.empty(b, c, h, p, n) if keep_incoming else torch.empty(1, 1, 1, 1, 1)
    per = max(1, min(c, BLOCK_TOKENS // (b * Q)))  # chunks per group: about BLOCK_TOKENS tokens over all rows
    set_threads()
    for k0 in range(0, c, per):
        nk = min(per, c - k0)
        w = _workspace(b, nk, h, p, g, n, Q, gemm)
        Bk, Ck = Bg[:, k0:k0 + nk], Cg[:, k0:k0 + nk]  # (b, nk, g, Q, n)
        torch.matmul(Ck, Bk.transpose(-1, -2), out=w["CB"])  # C_t·B_s: (b, nk, g, Q_t, Q_s)
        CB = w["CB"] if gemm == torch.float32 else w["CB"].float()
        _prepare(_kernel_view(xk), delta_a, acs_a, to_end_a, _kernel_view(CB), seq_arr.numpy(), seq is not None,
                 k0, _kernel_view(w["xh"]), _kernel_view(w["xw"]), _kernel_view(w["S"]))
        # each chunk's own state at its end, the heads of a group in one GEMM: (b, nk, g, hg·p, n)
        torch.matmul(w["xw"].transpose(-1, -2), Bk, out=w["states"])
        _pass(_kernel_view(w["states"].view(b, nk, h, p, n)), decay_a, k0, _kernel_view(w["incoming"]),
              _kernel_view(final), kept.numpy(), keep_incoming)
        # the entering state's share C_t·H: (b, nk, g, Q, hg·p); the intra-chunk products S x̄: (b, nk, h, Q, p)
        torch.matmul(Ck, w["incoming"].view(b, nk, g, hg * p, n).transpose(-1, -2), out=w["y_in"])
        torch.matmul(w["S"], w["xh"], out=w["yi"])
        _combine(_kernel_view(w["yi"]), _kernel_view(w["y_in"]), from_start_a, _kernel_view(xk), _kernel_view(D_arr),
                 Dm is not None, _kernel_view(zk), z is not None, k0, _kernel_view(y))
    return y, final, (kept if keep_incoming else None)
