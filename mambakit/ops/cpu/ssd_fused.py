"""Steps 1 and 4 of the chunked SSD (ssd.py) in one numba kernel, for inference.

Why: written in torch, step 1 builds (b, c, h, Q, Q) decay and score tensors and (b, c, g, hg, Q, p) partial
outputs: several full passes over memory, which at the 130m shape cost more than the GEMMs of steps 2–4. Here one
task per (row, chunk, head) computes each output row in a buffer of its own, a decay row at a time, and writes
it once, time-major:

    y_t = from_start_t · y_in_t + Σ_{s ≤ t, same sequence} exp(acs_t − acs_s)·CB[t, s]·x̄_s

(y_in = C_t·H, the incoming state's share, from a GEMM; CB = C_t·B_s from a GEMM.) Every inner loop is
elementwise along p (contiguous in x̄, y_in and y): LLVM vectorises it without reassociating anything, and each
output is summed in one fixed order by one thread, whatever the thread count. Autograd does not see this kernel;
ssd.py takes it only when no gradient is recorded, and its torch twin `ssd.intra_chunk` otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from .primitives import fexp, kernel_options, set_threads

_F32 = np.float32


@njit(**kernel_options())
def _intra(xbar, acs, CB, y_in, from_start, seq, has_seq, y):
    """xbar (b, L, h, p); acs, from_start (b, c, h, Q); CB (b, c, g, Q, Q) (lower triangle read); y_in
    (b, c, g, Q, hg·p); seq (b, L) int64 when has_seq. Writes y (b, L, h, p). L = c·Q."""
    b, c, h, Q = acs.shape
    g = CB.shape[2]
    p = xbar.shape[3]
    hg = h // g
    for task in prange(b * c * h):
        bb = task // (c * h)
        k = (task // h) % c
        hh = task % h
        gg = hh // hg
        col = (hh - gg * hg) * p  # this head's columns in y_in
        t0 = k * Q
        acc = np.empty(p, dtype=np.float32)
        w = np.empty(Q, dtype=np.float32)
        first = 0  # in-chunk index where the current token's sequence starts
        for tq in range(Q):
            t = t0 + tq
            if has_seq and tq > 0 and seq[bb, t] != seq[bb, t - 1]:
                first = tq
            a_t = acs[bb, k, hh, tq]
            for sq in range(first, tq + 1):
                w[sq] = fexp(a_t - acs[bb, k, hh, sq]) * CB[bb, k, gg, tq, sq]
            f = from_start[bb, k, hh, tq]
            for i in range(p):
                acc[i] = f * y_in[bb, k, gg, tq, col + i]
            for sq in range(first, tq + 1):
                ws = w[sq]
                for i in range(p):
                    acc[i] += ws * xbar[bb, t0 + sq, hh, i]
            for i in range(p):
                y[bb, t, hh, i] = acc[i]


def intra_chunk_kernel(xbar: Tensor, acs: Tensor, CB: Tensor, y_in: Tensor, from_start: Tensor,
                       seq: Tensor | None) -> Tensor:
    """`ssd.intra_chunk` for float32 CPU tensors, without autograd; the same arguments (less the GEMM dtype: it
    does no GEMM) and result y (b, L, h, p)."""
    b, L, h, p = xbar.shape
    f32 = torch.float32
    y = torch.empty(b, L, h, p, dtype=f32)
    seq_arr = seq.to(torch.int64).contiguous() if seq is not None else torch.zeros(1, 1, dtype=torch.int64)
    set_threads()
    _intra(xbar.detach().to(f32).contiguous().numpy(), acs.detach().to(f32).contiguous().numpy(),
           CB.detach().to(f32).contiguous().numpy(), y_in.detach().to(f32).contiguous().numpy(),
           from_start.detach().to(f32).contiguous().numpy(), seq_arr.numpy(), seq is not None, y.numpy())
    return y
