"""Fused decode step: one compiled call per layer for a batch of a few sequences (paper §3.3, recurrent mode).

Why: a decode step of the 130m model does little arithmetic (one token per sequence), so the unfused step,
about 25 torch ops and numba calls per layer (norm, in_proj, conv update, x_proj, dt_proj, state update,
out_proj, residual add, dtype conversions), spends a quarter of its time outside the weight reads. Here each layer is one numba call that keeps
every intermediate in small scratch buffers and reads each weight matrix once, row after row in memory order (one sequential stream, which is what DRAM serves
fastest), split between torch's threads by rows. Measured on this CPU (130m, batch 1, other jobs paused):
16.4 vs 22.4 ms a step in float32 and 11.7 vs 16.9 ms in bfloat16 with 2 threads, 26.5 vs 34.0 and 17.6 vs
24.4 with one. From 8 rows on the multiply-adds dominate and the unfused step's blocked GEMMs win, so
`applies` keeps larger batches on the unfused path.

The reference twin is the unfused `Mamba.step` (model.py), with the same arguments and results: tests compare
the two (logits and both states over many steps, float32 and bfloat16 weights, batch 1 … 4). The stages
and their order are those of `Mamba.step`; what differs is rounding: intermediates stay float32 here, where
a bfloat16 model's unfused step rounds x, z and the projections' outputs to bfloat16.

`applies(model, ...)` says when the fused path runs (CPU, inference, float32 or bfloat16 weights, RMSNorm,
a float32 residual stream, the plain Mamba mixer, batch ≤ MAX_BATCH); `MambaLM.step` falls back to the
unfused step otherwise.
"""

from __future__ import annotations

import types

import numpy as np
import torch

from numba import njit, prange
from torch import Tensor

from .ops._numba import fexp, kernel_options, narrow, set_threads, sigmoid, softplus, widen

# Measured (BENCHMARKS.md, 130m, 2 threads, fused vs unfused ms a step): float32 16.4 vs 22.4 at batch 1,
# 26.8 vs 29.9 at 4, 47.5 vs 39.4 at 8; bfloat16 11.7 vs 16.9, 24.6 vs 30.1, 42.0 vs 40.0. From 8 rows on the
# unfused step's blocked GEMMs win (this kernel's cost grows with the rows), so larger batches stay unfused.
MAX_BATCH = 4
_F32 = np.float32


def _matmul(x, W, bias, y):
    """y (b, o) = x (b, i) · Wᵀ (+ bias): W (o, i) float32 or bfloat16 bits, x and y float32; bias (o,) or
    empty. One pass per weight row, the rows in memory order: a single sequential stream, which DRAM serves
    fastest (measured: reading 4 rows side by side, to share loads of x across a batch, cost batch 1 a third
    more time). The b rows' dot products reuse the weight row from L1."""
    b, i = x.shape
    o = W.shape[0]
    has_bias = bias.shape[0] > 0
    for r in prange(o):  # threads take contiguous blocks of rows: one stream each
        for bb in range(b):
            acc = _F32(0.0)
            for j in range(i):  # vectorised by LLVM (fast-math reassociates the sum)
                acc += widen(W[r, j]) * x[bb, j]
            y[bb, r] = acc + widen(bias[r]) if has_bias else acc


def _renamed(fn, suffix: str, **globals_):
    """fn under another name (numba's disk cache files compiled code by name and bytecode, not by options),
    optionally with some of its globals replaced (the serial layer kernel calls the serial matmul)."""
    g = types.FunctionType(fn.__code__, {**fn.__globals__, **globals_}, fn.__name__ + suffix, fn.__defaults__,
                           fn.__closure__)
    g.__qualname__ = fn.__qualname__ + suffix
    return g


_matmul_jit = njit(**kernel_options(parallel=True))(_matmul)
_matmul_serial = njit(**kernel_options(parallel=False))(_renamed(_matmul, "_serial"))


