"""Fused decode step for Mamba-2 models: a whole step, every layer and the LM head, in one parallel region
(paper §3.3, recurrent mode).

Why: a decode step reads each weight once and does little arithmetic, so it should cost the time to stream the
weights (and, for Mamba-2, the state: (h, p, n) float32 a layer and sequence, 768 KiB at the 130m shape). The
reference `MambaLM.step` spends about twenty torch ops a layer, and a kernel a phase is a parallel region a phase:
with OMP_WAIT_POLICY=PASSIVE the other threads sleep between regions, and waking them about a hundred times a
step cost more than the work (docs/engine.md). So, as `fused.py` does for Mamba-1, the threads enter one region
a step and share each phase's tasks through counters (`ops/cpu/tasks.py`), waiting only at the three points
where a phase needs all of the previous one:

    per layer:  hn = RMSNorm(r)                                   (each thread its own copy)
             0  xBC = in_proj_xBC · hn → SiLU(conv1d(xBC))        (panels; each finished at once: the conv is
                z, dt = in_proj_z,dt · hn → SiLU(z), Δ             depthwise, the gates per channel)
             1  h ← exp(Δ·A)·h + Δ·x·Bᵀ, y = h·C + D·x            (a (row, head) a task: its state read once)
                yn = RMSNorm_grouped(y · SiLU(z)) · w              (each thread its own copy)
             2  r += out_proj · yn                                 (panels)
    then:       the final norm (each thread), the LM head          (panels)

in_proj (split in its xBC rows and its z, dt rows), out_proj and the head are read from a copy packed in 32-row
panels (`panels.py`: one sequential stream, float32 or bfloat16, each weight load shared by up to 8 rows of the
batch). Each output element is computed by one task in one fixed order whatever the thread count and batch, so
a row decodes exactly as it would alone.

The reference twin is `MambaLM.step` with the `mamba2.Mamba2` mixer (the same stages and order); tests compare
logits and both states over many steps, float32 and bfloat16, several batch sizes and configurations. What
differs is rounding: intermediates stay float32 here, where a bfloat16 model's reference step rounds the
projections' outputs to bfloat16.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from torch import Tensor

from ..model import MambaLM, MambaState
from ..mamba2 import Mamba2
from ..ops.cpu.primitives import (fexp, fma, halve, kernel_options, loop_ir, narrow, set_threads, sigmoid, softplus,
                                  vector_fn, widen)
from ..ops.cpu.tasks import claim, finish, sync_size, wait
from . import panels
from ._common import Decoder
from .fused import MAX_BATCH, _conv16, _layer_view, _norm, _np
from .panels import GROUP, panel_rows, renamed

_F32 = np.float32
# Channels a task of the in_proj phase: two 32-row panels (fewer, larger tasks cost fewer atomic operations on the
# counters the threads share; as fused.py's ROWS)
IN_PANELS = 2
HEAD_PANELS = 8  # LM-head panels a task (1572 panels at the 130m shape: ~200 tasks)
PHASES = 3  # of a layer: in_proj (+ conv, gates, Δ), the SSD step, out_proj (+ residual)


@intrinsic
def _head_step(typingctx, state, xbc, y, Dm, bb, e0, P, b_at, c_at, decay, d):
    """The SSD step of one head for row bb, as explicit 16-lane vector code: for its channels e = e0 … e0 + P − 1
    (N states each, h = state[bb, e])
        h ← decay·h + (d·x)·B,   y[bb, e] = C·h + D[e]·x     (x = xbc[bb, e]; B, C: xbc[bb, b_at …], [c_at …])
    with C·h in 16 lanes (lane k: n ≡ k mod 16, in order of n; states past a multiple of 16 into lane 0) added
    pairwise at the end (8, 4, 2, 1): one fixed order, whatever the machine, batch or thread count.

    Why an intrinsic: written as numba loops the 16 partial sums live in memory (an array) and LLVM, without
    fast-math, keeps the loop scalar. state (M, h·p, N), xbc (b, ≥ C), y (b, S), Dm (S,): float32, C-contiguous;
    decay and d float32. The caller guarantees the shapes (no bounds checks)."""
    f32 = types.float32
    if not all(isinstance(a, types.Array) and a.dtype == f32 and a.layout == "C" for a in (state, xbc, y, Dm)):
        return None
    if not (state.ndim == 3 and xbc.ndim == 2 and y.ndim == 2 and Dm.ndim == 1):
        return None
    if not (decay == f32 and d == f32):
        return None
    sig = types.void(state, xbc, y, Dm, bb, e0, P, b_at, c_at, decay, d)

    def codegen(context, builder, signature, args):
        i32, i64, fl = ir.IntType(32), ir.IntType(64), ir.FloatType()
        vec = ir.VectorType(fl, 16)
        st, xa, ya, da = (context.make_array(signature.args[i])(context, builder, args[i]) for i in range(4))
        bbv, e0v, Pv, bav, cav = (context.cast(builder, args[i], signature.args[i], types.int64)
                                  for i in (4, 5, 6, 7, 8))
        decay_s, d_s = args[9], args[10]

        def c(v):
            return ir.Constant(i64, v)

        def vload(ptr):
            return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)

        def splat(x):
            v = builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, ir.Constant(vec, ir.Undefined),
                                          ir.Constant(ir.VectorType(i32, 16), [0] * 16))

        vfma = vector_fn(builder, "fma", vec, 3)
        sfma = builder.module.globals.get("llvm.fma.f32") or ir.Function(
            builder.module, ir.FunctionType(fl, [fl] * 3), name="llvm.fma.f32")
        HP, N = builder.extract_value(st.shape, 1), builder.extract_value(st.shape, 2)
        n16 = builder.and_(N, c(-16))  # states in whole vectors
        x_row = builder.gep(xa.data, [builder.mul(bbv, builder.extract_value(xa.shape, 1))])
        y_row = builder.gep(ya.data, [builder.mul(bbv, builder.extract_value(ya.shape, 1))])
        Bp, Cp = builder.gep(x_row, [bav]), builder.gep(x_row, [cav])
        decay_v = splat(decay_s)
        acc_p = cgutils.alloca_once(builder, vec)  # the lanes, in the entry block (LLVM keeps it in a register)

        def channel(q):  # channel e0 + q
            e = builder.add(e0v, q)
            x = builder.load(builder.gep(x_row, [e]))
            dx = builder.fmul(d_s, x)
            dx_v = splat(dx)
            hp = builder.gep(st.data, [builder.mul(builder.add(builder.mul(bbv, HP), e), N)])
            builder.store(ir.Constant(vec, [0.0] * 16), acc_p)

            def chunk(n0):  # states n0 … n0 + 15
                p = builder.gep(hp, [n0])
                h = builder.call(vfma, [vload(p), decay_v, builder.fmul(dx_v, vload(builder.gep(Bp, [n0])))])
                builder.store(h, builder.bitcast(p, vec.as_pointer()), align=4)
                builder.store(builder.call(vfma, [h, vload(builder.gep(Cp, [n0])), builder.load(acc_p)]), acc_p)

            loop_ir(builder, n16, 16, chunk, "ssd_chunk")

            def rest(j):  # state n16 + j, into lane 0
                n = builder.add(n16, j)
                p = builder.gep(hp, [n])
                h = builder.call(sfma, [builder.load(p), decay_s, builder.fmul(dx, builder.load(builder.gep(Bp, [n])))])
                builder.store(h, p)
                a = builder.load(acc_p)
                lane0 = builder.extract_element(a, ir.Constant(i32, 0))
                a0 = builder.call(sfma, [h, builder.load(builder.gep(Cp, [n])), lane0])
                builder.store(builder.insert_element(a, a0, ir.Constant(i32, 0)), acc_p)

            loop_ir(builder, builder.sub(N, n16), 1, rest, "ssd_rest")
            t = builder.load(acc_p)
            for width in (8, 4, 2, 1):  # lane k += lane k + width, as `halve`
                hi = builder.shuffle_vector(t, ir.Constant(vec, ir.Undefined), ir.Constant(
                    ir.VectorType(i32, 16), [width + i if i < width else 0 for i in range(16)]))
                t = builder.fadd(t, hi)
            s = builder.extract_element(t, ir.Constant(i32, 0))
            out = builder.call(sfma, [builder.load(builder.gep(da.data, [e])), x, s])
            builder.store(out, builder.gep(y_row, [e]))

        loop_ir(builder, Pv, 1, channel, "ssd_channel")
        return context.get_dummy_value()

    return sig, codegen


def _in_task(k, n_xbc, h, p_xbc, p_zdt, conv_wt, conv_b, conv_state, dt_b, lo, hi, S, raw, xbc, zdt):
    """Task k of the in_proj phase: IN_PANELS panels, first those of xBC (k < n_xbc tasks), then those of
    [z | dt]; each panel's channels are finished at once (the conv is depthwise, the gates per channel):
        xBC panel: xbc = SiLU(conv(raw) + conv bias), the conv state shifted by one (`_conv_channels`)
        z rows:    zdt[:, e] = SiLU(z_e)                            (the gate of the gated norm)
        dt rows:   zdt[:, S + hh] = clamp(softplus(dt + dt_bias))   (Δ of head hh)"""
    if k < n_xbc:
        for g in range(k * IN_PANELS, min((k + 1) * IN_PANELS, p_xbc.shape[0])):
            panel_rows(p_xbc, g, h, raw)
            e0 = g * GROUP
            n = min(conv_wt.shape[1], e0 + GROUP) - e0
            if n == GROUP:
                _conv_channels(e0, GROUP, conv_wt, conv_b, conv_state, raw, xbc)
            else:
                _conv_channels(e0, n, conv_wt, conv_b, conv_state, raw, xbc)
    else:
        H = dt_b.shape[0]
        for g in range((k - n_xbc) * IN_PANELS, min((k - n_xbc + 1) * IN_PANELS, p_zdt.shape[0])):
            panel_rows(p_zdt, g, h, zdt)
            r0, r1 = g * GROUP, min(S + H, (g + 1) * GROUP)
            z1, d0 = min(r1, S), max(r0, S)  # z rows r0 … z1 − 1, dt rows d0 … r1 − 1
            for bb in range(zdt.shape[0]):
                zv = zdt[bb, r0:r0 + GROUP]  # a row view (see fused.py `_views`)
                for q in range(z1 - r0):
                    zv[q] = zv[q] * sigmoid(zv[q])
                for e in range(d0, r1):
                    d = softplus(zdt[bb, e] + dt_b[e - S])
                    zdt[bb, e] = _F32(min(max(d, _F32(lo)), _F32(hi)))  # float32 (lo, hi arrive as float64)


def _conv_channels(e0, n, conv_wt, conv_b, conv_state, raw, xbc):
    """Channels e0 … e0 + n − 1 of xBC: the causal depthwise conv over the last W inputs (the state holds W − 1;
    it shifts by one), its bias and SiLU, from raw (in_proj's output) into xbc. conv_wt (W, C), the conv weight
    transposed; W = 4 (every preset) runs whole blocks of 16 channels as fused.py's vector code (`_conv16`)."""
    W = conv_wt.shape[0]
    v = n // 16 * 16 if W == 4 else 0
    cw, cb = conv_wt[:, e0:e0 + n], conv_b[e0:e0 + n]  # (W, n), (n,)
    for bb in range(raw.shape[0]):
        _conv16(conv_state, conv_wt, raw, xbc, bb, e0, v)
        xv, cs, out = raw[bb, e0:e0 + n], conv_state[bb, e0:e0 + n], xbc[bb, e0:e0 + n]  # (n,), (n, W − 1), (n,)
        for k in range(v, n):
            acc = widen(cw[W - 1, k]) * xv[k]
            for t in range(W - 1):
                acc += widen(cw[t, k]) * widen(cs[k, t])
            for t in range(W - 2):
                cs[k, t] = cs[k, t + 1]
            if W > 1:
                cs[k, W - 2] = narrow(xv[k], cs)
            out[k] = acc
        for k in range(n):  # vectorised over channels
            acc = out[k] + cb[k]
            out[k] = acc * sigmoid(acc)


def _ssd_task(task, H, G, N, P, A, Dm, ssm_state, xbc, zdt, y):
    """The SSD step of (row, head) = divmod(task, H): h ← exp(Δ·A)·h + Δ·x·Bᵀ, y = h·C + D·x
    (`_head_step`)."""
    bb = task // H
    hh = task - bb * H
    gg = hh // (H // G)
    S = H * P
    d = zdt[bb, S + hh]
    decay = _F32(fexp(d * A[hh]))
    _head_step(ssm_state, xbc, y, Dm, bb, hh * P, P, S + gg * N, S + G * N + gg * N, decay, d)


def _gated_norm(y, zdt, gn_w, G, eps, before_gate, out):
    """out = RMSNorm_grouped(y · SiLU(z)) · w per group of S / G channels (or RMSNorm(y) · w · SiLU(z) when
    before_gate); SiLU(z) is zdt[:, :S] already. Sums of squares in 8 chains, added pairwise (as fused._norm)."""
    b, S = y.shape
    gs = S // G
    ss8 = np.zeros(8, dtype=np.float32)
    for bb in range(b):
        for gg in range(G):
            j0 = gg * gs
            yv, zv, ov, wv = y[bb, j0:j0 + gs], zdt[bb, j0:j0 + gs], out[bb, j0:j0 + gs], gn_w[j0:j0 + gs]  # (gs,)
            if before_gate:
                for k in range(gs):
                    ov[k] = yv[k]
            else:
                for k in range(gs):
                    ov[k] = yv[k] * zv[k]
            ss8[:] = 0
            for k0 in range(0, gs - 7, 8):
                for q in range(8):
                    ss8[q] = fma(ov[k0 + q], ov[k0 + q], ss8[q])
            for k in range(gs - gs % 8, gs):
                ss8[k % 8] = fma(ov[k], ov[k], ss8[k % 8])
            halve(ss8, 4), halve(ss8, 2), halve(ss8, 1)
            scale = _F32(1.0) / np.sqrt(ss8[0] / _F32(gs) + _F32(eps))
            if before_gate:
                for k in range(gs):
                    ov[k] = ov[k] * scale * widen(wv[k]) * zv[k]
            else:
                for k in range(gs):
                    ov[k] = ov[k] * scale * widen(wv[k])


def _out_task(g, yn, p_out, o, r):
    """r[:, 32g : 32g + 32] += out_proj panel g of yn."""
    D = r.shape[1]
    panel_rows(p_out, g, yn, o)
    j0, n = g * GROUP, min(D, (g + 1) * GROUP) - g * GROUP
    for bb in range(r.shape[0]):
        rv, ov = r[bb, j0:j0 + n], o[bb, j0:j0 + n]
        for k in range(n):
            rv[k] += ov[k]


def _layer(t, threads, r, norm_w, eps, p_xbc, p_zdt, p_out, conv_wt, conv_b, conv_state, dt_b, A, Dm, gn_w,
           G, N, before_gate, lo, hi, ssm_state, hn, raw, xbc, zdt, y, yn, o, sync):
    """Thread t's part of one layer (r += mixer(norm(r)) for b rows): its own copy of the pre-norm, then three
    phases, each thread first taking tasks of its own range, then what is left of the others', and waiting for
    the phase to be done (ops/cpu/tasks.py; sync: this layer's counters, zeroed):
        0  in_proj, IN_PANELS panels a task, each finished at once: conv + SiLU, SiLU(z), Δ   (`_in_task`)
        1  the SSD step, a (row, head) a task                                                  (`_ssd_task`)
        -  its own copy of the gated norm of y (out_proj reads all of it in every task)
        2  out_proj, a panel a task, added into r                                              (`_out_task`)"""
    H = A.shape[0]
    S = y.shape[1]
    P = S // H
    b = r.shape[0]
    h, ynt = hn[t], yn[t]  # (b, D), (b, S): this thread's copies
    _norm(r, norm_w, eps, h)
    n_xbc = (p_xbc.shape[0] + IN_PANELS - 1) // IN_PANELS
    n_in = n_xbc + (p_zdt.shape[0] + IN_PANELS - 1) // IN_PANELS
    k, q = claim(sync, 0, n_in, t, threads, 0)
    count = 0
    while k < n_in:
        _in_task(k, n_xbc, h, p_xbc, p_zdt, conv_wt, conv_b, conv_state, dt_b, lo, hi, S, raw, xbc, zdt)
        count += 1
        k, q = claim(sync, 0, n_in, t, threads, q)
    finish(sync, 0, threads, count)
    wait(sync, 0, threads, n_in)
    n_ssd = b * H
    k, q = claim(sync, 1, n_ssd, t, threads, 0)
    count = 0
    while k < n_ssd:
        _ssd_task(k, H, G, N, P, A, Dm, ssm_state, xbc, zdt, y)
        count += 1
        k, q = claim(sync, 1, n_ssd, t, threads, q)
    finish(sync, 1, threads, count)
    wait(sync, 1, threads, n_ssd)
    _gated_norm(y, zdt, gn_w, G, eps, before_gate, ynt)
    n_out = p_out.shape[0]
    k, q = claim(sync, 2, n_out, t, threads, 0)
    count = 0
    while k < n_out:
        _out_task(k, ynt, p_out, o, r)
        count += 1
        k, q = claim(sync, 2, n_out, t, threads, q)
    finish(sync, 2, threads, count)
    wait(sync, 2, threads, n_out)  # the next layer's norm reads all of r


def _head_task(k, h, p_head, logits):
    """LM-head panels HEAD_PANELS·k … of h into logits."""
    for g in range(k * HEAD_PANELS, min((k + 1) * HEAD_PANELS, p_head.shape[0])):
        panel_rows(p_head, g, h, logits)


def _layers(r, norm_w, eps, flat, offsets, conv_wt, conv_b, dt_b, A, Dm, gn_w, G, N, before_gate, lo, hi,
            conv_all, ssm_all, norm_f, p_head, hn, raw, xbc, zdt, y, yn, o, logits, sync, threads):
    """A whole decode step for b rows in one parallel region (`threads` iterations of a prange), each thread
    going through the layers (`_layer`) and then the head; the phases' waits order them.

    r (b, D) the residual stream, float32 (updated). Weights: float32, or bfloat16 bits (int16) where `widen`
    reads them: norm_w (L, D), gn_w (L, S), norm_f (D,); conv_wt (L, W, C), the conv weight transposed, in the
    conv state's dtype; conv_b, dt_b, A (L, h) = −exp(A_log), Dm (L, S) (D per channel) float32. flat/offsets:
    per layer the panels of in_proj's xBC rows (C), of its z and dt rows (S + h), of out_proj (D), at offsets[i];
    p_head the LM head's panels. States conv_all (L, M ≥ b, C, W − 1), in the model's dtype, ssm_all (L, M, h·p,
    N) float32. Scratch (float32): hn (T, b, D), raw/xbc (b, ≥ C), zdt (b, ≥ S + h), y (b, S), yn (T, b, S),
    o (b, ≥ D); logits (b, ≥ V) the output; sync (L + 1, …) the phases' counters, zeroed.

    The head: each thread norms r (norm_f) into its own hn[t], rounded to the weights' dtype as `RMSNorm` returns
    it (MambaLM.step's head reads that), then the head's panels are split between the threads."""
    L, D = norm_w.shape
    C, S, H = conv_wt.shape[2], y.shape[1], A.shape[1]
    n_xbc, n_zdt, n_out = (C + GROUP - 1) // GROUP, (S + H + GROUP - 1) // GROUP, (D + GROUP - 1) // GROUP
    s_xbc, s_zdt, s_out = n_xbc * D * GROUP, n_zdt * D * GROUP, n_out * S * GROUP
    for t in prange(threads):  # one parallel region
        for i in range(L):
            at = offsets[i]
            p_xbc = flat[at:at + s_xbc].reshape((n_xbc, D, GROUP))
            at += s_xbc
            p_zdt = flat[at:at + s_zdt].reshape((n_zdt, D, GROUP))
            at += s_zdt
            p_out = flat[at:at + s_out].reshape((n_out, S, GROUP))
            _layer(t, threads, r, norm_w[i], eps, p_xbc, p_zdt, p_out, conv_wt[i], conv_b[i], conv_all[i], dt_b[i],
                   A[i], Dm[i], gn_w[i], G, N, before_gate, lo, hi, ssm_all[i], hn, raw, xbc, zdt, y, yn, o, sync[i])
        h = hn[t]
        _norm(r, norm_f, eps, h)
        for bb in range(h.shape[0]):
            hv = h[bb]
            for j in range(D):
                hv[j] = widen(narrow(hv[j], norm_f))  # float32: unchanged; bfloat16: rounded as RMSNorm returns it
        n_head = (p_head.shape[0] + HEAD_PANELS - 1) // HEAD_PANELS
        k, q = claim(sync[L], 0, n_head, t, threads, 0)
        count = 0
        while k < n_head:
            _head_task(k, h, p_head, logits)
            count += 1
            k, q = claim(sync[L], 0, n_head, t, threads, q)
        finish(sync[L], 0, threads, count)  # no wait: the region's end waits for every thread


_in_task = njit(inline="always", **kernel_options(parallel=False))(_in_task)
_conv_channels = njit(inline="always", **kernel_options(parallel=False))(_conv_channels)
_ssd_task = njit(inline="always", **kernel_options(parallel=False))(_ssd_task)
_gated_norm = njit(inline="always", **kernel_options(parallel=False))(_gated_norm)
_out_task = njit(inline="always", **kernel_options(parallel=False))(_out_task)
_layer = njit(inline="always", **kernel_options(parallel=False))(_layer)
_head_task = njit(inline="always", **kernel_options(parallel=False))(_head_task)

# parallel over torch's thread count, or serial for one thread (a parallel launch wakes the pool's threads)
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
    if hasattr(model.lm_head, "qweight"):
        return "a quantized Mamba-2 model (the fused Mamba-2 step reads float weights only, for now)"
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
    if c.attn_layer_idx or c.d_intermediate:
        return "a hybrid (attention layers or MLPs)"
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


class Mamba2Decoder(Decoder):
    """`MambaLM.step` for CPU decoding of Mamba-2 models as one compiled call a step (see the module docstring),
    applied from outside: it owns a packed copy of in_proj, out_proj and the LM head, built on the first step and
    rebuilt when a parameter is replaced or updated; `release()` frees it. The same interface as
    `fused.FusedDecoder` (which covers Mamba-1 models; the shared part is `_common.Decoder`):

        decoder = Mamba2Decoder(model)            # ValueError naming the reason if the model is not covered
        logits = decoder.step(input_ids, state)   # (b, V); state updated in place, as MambaLM.step
        decoder.supports(input_ids, state)        # None, or why this batch must take MambaLM.step instead
    """

    max_batch = MAX_BATCH
    unsupported = staticmethod(unsupported)

    def __init__(self, model: MambaLM):
        super().__init__(model)
        self._packed = None  # (checks, weights)

    @staticmethod
    def state_views(state: MambaState, b: int) -> tuple[Tensor, Tensor] | None:
        """The conv and SSM states as the kernel reads them, (L, M ≥ b, C, W − 1) and (L, M, h·p, N), contiguous
        or a contiguous pool's first b rows (`fused._layer_view`); None for any other layout."""
        if state.ssm.dim() != 5:
            return None
        conv, ssm = _layer_view(state.conv, b), _layer_view(state.ssm.flatten(2, 3), b)
        return None if conv is None or ssm is None else (conv, ssm)

    def release(self) -> None:
        """Frees the packed copy of the weights; the next step builds it again."""
        self._packed = None

    def _weights(self, model: MambaLM):
        """The kernel's weight arguments (`_layers`) and the packed head, rebuilt when any parameter they came
        from was replaced or changed (its address or version: an optimizer step, load_state_dict, .to())."""
        params = [p for p in model.parameters()]
        key = [(p.data_ptr(), p._version) for p in params]
        if self._packed is not None and self._packed[0] == key:
            return self._packed[1]
        self._packed = None  # free the old copy before building the new one
        c = model.config
        layers = [layer for layer in model.backbone.layers]
        H, P, S = c.nheads, c.headdim, c.d_ssm
        C = S + 2 * c.ngroups * c.d_state
        f32 = torch.float32
        with torch.no_grad():
            mats = []
            for layer in layers:  # in_proj's rows are [z (S) | xBC (C) | dt (h)] (no MLP branch: `unsupported`)
                w_in = layer.mixer.in_proj.weight.detach()
                mats += [w_in[S:S + C], torch.cat([w_in[:S], w_in[S + C:]]), layer.mixer.out_proj.weight.detach()]
            mats.append(model.lm_head.weight.detach())
            flat, offsets = panels.pack_flat(mats)  # in the order a step reads them
            m = [layer.mixer for layer in layers]
            conv_b = [x.conv1d.bias if x.conv1d.bias is not None else torch.zeros(x.conv_dim) for x in m]
            Dm = [(x.D.view(H, P) if c.D_has_hdim else x.D[:, None].expand(H, P)).reshape(S) for x in m]
            args = (
                _np(torch.stack([layer.norm.weight.detach() for layer in layers])), float(c.norm_eps), flat,
                np.array(offsets[0:-1:3], np.int64),
                _np(torch.stack([x.conv1d.weight.detach()[:, 0].t() for x in m]).contiguous()),  # (L, W, C)
                torch.stack([t.detach().to(f32) for t in conv_b]).numpy(),
                torch.stack([x.dt_bias.detach().to(f32) for x in m]).numpy(),
                torch.stack([-torch.exp(x.A_log.detach().to(f32)) for x in m]).numpy(),
                torch.stack([t.detach().to(f32) for t in Dm]).contiguous().numpy(),
                _np(torch.stack([x.norm.weight.detach() for x in m])),
                c.ngroups, c.d_state, bool(c.norm_before_gate), float(c.dt_limit[0]), float(c.dt_limit[1]),
                _np(model.backbone.norm_f.weight.detach()), panels.panels_at(flat, offsets[-1], mats[-1]),
            )
        self._packed = (key, args)
        return args

    @torch.no_grad()
    def step(self, input_ids: Tensor, state: MambaState) -> Tensor:
        """`MambaLM.step` fused: input_ids (b,) → logits (b, V) in the model's dtype; state updated in place.
        Checks everything the kernel relies on first (ValueError naming what does not fit)."""
        model = self.model
        model.check_step_inputs(input_ids, state)  # shapes against the model: the kernel does not bounds-check
        why = self.supports(input_ids, state)
        if why is not None:
            raise ValueError(f"Mamba2Decoder.step: the fused step cannot take this batch of {input_ids.shape[0]}: "
                             f"{why}")
        c = model.config
        b = input_ids.shape[0]
        weights = self._weights(model)
        conv, ssm = self.state_views(state, b)  # (L, M ≥ b, C, W − 1), (L, M, h·p, N)
        r = model.backbone.embedding(input_ids).float().contiguous()  # (b, D): the residual stream, float32
        parallel = torch.get_num_threads() > 1
        if parallel:
            set_threads()
        threads = numba.get_num_threads() if parallel else 1
        V = model.lm_head.weight.shape[0]
        S = c.d_ssm
        hn, raw, xbc, zdt, y, yn, o, sync = _scratch(threads, b, c.d_model, S, S + 2 * c.ngroups * c.d_state,
                                                     c.nheads, c.n_layer)
        logits = torch.empty(b, panels.padded(V), dtype=torch.float32)
        _LAYERS[parallel](r.numpy(), *weights[:15], _np(conv), ssm.numpy(), *weights[15:], hn, raw, xbc, zdt, y, yn,
                          o, logits.numpy(), sync, threads)
        return logits[:, :V].to(model.lm_head.weight.dtype)  # (b, V), as MambaLM.step


_SCRATCH = threading.local()  # a thread's float32 scratch buffer and task counters, reused across steps


def _scratch(threads: int, b: int, D: int, S: int, C: int, H: int, L: int) -> tuple[np.ndarray, ...]:
    """The step's scratch arrays (`_layers`: hn (T, b, D), raw and xbc (b, C), zdt (b, S + h), y (b, S), yn
    (T, b, S), o (b, D), the outputs of packed matrices whole panels wide) as views of one float32 buffer, each
    on a cache line of its own, and the task counters (L + 1, …), zeroed (ops/cpu/tasks.py). Reused from step
    to step; every element is written before it is read within a step. The buffer belongs to the calling Python
    thread, so concurrent steps from two threads never share it; it grows to the largest batch seen."""
    pad = panels.padded
    shapes = ((threads, b, D), (b, pad(C)), (b, pad(C)), (b, pad(S + H)), (b, S), (threads, b, S), (b, pad(D)))
    sizes = [-(-int(np.prod(s)) // 16) * 16 for s in shapes]
    n_sync = sync_size(PHASES, threads)
    buf, sync = getattr(_SCRATCH, "buf", None), getattr(_SCRATCH, "sync", None)
    if buf is None or buf.shape[0] < sum(sizes):
        raw = np.empty(sum(sizes) + 16, np.float32)
        skip = (-raw.ctypes.data % 64) // 4
        buf = _SCRATCH.buf = raw[skip:skip + sum(sizes)]
    if sync is None or sync.shape[0] < (L + 1) * n_sync:
        sync = _SCRATCH.sync = np.empty((L + 1) * n_sync, np.int64)
    views, at = [], 0
    for shape, size in zip(shapes, sizes):
        views.append(buf[at:at + int(np.prod(shape))].reshape(shape))
        at += size
    counters = sync[:(L + 1) * n_sync].reshape(L + 1, n_sync)
    counters.fill(0)
    return (*views, counters)
