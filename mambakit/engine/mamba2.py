"""Fused decode step for Mamba-2 models: every layer of a step in one compiled call (paper §3.3, recurrent mode).

Why: a decode step reads each weight once and does little arithmetic, so it should cost the time to stream the
weights (and, for Mamba-2, the state: (h, p, n) float32 a layer and sequence, 768 KiB at the 130m shape). The
reference `MambaLM.step` spends about twenty torch ops a layer (norm, in_proj, split, conv update, the SSD step,
gated norm, out_proj, residual), and torch's bfloat16 GEMV at one row is well below the memory bandwidth. Here
in_proj and out_proj are read from a copy packed in 32-row panels (`panels.py`, one sequential stream, each weight
load shared by up to 8 rows), and the rest runs in small scratch buffers, float32:

    per layer:  hn = RMSNorm(r)                                     (serial: b·D)
                [z | xBC | dt] = hn · in_projᵀ                      (panels, split between the threads)
                xBC = SiLU(conv1d(xBC)), conv state shifted        (channel blocks)
                y = SSD step per (row, head), D skip                (the state read and written once)
                y = RMSNorm_grouped(y · SiLU(z)) · w                (serial: b·S)
                r += y · out_projᵀ                                  (panels)

then the final norm and the LM head (panels) in `Mamba2Decoder.step`. Each output element is computed by one
task in one fixed order whatever the thread count and batch, so a row decodes exactly as it would alone.

The reference twin is `MambaLM.step` with the `mamba2.Mamba2` mixer (the same stages and order); tests compare
logits and both states over many steps, float32 and bfloat16, several batch sizes and configurations. What
differs is rounding: intermediates stay float32 here, where a bfloat16 model's reference step rounds the
projections' outputs to bfloat16.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from ..model import MambaLM, MambaState
from ..mamba2 import Mamba2
from ..ops.cpu.primitives import fexp, fma, halve, kernel_options, narrow, set_threads, sigmoid, softplus, widen
from . import panels
from .fused import MAX_BATCH, _layer_view, _np
from .panels import GROUP, panel_rows, renamed

_F32 = np.float32
CONV_BLOCK = 64  # conv channels a task
LANES = 16  # partial sums of h·C in the SSD step: one AVX-512 register of float32 (no fast-math: see kernel_options)


def _layers(r, norm_w, eps, flat, offsets, conv_w, conv_b, dt_b, A, Dm, gn_w, G, N, before_gate, lo, hi,
            conv_all, ssm_all, hn, zx, xbc, y, o):
    """All L layers of a decode step for b rows. r (b, D) the residual stream (updated); norm_w (L, D);
    flat/offsets: in_proj and out_proj packed (`panels.pack_flat`), layer i's at offsets[i]; conv_w (L, C, W),
    conv_b (L, C) with C = S + 2GN; dt_b, A (L, h); Dm (L, h, p); gn_w (L, S); conv_all (L, M ≥ b, C, W − 1)
    in the model's dtype; ssm_all (L, M, h·p, N) float32; scratch hn (b, D), zx (b, ≥ 2S + 2GN + h), xbc (b, C),
    y (b, S), o (b, ≥ D)."""
    L, D = norm_w.shape
    C, W = conv_w.shape[1], conv_w.shape[2]
    H, P = Dm.shape[1], Dm.shape[2]
    S = H * P
    b = r.shape[0]
    hg = H // G
    gs = S // G  # channels a group of the gated norm
    n_in, n_out = (S + C + H + GROUP - 1) // GROUP, (D + GROUP - 1) // GROUP
    s_in, s_out = n_in * D * GROUP, n_out * S * GROUP
    n_blk = (C + CONV_BLOCK - 1) // CONV_BLOCK
    for i in range(L):
        at = offsets[i]
        p_in = flat[at:at + s_in].reshape((n_in, D, GROUP))
        p_out = flat[at + s_in:at + s_in + s_out].reshape((n_out, S, GROUP))
        # 1. the block's pre-norm
        for bb in range(b):
            ss = _F32(0.0)
            for j in range(D):
                ss += r[bb, j] * r[bb, j]
            scale = _F32(1.0) / np.sqrt(ss / _F32(D) + _F32(eps))
            for j in range(D):
                hn[bb, j] = r[bb, j] * scale * widen(norm_w[i, j])
        # 2. in_proj → [z (S) | xBC (C) | dt (h)]
        for g in prange(n_in):
            panel_rows(p_in, g, hn, zx)
        # 3. depthwise causal conv over xBC and SiLU; the conv state keeps the last W − 1 inputs
        for task in prange(b * n_blk):
            bb = task // n_blk
            c0 = (task - bb * n_blk) * CONV_BLOCK
            for c in range(c0, min(C, c0 + CONV_BLOCK)):
                v = zx[bb, S + c]
                acc = conv_b[i, c] + conv_w[i, c, W - 1] * v
                for k in range(W - 1):
                    acc += conv_w[i, c, k] * widen(conv_all[i, bb, c, k])
                for k in range(W - 2):
                    conv_all[i, bb, c, k] = conv_all[i, bb, c, k + 1]
                if W > 1:
                    conv_all[i, bb, c, W - 2] = narrow(v, conv_all)
                xbc[bb, c] = acc * sigmoid(acc)
        # 4. the SSD step per (row, head): h ← exp(Δ·A)·h + Δ·x·Bᵀ, y = h·C + D·x
        for task in prange(b * H):
            bb = task // H
            hh = task - bb * H
            gg = hh // hg
            d = softplus(zx[bb, S + C + hh] + dt_b[i, hh])
            d = _F32(min(max(d, _F32(lo)), _F32(hi)))  # float32 throughout (lo, hi arrive as float64)
            decay = _F32(fexp(d * A[i, hh]))
            b0, c0 = S + gg * N, S + G * N + gg * N  # this group's B and C in xbc
            Bv, Cv = xbc[bb, b0:b0 + N], xbc[bb, c0:c0 + N]
            part = np.empty(LANES, dtype=np.float32)  # h·C in LANES partial sums, added in a fixed order
            for q in range(P):
                e = hh * P + q
                dx = _F32(d * xbc[bb, e])
                h_e = ssm_all[i, bb, e]  # (N,)
                for k in range(LANES):
                    part[k] = _F32(0.0)
                for n0 in range(0, N - N % LANES, LANES):
                    for k in range(LANES):
                        v = fma(h_e[n0 + k], decay, dx * Bv[n0 + k])
                        h_e[n0 + k] = v
                        part[k] = fma(v, Cv[n0 + k], part[k])
                for n in range(N - N % LANES, N):  # N not a multiple of LANES: the rest into lane 0
                    v = fma(h_e[n], decay, dx * Bv[n])
                    h_e[n] = v
                    part[0] = fma(v, Cv[n], part[0])
                w = LANES
                while w > 1:
                    w //= 2
                    halve(part, w)
                y[bb, e] = fma(Dm[i, hh, q], xbc[bb, e], part[0])
        # 5. gated RMSNorm per group of S / G channels
        for bb in range(b):
            for gg in range(G):
                ss = _F32(0.0)
                for j in range(gg * gs, (gg + 1) * gs):
                    zj = zx[bb, j]
                    v = y[bb, j] if before_gate else y[bb, j] * (zj * sigmoid(zj))
                    y[bb, j] = v
                    ss += v * v
                scale = _F32(1.0) / np.sqrt(ss / _F32(gs) + _F32(eps))
                for j in range(gg * gs, (gg + 1) * gs):
                    v = y[bb, j] * scale * gn_w[i, j]
                    if before_gate:
                        zj = zx[bb, j]
                        v = v * (zj * sigmoid(zj))
                    y[bb, j] = v
        # 6. out_proj and the residual
        for g in prange(n_out):
            panel_rows(p_out, g, y, o)
        for bb in range(b):
            for j in range(D):
                r[bb, j] += o[bb, j]


_LAYERS = {
    True: njit(**kernel_options(parallel=True))(renamed(_layers, "_m2")),
    False: njit(**kernel_options(parallel=False))(renamed(_layers, "_m2_serial")),
}


def unsupported(model) -> str | None:
    """Why the fused Mamba-2 step cannot run this model (None when it can): CPU MambaLMs in float32 or bfloat16
    whose mixers are all `Mamba2`, with RMSNorm pre-norms, the gated RMSNorm (rmsnorm=True), no MLP branch
    (d_ssm = d_inner), no in_proj/out_proj bias and a float32 residual stream (or float32 weights)."""
    if not isinstance(model, MambaLM):
        return f"not a MambaLM ({type(model).__name__})"
    c = model.config
    w = model.lm_head.weight
    if w.device.type != "cpu":
        return f"weights on {w.device.type}, not the CPU"
    if w.dtype not in MAX_BATCH:
        return f"weights in {w.dtype}; the fused step covers float32 and bfloat16"
    other = {type(layer.mixer).__name__ for layer in model.backbone.layers if type(layer.mixer) is not Mamba2}
    if other:
        return f"mixers other than Mamba2 ({', '.join(sorted(other))})"
    if not c.rms_norm:
        return "LayerNorm model (rms_norm=False)"
    if not c.rmsnorm:
        return "Mamba-2 without its gated RMSNorm (rmsnorm=False)"
    if c.d_ssm != c.d_inner:
        return f"an MLP branch beside the SSM (d_ssm {c.d_ssm} < d_inner {c.d_inner})"
    if c.bias:
        return "in_proj/out_proj with biases (bias=True)"
    if not (c.residual_in_fp32 or w.dtype == torch.float32):
        return "a bfloat16 residual stream (residual_in_fp32=False)"
    if any(p.dtype not in MAX_BATCH or p.device.type != "cpu" for p in model.parameters()):
        return "parameters of other dtypes or devices than the head's"
    return None


def _ssm_view(state: MambaState) -> Tensor:
    """The SSM state (L, b, h, p, N) as (L, b, h·p, N), a view (also of a pool's first rows)."""
    s = state.ssm
    return s.flatten(2, 3) if s.dim() == 5 else s


class Mamba2Decoder:
    """`MambaLM.step` for CPU decoding of Mamba-2 models as one compiled call for all layers (see the module
    docstring), applied from outside: it owns a packed copy of in_proj, out_proj and the LM head, built on the
    first step and rebuilt when a parameter is replaced or updated; `release()` frees it. The same interface as
    `fused.FusedDecoder` (which covers Mamba-1 models):

        decoder = Mamba2Decoder(model)            # ValueError naming the reason if the model is not covered
        logits = decoder.step(input_ids, state)   # (b, V); state updated in place, as MambaLM.step
        decoder.supports(input_ids, state)        # None, or why this batch must take MambaLM.step instead
    """

    def __init__(self, model: MambaLM):
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"Mamba2Decoder: the fused decode step does not cover this model: {why}")
        self._model = weakref.ref(model)
        self._packed = None  # (checks, weights)
        self._checked = None  # (key, reason)

    @property
    def model(self) -> MambaLM:
        model = self._model()
        if model is None:
            raise RuntimeError("Mamba2Decoder: its model has been freed")
        return model

    def release(self) -> None:
        """Frees the packed copy of the weights; the next step builds it again."""
        self._packed = None

    def supports(self, input_ids: Tensor, state: MambaState) -> str | None:
        """Why `step` cannot take this batch (None when it can); the per-model part cached under a key that
        changes when the weights are replaced or converted."""
        model = self.model
        w, layers = model.lm_head.weight, model.backbone.layers
        key = (id(w), w.dtype, w.device, id(layers[0].mixer.in_proj.weight), id(layers[-1].mixer.out_proj.weight))
        if self._checked is None or self._checked[0] != key:
            self._checked = (key, unsupported(model))
        if self._checked[1] is not None:
            return self._checked[1]
        b = input_ids.shape[0] if isinstance(input_ids, Tensor) and input_ids.dim() == 1 else 0
        limit = MAX_BATCH[w.dtype]
        if b > limit:
            return f"batch above {limit} rows, the fused limit for {str(w.dtype)[6:]} (torch's GEMMs are faster beyond)"
        if not isinstance(state, MambaState):
            return "state is not a MambaState"
        if state.ssm.dtype != torch.float32 or state.conv.dtype != w.dtype:
            return f"state dtypes conv {state.conv.dtype}, ssm {state.ssm.dtype} (want {w.dtype}, float32)"
        if state.conv.device.type != "cpu" or state.ssm.device.type != "cpu":
            return "state not on the CPU"
        if state.ssm.dim() != 5 or _layer_view(state.conv, b) is None or _layer_view(_ssm_view(state), b) is None:
            return "state layout: neither contiguous nor the first rows of a contiguous pool"
        return None

    def _weights(self, model: MambaLM):
        """The kernel's weight arguments, rebuilt when any parameter they came from was replaced or changed
        (its address or version: an optimizer step, load_state_dict, .to())."""
        params = [p for p in model.parameters()]
        key = [(p.data_ptr(), p._version) for p in params]
        if self._packed is not None and self._packed[0] == key:
            return self._packed[1]
        self._packed = None  # free the old copy before building the new one
        c = model.config
        layers = [layer for layer in model.backbone.layers]
        H, P = c.nheads, c.headdim
        f32 = torch.float32
        with torch.no_grad():
            mats = []
            for layer in layers:
                mats += [layer.mixer.in_proj.weight.detach(), layer.mixer.out_proj.weight.detach()]
            mats.append(model.lm_head.weight.detach())
            flat, offsets = panels.pack_flat(mats)
            m = [layer.mixer for layer in layers]
            conv_b = [x.conv1d.bias if x.conv1d.bias is not None else torch.zeros(x.conv_dim) for x in m]
            Dm = [(x.D.view(H, P) if c.D_has_hdim else x.D[:, None].expand(H, P)) for x in m]
            args = (
                _np(torch.stack([layer.norm.weight.detach() for layer in layers])), float(c.norm_eps), flat,
                np.array(offsets[0:-1:2], np.int64),
                torch.stack([x.conv1d.weight.detach()[:, 0].to(f32) for x in m]).numpy(),  # (L, C, W)
                torch.stack([t.detach().to(f32) for t in conv_b]).numpy(),
                torch.stack([x.dt_bias.detach().to(f32) for x in m]).numpy(),
                torch.stack([-torch.exp(x.A_log.detach().to(f32)) for x in m]).numpy(),
                torch.stack([t.detach().to(f32) for t in Dm]).contiguous().numpy(),
                torch.stack([x.norm.weight.detach().to(f32) for x in m]).numpy(),
                c.ngroups, c.d_state, bool(c.norm_before_gate), float(c.dt_limit[0]), float(c.dt_limit[1]),
            )
        result = (args, panels.panels_at(flat, offsets[-1], mats[-1]))
        self._packed = (key, result)
        return result

    @torch.no_grad()
    def step(self, input_ids: Tensor, state: MambaState) -> Tensor:
        """`MambaLM.step` fused: input_ids (b,) → logits (b, V) in the model's dtype; state updated in place.
        Checks everything the kernel relies on first (ValueError naming what does not fit)."""
        model = self.model
        model.check_step_inputs(input_ids, state)  # shapes against the model: the kernel does not bounds-check
        why = self.supports(input_ids, state)
        if why is not None:
            raise ValueError(f"Mamba2Decoder.step: the fused step cannot take this batch of {input_ids.shape[0]}: {why}")
        c = model.config
        b = input_ids.shape[0]
        weights, p_head = self._weights(model)
        conv, ssm = _layer_view(state.conv, b), _layer_view(_ssm_view(state), b)
        r = model.backbone.embedding(input_ids).float().contiguous()  # (b, D): the residual stream, float32
        parallel = torch.get_num_threads() > 1
        if parallel:
            set_threads()
        S, C = c.d_ssm, c.d_ssm + 2 * c.ngroups * c.d_state
        pad = panels.padded
        hn = np.empty((b, c.d_model), np.float32)
        zx = np.empty((b, pad(S + C + c.nheads)), np.float32)
        xbc = np.empty((b, C), np.float32)
        y = np.empty((b, S), np.float32)
        o = np.empty((b, pad(c.d_model)), np.float32)
        (norm_w, eps, flat, offsets, conv_w, conv_b, dt_b, A, Dm, gn_w, G, N, before, lo, hi) = weights
        _LAYERS[parallel](r.numpy(), norm_w, eps, flat, offsets, conv_w, conv_b, dt_b, A, Dm, gn_w, G, N, before,
                          lo, hi, _np(conv), ssm.numpy(), hn, zx, xbc, y, o)
        h = model.backbone.norm_f(r)  # (b, D)
        return panels.linear(h, p_head, model.lm_head.weight.shape[0]).to(h.dtype)  # (b, V), as MambaLM.step