def _layer_step(r, norm_w, eps, w_in, b_in, conv_w, conv_b, conv_state, w_x, w_dt, dt_b, A, Dv, ssm_state,
                w_out, b_out, hn, xz, xc, dbc, y, out):
    """One layer for b sequences; r (b, D) float32 is the residual stream, updated in place (r += mixer(norm(r))).

    Weights are float32 arrays or bfloat16 bits (int16): w_in (2E, D), conv_w (E, W), w_x (R + 2N, E),
    w_dt (E, R), w_out (D, E); vectors norm_w (D,), conv_b (E,), dt_b (E,), Dv (E,), b_in (2E,) / b_out (D,)
    or empty. A (E, N) float32 = −exp(A_log). conv_state (b, E, W − 1) in the model's dtype and ssm_state
    (b, E, N) float32 are updated in place. hn (b, D), xz (b, 2E), xc (b, E), dbc (b, R + 2N), y (b, E),
    out (b, D): float32 scratch."""
    b, D = r.shape
    E, N = A.shape
    K = conv_w.shape[1]  # the conv width W
    R = w_dt.shape[1]
    # RMSNorm (the pre-norm of the residual block), in float32
    for bb in range(b):
        ss = _F32(0.0)
        for j in range(D):
            ss += r[bb, j] * r[bb, j]
        scale = _F32(1.0) / np.sqrt(ss / _F32(D) + _F32(eps))
        for j in range(D):
            hn[bb, j] = r[bb, j] * scale * widen(norm_w[j])
    _matmul_jit(hn, w_in, b_in, xz)  # (b, 2E): x = xz[:, :E], z = xz[:, E:]
    # causal depthwise conv over the last W inputs (the state holds W − 1), then SiLU; the state shifts by one
    has_cb = conv_b.shape[0] > 0
    for bb in range(b):
        for e in range(E):
            xe = xz[bb, e]
            acc = widen(conv_w[e, K - 1]) * xe
            for k in range(K - 1):
                acc += widen(conv_w[e, k]) * widen(conv_state[bb, e, k])
            if has_cb:
                acc += widen(conv_b[e])
            xc[bb, e] = acc * sigmoid(acc)
            for k in range(K - 2):
                conv_state[bb, e, k] = conv_state[bb, e, k + 1]
            conv_state[bb, e, K - 2] = narrow(xe, conv_state)
    _matmul_jit(xc, w_x, b_out[:0], dbc)  # (b, R + 2N): Δ's low-rank input, B, C (x_proj has no bias: an empty one)
    # Δ = softplus(dt_proj(dbc[:, :R]) + dt_bias), computed into y (reused below as the SSM output)
    for bb in range(b):
        for e in range(E):
            acc = widen(dt_b[e])
            for k in range(R):
                acc += widen(w_dt[e, k]) * dbc[bb, k]
            y[bb, e] = softplus(acc)
    # selective state update (Section 3.2 discretisation): h ← exp(ΔA) h + Δ B x; y = C·h + D x, gated by SiLU(z)
    for bb in range(b):
        for e in range(E):
            delta = y[bb, e]
            xe = xc[bb, e]
            dx = delta * xe
            acc = _F32(0.0)
            for n in range(N):
                h = ssm_state[bb, e, n] * fexp(delta * A[e, n]) + dx * dbc[bb, R + n]
                ssm_state[bb, e, n] = h
                acc += h * dbc[bb, R + N + n]
            z = xz[bb, E + e]
            y[bb, e] = (acc + widen(Dv[e]) * xe) * (z * sigmoid(z))
    _matmul_jit(y, w_out, b_out, out)  # (b, D)
    for bb in range(b):
        for j in range(D):
            r[bb, j] += out[bb, j]


# the layer kernel itself is serial (its loops over channels are short); its matmuls run on torch's thread
# count (parallel over weight rows) or, for one thread, serially (no pool wake-ups)
_LAYER = {
    True: njit(**kernel_options(parallel=False))(_layer_step),
    False: njit(**kernel_options(parallel=False))(_renamed(_layer_step, "_serial", _matmul_jit=_matmul_serial)),
}


def _np(t: Tensor) -> np.ndarray:
    """A tensor's memory as a numpy array: float32 as is, bfloat16 as its 16 bits (int16), read by `widen`."""
    t = t.detach()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


_EMPTY = np.zeros(0, np.float32)


def _model_applies(model) -> bool:
    """The per-model half of `applies`, cached (walking every parameter costs 0.4 ms, 2% of a step) under a
    key that changes when the weights are replaced or converted (.to() changes the dtype, FSDP the objects)."""
    from .model import Mamba

    c = model.config
    layers = model.backbone.layers
    w = model.lm_head.weight
    key = (id(w), w.dtype, w.device, id(layers[0].mixer.in_proj.weight), id(layers[-1].mixer.out_proj.weight))
    cached = model.__dict__.get("_fused_applies")
    if cached is None or cached[0] != key:
        ok = (
            w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
            and c.rms_norm and (c.residual_in_fp32 or w.dtype == torch.float32)
            and all(type(layer.mixer) is Mamba for layer in layers)
            and all(p.dtype in (torch.float32, torch.bfloat16) and p.device.type == "cpu" for p in model.parameters())
        )
        cached = model.__dict__["_fused_applies"] = (key, ok)
    return cached[1]


def applies(model, input_ids: Tensor, state) -> bool:
    """Whether `step` runs fused for this model and batch (else MambaLM.step takes the unfused path)."""
    return (
        input_ids.shape[0] <= MAX_BATCH and _model_applies(model)
        and state.ssm.dtype == torch.float32 and state.conv.dtype == model.lm_head.weight.dtype
        and state.conv.is_contiguous() and state.ssm.is_contiguous()
    )


@torch.no_grad()
def step(model, input_ids: Tensor, state) -> Tensor:
    """`MambaLM.step` fused: input_ids (b,) → logits (b, V) in the model's dtype; state updated in place."""
    from .decode_linear import linear

    c = model.config
    b = input_ids.shape[0]
    E, N, R = c.d_inner, c.d_state, c.dt_rank
    r = model.backbone.embedding(input_ids).float().contiguous()  # (b, D) the residual stream, float32
    f32 = dict(dtype=torch.float32)
    hn, out = torch.empty(b, c.d_model, **f32), torch.empty(b, c.d_model, **f32)
    xz, xc, y = torch.empty(b, 2 * E, **f32), torch.empty(b, E, **f32), torch.empty(b, E, **f32)
    dbc = torch.empty(b, R + 2 * N, **f32)
    scratch = [t.numpy() for t in (hn, xz, xc, dbc, y, out)]
    rn = r.numpy()
    parallel = torch.get_num_threads() > 1
    if parallel:
        set_threads()
    kernel = _LAYER[parallel]
    for i, layer in enumerate(model.backbone.layers):
        m = layer.mixer
        kernel(
            rn, _np(layer.norm.weight), layer.norm.eps,
            _np(m.in_proj.weight), _EMPTY if m.in_proj.bias is None else _np(m.in_proj.bias),
            _np(m.conv1d.weight[:, 0]), _EMPTY if m.conv1d.bias is None else _np(m.conv1d.bias),
            _np(state.conv[i]), _np(m.x_proj.weight), _np(m.dt_proj.weight), _np(m.dt_proj.bias),
            m._decode_A().numpy(), _np(m.D), state.ssm[i].numpy(),
            _np(m.out_proj.weight), _EMPTY if m.out_proj.bias is None else _np(m.out_proj.bias),
            *scratch,
        )
    return linear(model.backbone.norm_f(r), model.lm_head.weight)  # (b, V), as the unfused step
