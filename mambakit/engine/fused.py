"""Fused decode step: one compiled call for all layers, for a batch of sequences (paper §3.3, recurrent mode).

Why: a decode step of the 130m model does little arithmetic (one token per sequence), so the unfused step,
about 25 torch ops and numba calls per layer (norm, in_proj, conv update, x_proj, dt_proj, state update,
out_proj, residual add, dtype conversions), spends a good part of its time outside the weight reads. Here the
layers are one numba call, one parallel region (`_layers`), that keeps every intermediate in small scratch
buffers and reads each weight matrix once, the threads sharing each phase's tasks (`_layer`). The large
matrices (in_proj, dt_proj, out_proj, the LM head) are read from a copy packed in 32-row panels
(`panels.py`: one sequential stream, and each weight load shared by the batch's rows), the small ones from
a copy stacked by layer; both are built on the first fused step and rebuilt when a weight changes
(`FusedDecoder._weights`). How a step runs, and what it gains over the unfused step: docs/engine.md.

The reference twin is the unfused `Mamba.step` (model.py), with the same arguments and results: tests compare
the two (logits and both states over many steps, float32 and bfloat16 weights, batch 1 … 9, odd sizes). The
stages and their order are those of `Mamba.step`; what differs is rounding: intermediates stay float32 here,
where a bfloat16 model's unfused step rounds x, z and the projections' outputs to bfloat16.

`unsupported(model)` and `FusedDecoder.supports(input_ids, state)` say when the fused path runs (CPU, float32 or
bfloat16 weights, RMSNorm, a float32 residual stream, the plain Mamba mixer (FalconMamba's too: its mixer norms
run in `_mixer_norms`), batch ≤ MAX_BATCH[dtype], a state
layout the kernel reads); `mambakit.engine.step_function` takes the unfused `MambaLM.step` otherwise.
"""

from __future__ import annotations

import threading
import weakref

import numba
import numpy as np
import torch

from llvmlite import ir
from numba import njit, prange
from numba import types as nb_types
from numba.extending import intrinsic
from torch import Tensor

from ..model import Mamba, MambaLM, MambaState
from . import panels, qpanels
from .panels import GROUP, panel_rows, renamed
from .qpanels import n_panels, panel_stream, qview, rows
from ..ops.cpu.primitives import (exp_ir, fexp, fma, halve, kernel_options, loop_ir, narrow, prefetch_ir, set_threads,
                                  sigmoid, softplus, vector_fn, widen, widen_ir)
from ..ops.cpu.tasks import claim, finish, home, sync_size, wait

# The fused step runs for batches up to MAX_BATCH[dtype] (see `FusedDecoder.supports`); larger ones take the
# unfused step. bfloat16 stops where torch's GEMM (oneDNN, AVX512-BF16 dot products) starts to win; float32 goes
# as far as it was measured to win (docs/engine.md).
MAX_BATCH = {torch.float32: 64, torch.bfloat16: 16}
PHASES = 4  # of a layer: in_proj + conv, x_proj, Δ + state update, out_proj (the norm is each thread's own)
# Channels a task, in the in_proj phase (their x and z rows: 4 panels) and in the state-update phase, so that
# task k of both phases covers the same channels and one thread does both (`ops.cpu.tasks`: each thread starts
# with its own range of tasks). Fewer, larger tasks cost fewer atomic operations on counters the threads share,
# which counts where a round trip between the two vCPUs is slow (docs/engine.md).
ROWS = 64
# Cache lines of out_proj's weights a thread asks for (software prefetch) per channel and row of the state update,
# from its own out_proj panels: the state update computes (vector exps) while memory would idle, and out_proj then
# finds part of its weights in cache. More lines a channel stall the exps (docs/engine.md).
AHEAD_LINES = 2
# Channels ahead (in the state update's order: a row's channels, then the next row's) whose state a thread asks
# for while it updates the current one: the states of 24 layers at batch 8 (19 MB) do not stay in the caches
# between steps, and a channel's 16 states are one cache line. 32: the best of 0 … 128 (docs/engine.md).
STATE_AHEAD = 32
assert ROWS % GROUP == 0, "a task computes whole in_proj and dt_proj panels"
_F32 = np.float32


def _channel(ssm_state, Bv, Cv, A, bb, e, delta, dx):
    """One channel's state update, h ← exp(ΔA) h + Δx B (h = ssm_state[bb, e], N states), returning C·h;
    Bv, Cv (N,): this row's B and C. The reference for `_channels16`, and the code for N ≠ 16."""
    acc = _F32(0.0)
    for n in range(A.shape[1]):
        h = ssm_state[bb, e, n] * fexp(delta * A[e, n]) + dx * Bv[n]
        ssm_state[bb, e, n] = h
        acc += h * Cv[n]
    return acc


_channel = njit(inline="always", **kernel_options(parallel=False))(_channel)


@intrinsic
def _channels16(typingctx, ssm_state, A, dbc, R, y, xc, bb, e0, n, ahead, at, per):
    """`_channel` for N = 16 (every preset) over channels e0 … e0 + n − 1 of row bb, as one loop of explicit
    16-lane vector code: y[bb, e] holds Δ on entry and C·h on exit; B and C are row bb's, dbc[bb, R : R + 32].
    Per channel: one load of h and of A, a vector exp (`exp_ir`, fexp's), a tree sum for C·h.

    Why one intrinsic for the loop, not a call per channel (the intrinsic `_channel16` before): the per-call
    code around it (array views of B and C, the loads of y, x and the arrays' fields, kept on the stack once
    the inlined layer has used up the registers) was a sizeable cost next to the vector work (docs/engine.md).

    While it computes, the loop asks for memory the thread reads next (`prefetch_ir`): the state of the channel
    STATE_AHEAD channels on (wrapping to row bb + 1), and `per` cache lines of `ahead` per channel from element
    `at` on (out_proj's weights; `_channels`). The caller guarantees N = 16 and the shapes (no bounds checks)."""
    f32 = nb_types.float32
    if not all(isinstance(a, nb_types.Array) and a.dtype == f32 and a.layout == "C"
               for a in (ssm_state, A, dbc, y, xc)):
        return None
    if not (ssm_state.ndim == 3 and A.ndim == 2 and dbc.ndim == 2 and y.ndim == 2 and xc.ndim == 2):
        return None
    if not (isinstance(ahead, nb_types.Array) and ahead.ndim == 1 and ahead.layout == "C"):
        return None
    sig = nb_types.void(ssm_state, A, dbc, R, y, xc, bb, e0, n, ahead, at, per)

    def codegen(context, builder, signature, args):
        vec = ir.VectorType(ir.FloatType(), 16)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        st, a, d, ya, xa = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1, 2, 4, 5))
        ah = context.make_array(signature.args[9])(context, builder, args[9])
        Rv, bbv, e0v, nv, atv, perv = (context.cast(builder, args[i], signature.args[i], nb_types.int64)
                                       for i in (3, 6, 7, 8, 10, 11))

        def c(v):
            return ir.Constant(i64, v)

        def load(ptr):
            return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)

        def splat(x):
            v = builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, ir.Constant(vec, ir.Undefined),
                                          ir.Constant(ir.VectorType(i32, 16), [0] * 16))

        fma = vector_fn(builder, "fma", vec, 3)
        b, E = builder.extract_value(st.shape, 0), builder.extract_value(st.shape, 1)
        d_row = builder.gep(d.data, [builder.add(builder.mul(bbv, builder.extract_value(d.shape, 1)), Rv)])
        Bv, Cv = load(d_row), load(builder.gep(d_row, [c(16)]))
        y_row = builder.gep(ya.data, [builder.add(builder.mul(bbv, builder.extract_value(ya.shape, 1)), e0v)])
        x_row = builder.gep(xa.data, [builder.add(builder.mul(bbv, builder.extract_value(xa.shape, 1)), e0v)])
        h_row = builder.gep(st.data, [builder.mul(builder.add(builder.mul(bbv, E), e0v), c(16))])
        h_next = builder.gep(st.data, [builder.mul(builder.add(builder.mul(builder.add(bbv, c(1)), E), e0v), c(16))])
        a_row = builder.gep(a.data, [builder.mul(e0v, c(16))])
        n_ahead = builder.extract_value(ah.shape, 0)
        line = 64 // context.get_abi_sizeof(context.get_data_type(signature.args[9].dtype))
        has_next = builder.icmp_signed("<", builder.add(bbv, c(1)), b)

        def channel(k):  # channel e0 + k
            # memory the thread reads next, asked for now
            for j in range(AHEAD_LINES):
                idx = builder.add(atv, builder.mul(builder.add(builder.mul(k, perv), c(j)), c(line)))
                with builder.if_then(builder.and_(builder.icmp_signed("<", c(j), perv),
                                                  builder.icmp_signed("<", idx, n_ahead))):
                    prefetch_ir(builder, builder.gep(ah.data, [idx]))
            kn = builder.add(k, c(STATE_AHEAD))
            same = builder.icmp_signed("<", kn, nv)
            with builder.if_then(builder.or_(same, has_next)):
                prefetch_ir(builder, builder.select(same, builder.gep(h_row, [builder.mul(kn, c(16))]),
                                                    builder.gep(h_next, [builder.mul(builder.sub(kn, nv), c(16))])))
            # the state update of channel e0 + k
            yp = builder.gep(y_row, [k])
            delta = builder.load(yp)
            dx = builder.fmul(delta, builder.load(builder.gep(x_row, [k])))
            hp = builder.gep(h_row, [builder.mul(k, c(16))])
            dA = exp_ir(builder, builder.fmul(splat(delta), load(builder.gep(a_row, [builder.mul(k, c(16))]))))
            h = builder.call(fma, [load(hp), dA, builder.fmul(splat(dx), Bv)])  # h·exp(ΔA) + Δx·B
            builder.store(h, builder.bitcast(hp, vec.as_pointer()), align=4)
            t = builder.fmul(h, Cv)  # then Σ over the 16 lanes, halving
            for width in (8, 4, 2, 1):
                hi = builder.shuffle_vector(t, ir.Constant(vec, ir.Undefined), ir.Constant(
                    ir.VectorType(i32, 16), [width + i if i < width else 0 for i in range(16)]))
                t = builder.fadd(t, hi)
            builder.store(builder.extract_element(t, ir.Constant(i32, 0)), yp)

        loop_ir(builder, nv, 1, channel, "ch")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _conv16(typingctx, conv_state, conv_wt, xz, xc, bb, e0, n):
    """The causal depthwise conv of `_x_channels` for width W = 4, over channels e0 … e0 + n − 1 of row bb (n a
    multiple of 16), 16 channels at a time as explicit vector code: xc[bb, e] = w₃·x + w₀·s₀ + w₁·s₁ + w₂·s₂
    (x = xz[bb, e], in_proj's output with its bias; (s₀, s₁, s₂) = conv_state[bb, e], the last three inputs;
    wₜ = conv_wt[t, e]), the pre-activation, without the conv bias; then the state shifts by one: (s₁, s₂, x).

    Why: the state (b, E, W − 1) interleaves three taps per channel, and the loop of `_x_channels` over channels
    has inner loops over the taps, so LLVM left it scalar (it vectorises only innermost loops, and declined the
    stride-3 accesses with the taps unrolled); and inside the step that time is not hidden under the weight
    stream: while a thread computes between two panels, it asks memory for no weights (docs/engine.md). Here a
    block of 16 channels is three vector loads of the state, deinterleaved by shuffles (in the state's own type:
    a shifted tap is moved, not converted), four weight loads (conv_wt is the weight transposed, (W, E), by
    `FusedDecoder._weights`), four multiply-adds, three stores.

    conv_state (b, E, 3) and conv_wt (4, E) are float32, or bfloat16 bits (int16; x is then stored rounded to
    nearest even, as `narrow`); xz (b, ≥ e0 + n) and xc (b, ≥ e0 + n) float32, all C-contiguous. The caller
    guarantees W = 4 and the shapes (no bounds checks)."""
    if not all(isinstance(a, nb_types.Array) and a.layout == "C" for a in (conv_state, conv_wt, xz, xc)):
        return None
    if not (conv_state.ndim == 3 and conv_wt.ndim == 2 and xz.ndim == 2 and xc.ndim == 2):
        return None
    if not (conv_state.dtype == conv_wt.dtype and conv_state.dtype in (nb_types.float32, nb_types.int16)
            and xz.dtype == nb_types.float32 and xc.dtype == nb_types.float32):
        return None
    sig = nb_types.void(conv_state, conv_wt, xz, xc, bb, e0, n)

    def codegen(context, builder, signature, args):
        bf16 = signature.args[0].dtype == nb_types.int16
        f32, i16, i32, i64 = ir.FloatType(), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        et = i16 if bf16 else f32  # the state's and the weights' element type
        vec, evec, i32v = ir.VectorType(f32, 16), ir.VectorType(et, 16), ir.VectorType(i32, 16)
        st, w, xa, oa = (context.make_array(signature.args[i])(context, builder, args[i]) for i in range(4))
        bbv, e0v, nv = (context.cast(builder, args[i], signature.args[i], nb_types.int64) for i in (4, 5, 6))
        align = 2 if bf16 else 4

        def c(v):
            return ir.Constant(i64, v)

        def load(ptr, t):
            return builder.load(builder.bitcast(ptr, t.as_pointer()), align=align if t is evec else 4)

        def store(v, ptr):
            builder.store(v, builder.bitcast(ptr, v.type.as_pointer()), align=align if v.type is evec else 4)

        def widen(v):  # bfloat16 bits → float32
            return widen_ir(builder, v) if bf16 else v

        def narrow(v):  # float32 → bfloat16 bits, rounded to nearest even; NaN → 0x7FC0 (as `narrow`)
            if not bf16:
                return v
            bits = builder.bitcast(v, i32v)
            odd = builder.and_(builder.lshr(bits, ir.Constant(i32v, [16] * 16)), ir.Constant(i32v, [1] * 16))
            up = builder.add(builder.add(bits, ir.Constant(i32v, [0x7FFF] * 16)), odd)
            rounded = builder.trunc(builder.lshr(up, ir.Constant(i32v, [16] * 16)), evec)
            return builder.select(builder.fcmp_unordered("uno", v, v), ir.Constant(evec, [0x7FC0] * 16), rounded)

        def mask(idx):
            return ir.Constant(ir.VectorType(i32, len(idx)), idx)

        def to32(v):
            return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                          mask([i if i < 16 else 0 for i in range(32)]))

        fma = vector_fn(builder, "fma", vec, 3)
        E = builder.extract_value(st.shape, 1)
        s_row = builder.gep(st.data, [builder.mul(builder.add(builder.mul(bbv, E), e0v), c(3))])
        x_row = builder.gep(xa.data, [builder.add(builder.mul(bbv, builder.extract_value(xa.shape, 1)), e0v)])
        o_row = builder.gep(oa.data, [builder.add(builder.mul(bbv, builder.extract_value(oa.shape, 1)), e0v)])
        w_rows = [builder.gep(w.data, [builder.add(builder.mul(c(t), E), e0v)]) for t in range(4)]

        def block(k):  # channels e0 + k … e0 + k + 15
            sp = builder.gep(s_row, [builder.mul(k, c(3))])
            v = [load(builder.gep(sp, [c(16 * m)]), evec) for m in range(3)]  # the 48 taps s[e, t] at 3e + t
            lo, hi = builder.shuffle_vector(v[0], v[1], mask(list(range(32)))), to32(v[2])  # taps 0 … 31, 32 … 47
            taps = [builder.shuffle_vector(lo, hi, mask([3 * i + t for i in range(16)])) for t in range(3)]  # (16,):
            # tap t of the 16 channels (indices 32 … 47 of the pair lo, hi are hi's lanes 0 … 15)
            x = load(builder.gep(x_row, [k]), vec)
            acc = builder.fmul(widen(load(builder.gep(w_rows[3], [k]), evec)), x)
            for t in range(3):
                acc = builder.call(fma, [widen(load(builder.gep(w_rows[t], [k]), evec)), widen(taps[t]), acc])
            store(acc, builder.gep(o_row, [k]))
            new = [taps[1], taps[2], narrow(x)]  # the shifted state, channel by channel
            lo, hi = builder.shuffle_vector(new[0], new[1], mask(list(range(32)))), to32(new[2])
            for m in range(3):  # element 16m + l of the block is tap (16m + l) % 3 of channel (16m + l) // 3
                idx = [(16 * m + l) % 3 * 16 + (16 * m + l) // 3 for l in range(16)]  # < 32: from new[0], new[1]
                store(builder.shuffle_vector(lo, hi, mask(idx)), builder.gep(sp, [c(16 * m)]))

        loop_ir(builder, nv, 16, block, "conv")
        return context.get_dummy_value()

    return sig, codegen


def _layer(t, threads, r, norm_w, eps, p_in, b_in, conv_wt, conv_b, conv_state, p_x, p_dt, dt_b, A, Dv, ssm_state,
           p_out, b_out, hn, xz, xc, dbc, y, o, sync, rms_eps, dbn):
    """Thread t's part of one layer for b sequences; r (b, D) float32 is the residual stream, updated in place
    (r += mixer(norm(r))).

    Weights are float32 arrays or bfloat16 bits (int16). in_proj, x_proj, dt_proj and out_proj come packed in
    32-row panels (`panels.py`): p_in (2E/32, D, 32), p_x ((R + 2N)/32, E, 32), p_dt (E/32, R, 32), p_out (D/32,
    E, 32), rounded up to whole panels; conv_wt (W, E), the conv weight transposed; vectors norm_w
    (D,), conv_b (E,), dt_b (E,), Dv (E,), b_in (2E,) / b_out (D,) or empty. A (E, N) float32 = −exp(A_log).
    conv_state (b, E, W − 1) in the model's dtype and ssm_state (b, E, N) float32 are updated in place. Float32
    scratch: hn (T, b, D), xz (b, 2E), xc (b, E), dbc (b, R + 2N), y (b, E), o (b, D), the outputs of packed
    matrices whole panels wide. FalconMamba (rms_eps ≥ 0; −1 for Mamba): after x_proj each thread writes the
    RMS-normed Δ input, B and C into its own dbn[t] (T, b, R + 2N) and its state-update tasks read that copy
    (`_mixer_norms`; no wait: dbc is next written in the next layer's x_proj phase, after every task of this
    layer's state update is done).

    First each thread computes the RMSNorm of r into its own hn[t]. Then four phases; each thread takes a
    phase's tasks from its own range first, then from the others', and waits for the phase to be done before
    the next (ops/cpu/tasks.py; `sync`: this layer's counters, zeroed): in_proj for ROWS channels a task, their x
    and z rows, with the conv and SiLUs of the channels just produced; x_proj a panel a task; dt_proj with the
    state update, ROWS channels a task (task k of in_proj and of the state update cover the same channels, so
    the thread that did one usually does the other, and reads its x and z from its own caches); out_proj, a
    panel a task, adding into r.
    """
    E = A.shape[0]
    n_ch, n_x, n_out = (E + ROWS - 1) // ROWS, p_x.shape[0], n_panels(p_out)
    h = hn[t]  # (b, D): this thread's own copy of the normed input (see `_layers`)
    _norm(r, norm_w, eps, h)
    k, q = claim(sync, 0, n_ch, t, threads, 0)
    count = 0
    while k < n_ch:
        _in_proj_task(k, h, p_in, b_in, conv_wt, conv_b, conv_state, xz, xc)
        count += 1
        k, q = claim(sync, 0, n_ch, t, threads, q)
    finish(sync, 0, threads, count)
    wait(sync, 0, threads, n_ch)
    k, q = claim(sync, 1, n_x, t, threads, 0)
    count = 0
    while k < n_x:
        panel_rows(p_x, k, xc, dbc)  # (b, R + 2N): Δ's low-rank input, B, C (no bias)
        count += 1
        k, q = claim(sync, 1, n_x, t, threads, q)
    finish(sync, 1, threads, count)
    wait(sync, 1, threads, n_x)
    d = dbc
    if rms_eps >= 0:  # FalconMamba: this thread's normed copy
        d = dbn[t]
        _mixer_norms(dbc, p_dt.shape[1], A.shape[1], rms_eps, d)
    k, q = claim(sync, 2, n_ch, t, threads, 0)
    count = 0
    o0, o1 = home(n_out, t, threads)  # this thread's out_proj panels, fetched while the state update computes
    ahead = panel_stream(p_out, o0, o1)
    s0, s1 = home(n_ch, t, threads)
    while k < n_ch:
        j = k - s0  # the j-th of its own tasks fetches the j-th part (none when taking another thread's task)
        part = ahead[j * ahead.shape[0] // (s1 - s0):(j + 1) * ahead.shape[0] // (s1 - s0)] if q == 0 else ahead[:0]
        _delta_state_update(k, d, p_dt, dt_b, A, Dv, ssm_state, xz, xc, y, part)
        count += 1
        k, q = claim(sync, 2, n_ch, t, threads, q)
    finish(sync, 2, threads, count)
    wait(sync, 2, threads, n_ch)
    k, q = claim(sync, 3, n_out, t, threads, 0)
    count = 0
    while k < n_out:
        _out_proj_residual(k, y, p_out, b_out, o, r)
        count += 1
        k, q = claim(sync, 3, n_out, t, threads, q)
    finish(sync, 3, threads, count)
    wait(sync, 3, threads, n_out)  # the next layer's norm reads all of r


def _layers(r, norm_w, eps, panels, offsets, b_in, conv_wt, conv_b, conv_all, R, dt_b, A, Dv, ssm_all, b_out,
            hn, xz, xc, dbc, y, o, sync, threads, rms_eps, dbn):
    """All L layers of a step in one parallel region (`threads` iterations of a prange), a thread going through
    the layers one after the other (`_layer`); the phases' waits order them. The small weights come stacked
    by layer (norm_w (L, D), b_in (L, 2E or 0), conv_wt (L, W, E), conv_b, dt_b, Dv (L, E or 0), A (L, E, N),
    b_out (L, D or 0)), in_proj, x_proj, dt_proj and out_proj packed in one flat buffer, `panels`, layer i's four
    starting at offsets[i]; R the dt rank; the states as (L, b, E, W − 1) and (L, b, E, N); sync (L, …);
    rms_eps FalconMamba's mixer-norm epsilon (−1: plain Mamba) and dbn its per-thread scratch (`_layer`).

    Why one region for the step, not one a layer: with OMP_WAIT_POLICY=PASSIVE the second thread sleeps
    between regions, and each layer's region also cost a Python loop turn and a numba dispatch of 24 arguments,
    all from caches that the weight stream had just emptied (docs/engine.md).

    Why each thread norms r itself (into hn[t], (T, b, D)) instead of one thread for all: in_proj reads the
    whole normed input in every task, so with one copy the other thread read it from the first one's caches,
    a wait and a transfer a layer, slow where the two vCPUs do not share a cache. The norm is 2·b·D
    multiply-adds. It needs no wait: a thread's copy is read only by its own in_proj tasks, and r is next
    written in the out_proj phase, after every in_proj task is done; a thread that norms late, while r is being
    written, finds every in_proj task taken and never reads its copy. Not measurably faster, but one wait a
    layer less (docs/engine.md).
    """
    L, D = norm_w.shape
    E, N = A.shape[1], A.shape[2]
    n_in, n_dt, n_out = (2 * E + GROUP - 1) // GROUP, (E + GROUP - 1) // GROUP, (D + GROUP - 1) // GROUP
    n_x = (R + 2 * N + GROUP - 1) // GROUP
    s_in, s_x, s_dt, s_out = n_in * D * GROUP, n_x * E * GROUP, n_dt * R * GROUP, n_out * E * GROUP
    for t in prange(threads):  # one parallel region
        for i in range(L):
            at = offsets[i]
            p_in = panels[at:at + s_in].reshape((n_in, D, GROUP))
            at += s_in
            p_x = panels[at:at + s_x].reshape((n_x, E, GROUP))
            at += s_x
            p_dt = panels[at:at + s_dt].reshape((n_dt, R, GROUP))
            at += s_dt
            p_out = panels[at:at + s_out].reshape((n_out, E, GROUP))
            _layer(t, threads, r, norm_w[i], eps, p_in, b_in[i], conv_wt[i], conv_b[i], conv_all[i], p_x, p_dt,
                   dt_b[i], A[i], Dv[i], ssm_all[i], p_out, b_out[i], hn, xz, xc, dbc, y, o, sync[i], rms_eps, dbn)


def _layers_q(r, norm_w, eps, panels, offsets, qflat, sflat, qoffsets, G, b_in, conv_wt, conv_b, conv_all, R, dt_b,
              A, Dv, ssm_all, b_out, hn, xz, xc, dbc, y, o, sync, threads, rms_eps, dbn):
    """`_layers` for a quantized model (mambakit/quantize.py): in_proj and out_proj come quantized, layer i's at
    qoffsets[i] = (in_proj's byte, its scales' float, out_proj's byte, its scales' float) in qflat (int8, or
    uint8 for int4 with groups of G inputs) and sflat (engine/qpanels.py's layout), as (P, S) pairs that
    `_layer` reads through `qpanels.rows`; x_proj and dt_proj stay in `panels` (float), layer i's at offsets[i]."""
    L, D = norm_w.shape
    E, N = A.shape[1], A.shape[2]
    n_in, n_out = (2 * E + GROUP - 1) // GROUP, (D + GROUP - 1) // GROUP
    n_dt, n_x = (E + GROUP - 1) // GROUP, (R + 2 * N + GROUP - 1) // GROUP
    s_x, s_dt = n_x * E * GROUP, n_dt * R * GROUP
    for t in prange(threads):  # one parallel region
        for i in range(L):
            at = offsets[i]
            p_x = panels[at:at + s_x].reshape((n_x, E, GROUP))
            p_dt = panels[at + s_x:at + s_x + s_dt].reshape((n_dt, R, GROUP))
            p_in = qview(qflat, sflat, qoffsets[i, 0], qoffsets[i, 1], n_in, D, G)
            p_out = qview(qflat, sflat, qoffsets[i, 2], qoffsets[i, 3], n_out, E, G)
            _layer(t, threads, r, norm_w[i], eps, p_in, b_in[i], conv_wt[i], conv_b[i], conv_all[i], p_x, p_dt,
                   dt_b[i], A[i], Dv[i], ssm_all[i], p_out, b_out[i], hn, xz, xc, dbc, y, o, sync[i], rms_eps, dbn)


def _norm(r, norm_w, eps, hn):
    """hn = RMSNorm(r) (the pre-norm of the residual block), in float32. The sum of squares runs in 8 chains
    (j mod 8), added pairwise at the end: a fixed order that LLVM vectorises without fast-math (one chain would
    be a serial add a column); columns past a multiple of 8 go to the chains in turn."""
    b, D = r.shape
    ss8 = np.zeros(8, dtype=np.float32)
    for bb in range(b):
        ss8[:] = 0
        rb = r[bb]
        for j0 in range(0, D - 7, 8):
            for q in range(8):
                ss8[q] = fma(rb[j0 + q], rb[j0 + q], ss8[q])
        for j in range(D - D % 8, D):
            ss8[j % 8] = fma(rb[j], rb[j], ss8[j % 8])
        halve(ss8, 4), halve(ss8, 2), halve(ss8, 1)
        ss = ss8[0]
        scale = _F32(1.0) / np.sqrt(ss / _F32(D) + _F32(eps))
        for j in range(D):
            hn[bb, j] = r[bb, j] * scale * widen(norm_w[j])


def _mixer_norms(dbc, R, N, eps, out):
    """FalconMamba's weightless RMS norms (`Mamba.split_dbc`): out[:, :R] = Δ's input / rms, out[:, R : R + N] =
    B / rms, out[:, R + N : R + 2N] = C / rms, each over its own columns, in float32; the sums of squares in 8
    chains added pairwise (a fixed order, as `_norm`)."""
    b = dbc.shape[0]
    ss8 = np.zeros(8, dtype=np.float32)
    for bb in range(b):
        for part in range(3):  # Δ's input, B, C
            j0 = 0 if part == 0 else R + (part - 1) * N
            n = R if part == 0 else N
            ss8[:] = 0
            for j in range(n):
                ss8[j % 8] = fma(dbc[bb, j0 + j], dbc[bb, j0 + j], ss8[j % 8])
            halve(ss8, 4), halve(ss8, 2), halve(ss8, 1)
            scale = _F32(1.0) / np.sqrt(ss8[0] / _F32(n) + _F32(eps))
            for j in range(n):
                out[bb, j0 + j] = dbc[bb, j0 + j] * scale


# Why the phases below pass channel counts as arguments: each is called with the literal GROUP or ROWS when
# its channels fill a whole task (always, for the presets), and numba inlines it, so LLVM sees a constant trip
# count. With the bound computed at run time (min(E, …)) LLVM left the softplus, SiLU and state-update loops
# scalar (docs/engine.md). B and C are passed as views of their row for the same reason (indexed as
# dbc[bb, R + n], with R known only at run time, the phase was slower).
#
# `_views`: why the channel loops index views of a row's channels (y[bb, e0 : e0 + n][k]) and not the arrays
# (y[bb, e0 + k]). numba wraps negative indices around, and LLVM drops that check, and vectorises the loop,
# only where it can prove the index is not negative: the loop counter k can be, e0 + k cannot (e0 comes from a
# task number, and e0 + k could overflow as far as LLVM knows). With array indexing, the softplus and gating
# loops of the state update stayed scalar (docs/engine.md).


def _in_proj_task(k, hn, p_in, b_in, conv_wt, conv_b, conv_state, xz, xc):
    """in_proj for channels ROWS·k … ROWS·(k + 1) − 1: the panels of their x rows, then of their z rows (rows
    E + ROWS·k …), each with its conv and SiLUs. When E is not a multiple of GROUP, one panel holds the last x
    and the first z channels; it belongs to the task of its x channels, so each panel has one task."""
    E = conv_wt.shape[1]
    gx = (E + GROUP - 1) // GROUP  # panels with x channels
    for g in range(k * ROWS // GROUP, min((k + 1) * ROWS // GROUP, gx)):
        _in_proj_conv(g, hn, p_in, b_in, conv_wt, conv_b, conv_state, xz, xc)
    z0, z1 = (E + k * ROWS + GROUP - 1) // GROUP, (E + (k + 1) * ROWS + GROUP - 1) // GROUP  # z rows E + ROWS·k …
    for g in range(max(gx, z0), min(n_panels(p_in), z1)):
        _in_proj_conv(g, hn, p_in, b_in, conv_wt, conv_b, conv_state, xz, xc)


def _in_proj_conv(g, hn, p_in, b_in, conv_wt, conv_b, conv_state, xz, xc):
    """in_proj panel g (rows 32g … 32g + 31 of xz (b, 2E): x = xz[:, :E], z = xz[:, E:]), then the conv and
    SiLUs of the channels it has just produced (the conv is depthwise: channel e needs only x_e)."""
    E = conv_wt.shape[1]
    rows(p_in, g, hn, xz)
    r0, r1 = g * GROUP, min(2 * E, (g + 1) * GROUP)
    x1, z0 = min(r1, E), max(r0, E)  # x channels r0 … x1 − 1, z channels z0 … r1 − 1
    if x1 - r0 == GROUP:
        _x_channels(r0, GROUP, b_in, conv_wt, conv_b, conv_state, xz, xc)
    elif x1 > r0:
        _x_channels(r0, x1 - r0, b_in, conv_wt, conv_b, conv_state, xz, xc)
    if r1 - z0 == GROUP:
        _z_channels(z0, GROUP, b_in, xz)
    elif r1 > z0:
        _z_channels(z0, r1 - z0, b_in, xz)


def _x_channels(e0, n, b_in, conv_wt, conv_b, conv_state, xz, xc):
    """Channels e0 … e0 + n − 1 of x: in_proj's bias, then the causal depthwise conv over the last W inputs
    (the state holds W − 1 of them; it shifts by one) and SiLU, into xc. conv_wt (W, E): the conv weight
    transposed. For W = 4 (every preset) the conv of whole blocks of 16 channels is `_conv16`'s vector code,
    the loop here does the rest."""
    b = xz.shape[0]
    K = conv_wt.shape[0]  # the conv width W
    has_b_in, has_cb = b_in.shape[0] > 0, conv_b.shape[0] > 0
    bi, cw = b_in[e0:e0 + n] if has_b_in else b_in, conv_wt[:, e0:e0 + n]  # (n,), (W, n): see `_views`
    cb = conv_b[e0:e0 + n] if has_cb else conv_b
    v = n // 16 * 16 if K == 4 else 0  # channels e0 … e0 + v − 1 go to `_conv16`
    for bb in range(b):
        xv, cs, out = xz[bb, e0:e0 + n], conv_state[bb, e0:e0 + n], xc[bb, e0:e0 + n]  # (n,), (n, W − 1), (n,)
        if has_b_in:  # in place: xz's x half is read only here
            for k in range(n):  # vectorised over channels
                xv[k] = xv[k] + widen(bi[k])
        _conv16(conv_state, conv_wt, xz, xc, bb, e0, v)
        for k in range(v, n):
            acc = widen(cw[K - 1, k]) * xv[k]
            for t in range(K - 1):
                acc += widen(cw[t, k]) * widen(cs[k, t])
            for t in range(K - 2):
                cs[k, t] = cs[k, t + 1]
            cs[k, K - 2] = narrow(xv[k], cs)
            out[k] = acc
        for k in range(n):  # vectorised over channels: the conv's bias and SiLU
            acc = out[k] + widen(cb[k]) if has_cb else out[k]
            out[k] = acc * sigmoid(acc)


def _z_channels(e0, n, b_in, xz):
    """Channels e0 … e0 + n − 1 of xz (in z, the gate): in_proj's bias, then SiLU, in place."""
    b = xz.shape[0]
    has_b_in = b_in.shape[0] > 0
    bi = b_in[e0:e0 + n] if has_b_in else b_in
    for bb in range(b):
        zv = xz[bb, e0:e0 + n]
        for k in range(n):
            ze = zv[k] + widen(bi[k]) if has_b_in else zv[k]
            zv[k] = ze * sigmoid(ze)


def _delta_state_update(blk, dbc, p_dt, dt_b, A, Dv, ssm_state, xz, xc, y, ahead):
    """Channels ROWS·blk …: Δ = softplus(dt_proj(dbc[:, :R]) + dt_bias) (into y), then the selective state
    update (Section 3.2 discretisation) h ← exp(ΔA) h + Δ B x; y = C·h + D x, gated by SiLU(z). `ahead`: a
    flat view of out_proj weights to prefetch meanwhile (`_channels`), or empty."""
    E, N = A.shape
    e0, e1 = blk * ROWS, min(E, (blk + 1) * ROWS)
    for g in range(e0 // GROUP, (e1 + GROUP - 1) // GROUP):
        panel_rows(p_dt, g, dbc, y)  # (b, E) = dbc[:, :R] · w_dtᵀ (the kernel reads R of each dbc row)
    if e1 - e0 == ROWS:
        _channels(e0, ROWS, dbc, p_dt.shape[1], dt_b, A, Dv, ssm_state, xz, xc, y, ahead)
    else:
        _channels(e0, e1 - e0, dbc, p_dt.shape[1], dt_b, A, Dv, ssm_state, xz, xc, y, ahead)


def _channels(e0, n, dbc, R, dt_b, A, Dv, ssm_state, xz, xc, y, ahead):
    """The state update of channels e0 … e0 + n − 1 (N states each), Δ's pre-activation already in y; meanwhile
    (N = 16, `_channels16`) AHEAD_LINES cache lines of `ahead` (weights the thread reads next) are prefetched per
    channel and row, and the states STATE_AHEAD channels on."""
    b = dbc.shape[0]
    E, N = A.shape
    has_dt_b = dt_b.shape[0] > 0
    for bb in range(b):
        yv, bv = y[bb, e0:e0 + n], dt_b[e0:e0 + n] if has_dt_b else dt_b  # (n,) views: see `_views`
        for k in range(n):  # vectorised over channels
            yv[k] = softplus(yv[k] + widen(bv[k]) if has_dt_b else yv[k])
    line = 64 // ahead.itemsize  # elements of `ahead` a cache line
    per = min(AHEAD_LINES, (ahead.shape[0] // line + b * n - 1) // (b * n))  # lines to fetch a channel
    for bb in range(b):
        if N == 16:  # y[bb, e]: Δ → C·h
            _channels16(ssm_state, A, dbc, R, y, xc, bb, e0, n, ahead, bb * n * per * line, per)
        else:
            Bv, Cv = dbc[bb, R:R + N], dbc[bb, R + N:R + 2 * N]  # (N,) each
            for k in range(n):
                e = e0 + k
                y[bb, e] = _channel(ssm_state, Bv, Cv, A, bb, e, y[bb, e], y[bb, e] * xc[bb, e])
        yv, dv, xv, zv = y[bb, e0:e0 + n], Dv[e0:e0 + n], xc[bb, e0:e0 + n], xz[bb, E + e0:E + e0 + n]
        for k in range(n):  # vectorised over channels: y = C·h + D x, gated by SiLU(z) (in xz already)
            yv[k] = (yv[k] + widen(dv[k]) * xv[k]) * zv[k]


def _out_proj_residual(g, y, p_out, b_out, o, r):
    """r += out_proj(y) for the residual stream's columns 32g … 32g + 31 (out_proj panel g)."""
    D = r.shape[1]
    rows(p_out, g, y, o)
    j0, j1 = g * GROUP, min(D, (g + 1) * GROUP)
    if j1 - j0 == GROUP:
        _residual(j0, GROUP, o, b_out, r)
    else:
        _residual(j0, j1 - j0, o, b_out, r)


def _residual(j0, n, o, b_out, r):
    """r[:, j0 : j0 + n] += o (+ out_proj's bias)."""
    has_b_out = b_out.shape[0] > 0
    bo = b_out[j0:j0 + n] if has_b_out else b_out
    for bb in range(r.shape[0]):
        rv, ov = r[bb, j0:j0 + n], o[bb, j0:j0 + n]  # (n,) views: see `_views`
        for k in range(n):
            rv[k] += ov[k] + widen(bo[k]) if has_b_out else ov[k]


_layer = njit(inline="always", **kernel_options(parallel=False))(_layer)
_norm = njit(inline="always", **kernel_options(parallel=False))(_norm)
_mixer_norms = njit(inline="always", **kernel_options(parallel=False))(_mixer_norms)
_in_proj_task = njit(inline="always", **kernel_options(parallel=False))(_in_proj_task)
_in_proj_conv = njit(inline="always", **kernel_options(parallel=False))(_in_proj_conv)
_delta_state_update = njit(inline="always", **kernel_options(parallel=False))(_delta_state_update)
_out_proj_residual = njit(inline="always", **kernel_options(parallel=False))(_out_proj_residual)
_x_channels = njit(inline="always", **kernel_options(parallel=False))(_x_channels)
_z_channels = njit(inline="always", **kernel_options(parallel=False))(_z_channels)
_channels = njit(inline="always", **kernel_options(parallel=False))(_channels)
_residual = njit(inline="always", **kernel_options(parallel=False))(_residual)


# parallel over torch's thread count, or serial for one thread (a parallel launch wakes pool threads)
_LAYERS = {
    True: njit(**kernel_options(parallel=True))(_layers),
    False: njit(**kernel_options(parallel=False))(renamed(_layers, "_serial")),
}
_LAYERS_Q = {
    True: njit(**kernel_options(parallel=True))(_layers_q),
    False: njit(**kernel_options(parallel=False))(renamed(_layers_q, "_serial")),
}


def _np(t: Tensor) -> np.ndarray:
    """A tensor's memory as a numpy array: float32 as is, bfloat16 as its 16 bits (int16), read by `widen`."""
    t = t.detach()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


_EMPTY = np.zeros(0, np.float32)


class _Head:
    """What the checks read of the LM head: a tensor that identifies its weight, the compute dtype, device and
    rows; for a quantized head (mambakit/quantize.py) its int weight, not `.weight` (a dequantised copy)."""

    def __init__(self, model):
        head = model.lm_head
        self.quantized = hasattr(head, "qweight")
        self.tensor = head.qweight if self.quantized else head.weight
        self.dtype = head.dtype if self.quantized else head.weight.dtype
        self.device, self.rows = self.tensor.device, head.out_features


def _quantization_problem(model) -> str | None:
    """Why the fused step cannot read this quantized model's modules (None when it can, or it is not quantized)."""
    if not hasattr(model.lm_head, "qweight"):
        return None
    from ..quantize import QuantizedLinear

    mods = [layer.mixer.in_proj for layer in model.backbone.layers] + [
        layer.mixer.out_proj for layer in model.backbone.layers] + [model.lm_head]
    if not all(isinstance(m, QuantizedLinear) for m in mods):
        return "a partly quantized model (in_proj, out_proj and the head must all be quantized)"
    if len({(m.bits, m.group_size) for m in mods}) != 1:
        return "quantized modules of different bit widths or group sizes"
    return None


def unsupported(model) -> str | None:
    """Why the fused step cannot run this model (None when it can): it covers CPU MambaLMs in float32 or bfloat16
    with RMSNorm, a float32 residual stream (or float32 weights) and plain Mamba mixers (not subclasses such as
    the S4D baseline, whose SSM differs)."""
    if not isinstance(model, MambaLM):
        return f"not a MambaLM ({type(model).__name__})"
    c = model.config
    w = _Head(model)
    if w.device.type != "cpu":
        return f"weights on {w.device.type}, not the CPU"
    if w.dtype not in MAX_BATCH:
        return f"weights in {w.dtype}; the fused step covers float32 and bfloat16"
    if not c.rms_norm:
        return "LayerNorm model (rms_norm=False)"
    if c.attn_layer_idx or c.d_intermediate:
        return "a hybrid (attention layers or MLPs)"
    if not (c.residual_in_fp32 or w.dtype == torch.float32):
        return "a bfloat16 residual stream (residual_in_fp32=False)"
    other = {type(layer.mixer).__name__ for layer in model.backbone.layers if type(layer.mixer) is not Mamba}
    if other:
        return f"mixers other than Mamba ({', '.join(sorted(other))})"
    if any(p.dtype not in MAX_BATCH or p.device.type != "cpu" for p in model.parameters()):
        return "parameters of other dtypes or devices than the head's"
    return _quantization_problem(model)


def _layer_view(t: Tensor, b: int) -> Tensor | None:
    """The state tensor t (L, b, E, K) as the kernel reads it: a C-contiguous (L, M, E, K) tensor, M ≥ b, of
    which rows < b are t. t itself when contiguous; for the first b rows of a larger contiguous pool (the
    server's `pool[:, :b]`) the pool's layers, rows ≥ b untouched (the kernel writes rows < b only). None for
    any other layout."""
    if t.is_contiguous():
        return t
    L, _, E, K = t.shape
    inner = E * K
    s = t.stride()
    if s[1:] != (inner, K, 1) or s[0] % inner or s[0] < b * inner:
        return None
    M = s[0] // inner
    if t.storage_offset() + L * s[0] > t.untyped_storage().nbytes() // t.element_size():
        return None  # the pool's rows after the last layer's b-th are not all in memory
    return t.as_strided((L, M, E, K), (s[0], inner, K, 1))


class FusedDecoder:
    """`MambaLM.step` for CPU decoding as one compiled call for all layers (see the module docstring), applied to
    a model from outside: it owns a packed copy of the model's weights (about their size again), built on the
    first step and rebuilt when a weight changes; `release()` frees it.

        decoder = FusedDecoder(model)             # ValueError naming the reason if the model is not covered
        logits = decoder.step(input_ids, state)   # (b, V); state updated in place, as MambaLM.step
        decoder.supports(input_ids, state)        # None, or why this batch must take MambaLM.step instead

    The decoder holds the model weakly (a cache of decoders keyed by model frees them with the model)."""

    def __init__(self, model: MambaLM):
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"FusedDecoder: the fused decode step does not cover this model: {why}")
        self._model = weakref.ref(model)
        self._packed = None  # (checks, (weights, packed head)): see `_weights`
        self._checked = None  # (key, reason): `unsupported` for the model as it was at key

    @property
    def model(self) -> MambaLM:
        model = self._model()
        if model is None:
            raise RuntimeError("FusedDecoder: its model has been freed")
        return model

    def release(self) -> None:
        """Frees the packed copy of the weights; the next step builds it again."""
        self._packed = None

    def supports(self, input_ids: Tensor, state: MambaState) -> str | None:
        """Why `step` cannot take this batch (None when it can). The per-model part is cached under a key that
        changes when the weights are replaced or converted (walking every parameter each step would cost a
        noticeable part of a step: docs/engine.md)."""
        model = self.model
        w, layers = _Head(model), model.backbone.layers
        first, last = layers[0].mixer.in_proj, layers[-1].mixer.out_proj
        key = (id(w.tensor), w.dtype, w.device, id(getattr(first, "qweight", None) if w.quantized else first.weight),
               id(getattr(last, "qweight", None) if w.quantized else last.weight))
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
        if _layer_view(state.conv, b) is None or _layer_view(state.ssm, b) is None:
            return "state layout: neither contiguous nor the first rows of a contiguous pool"
        return None

    def _weights(self, model: MambaLM) -> tuple[tuple, np.ndarray]:
        """The kernel's weight arguments (`_layers`: the small weights stacked by layer, in_proj, dt_proj and
        out_proj packed as 32-row panels in one flat buffer with each layer's offset), and the LM head packed.
        All are copies (`panels.pack_flat`), reused for as long as every module and parameter they came from is
        still in place, at the same address and version (checked each step by dict lookups, a small part of a
        step: docs/engine.md): an optimizer step or load_state_dict bumps the parameters' versions and so rebuilds
        them; replacing a parameter, a module or a tensor's .data rebuilds them too. (In-place writes through
        `.data` are invisible to torch's version counter, and so to this check.)"""
        cached = self._packed
        if cached is not None and all(d.get(k) is v and (p is None or (v.data_ptr(), v._version) == p)
                                      for d, k, v, p in cached[0]):
            return cached[1]
        self._packed = None  # free the old packed copy before building the new one
        checks = []

        def watch(module, kind: str, name: str):  # module._modules[name] or ._parameters[name], recorded
            d = getattr(module, kind)
            v = d[name]
            checks.append((d, name, v, (v.data_ptr(), v._version) if isinstance(v, Tensor) else None))
            return v

        layers = watch(watch(model, "_modules", "backbone"), "_modules", "layers")
        small = {k: [] for k in ("norm_w", "b_in", "conv_w", "conv_b", "dt_b", "A", "Dv", "b_out")}
        packed, qmods, quantized = [], [], _Head(model).quantized
        for i in range(len(layers)):
            layer = watch(layers, "_modules", str(i))
            norm, m = watch(layer, "_modules", "norm"), watch(layer, "_modules", "mixer")
            in_proj, conv, x_proj, dt_proj, out_proj = (
                watch(m, "_modules", k) for k in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"))

            def p(module, name):
                t = watch(module, "_parameters", name)
                return None if t is None else t.detach()

            for k, t in (("norm_w", p(norm, "weight")), ("b_in", p(in_proj, "bias")),
                         ("conv_w", p(conv, "weight").reshape(-1, conv.weight.shape[-1]).t()),  # (W, E): `_conv16`
                         ("conv_b", p(conv, "bias")),
                         ("dt_b", p(dt_proj, "bias")),
                         ("A", -torch.exp(p(m, "A_log").float())), ("Dv", p(m, "D")), ("b_out", p(out_proj, "bias"))):
                small[k].append(t)
            if quantized:  # in_proj, out_proj quantized (their q and s watched), x_proj, dt_proj float
                for module in (in_proj, out_proj):
                    watch(module, "_buffers", "qweight"), watch(module, "_buffers", "scales")
                qmods += [in_proj, out_proj]
                packed += [watch(module, "_parameters", "weight") for module in (x_proj, dt_proj)]
            else:
                packed += [watch(module, "_parameters", "weight") for module in (in_proj, x_proj, dt_proj, out_proj)]
        head = watch(model, "_modules", "lm_head")
        if quantized:
            watch(head, "_buffers", "qweight"), watch(head, "_buffers", "scales")
            return self._weights_quantized(checks, layers, small, packed, qmods + [head])
        packed.append(watch(head, "_parameters", "weight"))
        # one buffer in the order a step reads them: layer 0's in_proj, x_proj, dt_proj, out_proj, layer 1's, …, the head
        flat, offsets = panels.pack_flat([t.detach() for t in packed])
        stacked = {k: _EMPTY.reshape(len(layers), 0) if v[0] is None else _np(torch.stack(v)) for k, v in small.items()}
        args = (stacked["norm_w"], float(layers[0].norm.eps), flat, np.array(offsets[0:-1:4], np.int64),
                *(stacked[k] for k in ("b_in", "conv_w", "conv_b", "dt_b", "A", "Dv", "b_out")))
        result = (args, panels.panels_at(flat, offsets[-1], packed[-1]))
        self._packed = (checks, result)
        return result

    def _weights_quantized(self, checks, layers, small, packed, qmods) -> tuple[tuple, tuple]:
        """`_weights` for a quantized model: the arguments of `_layers_q` (x_proj and dt_proj packed as float
        panels, `packed`; in_proj, out_proj of every layer and then the head as quantized panels, `qmods`,
        engine/qpanels.py) and the head's (P, S)."""
        flat, offsets = panels.pack_flat([t.detach() for t in packed])
        qflat, sflat, qoffsets = qpanels.pack_flat(qmods)
        if qmods[0].bits == 8:
            qflat = qflat.view(np.int8)
        stacked = {k: _EMPTY.reshape(len(layers), 0) if v[0] is None else _np(torch.stack(v)) for k, v in small.items()}
        per_layer = np.array([[*qoffsets[2 * i], *qoffsets[2 * i + 1]] for i in range(len(layers))], np.int64)
        args = (stacked["norm_w"], float(layers[0].norm.eps), flat, np.array(offsets[0::2], np.int64), qflat, sflat,
                per_layer, int(qmods[0].group_size or 0),
                *(stacked[k] for k in ("b_in", "conv_w", "conv_b", "dt_b", "A", "Dv", "b_out")))
        result = (args, qpanels.qpanels_at(qflat.view(np.uint8), sflat, qoffsets[-1], qmods[-1]))
        self._packed = (checks, result)
        return result

    @torch.no_grad()
    def step(self, input_ids: Tensor, state: MambaState) -> Tensor:
        """`MambaLM.step` fused: input_ids (b,) → logits (b, V) in the model's dtype; state updated in place.
        Checks everything the kernel relies on first (the state's shapes against the model, dtypes, layout):
        ValueError naming what does not fit."""
        model = self.model
        model.check_step_inputs(input_ids, state)  # shapes against the model: the kernel does not bounds-check
        why = self.supports(input_ids, state)
        if why is not None:
            raise ValueError(f"FusedDecoder.step: the fused step cannot take this batch of {input_ids.shape[0]}: {why}")
        c = model.config
        b = input_ids.shape[0]
        E, N, R = c.d_inner, c.d_state, c.dt_rank
        weights, p_head = self._weights(model)
        conv, ssm = _layer_view(state.conv, b), _layer_view(state.ssm, b)  # (L, M ≥ b, E, W − 1), (L, M, E, N)
        r = model.backbone.embedding(input_ids).float().contiguous()  # (b, D) the residual stream, float32
        parallel = torch.get_num_threads() > 1
        if parallel:
            set_threads()
        threads = numba.get_num_threads() if parallel else 1
        hn, xz, xc, dbc, y, o, dbn, sync = _scratch(threads, b, c.d_model, E, R, N, c.n_layer)
        h_rows = model.lm_head.out_features
        rms_eps = -1.0 if c.mixer_rms_eps is None else float(c.mixer_rms_eps)  # FalconMamba's mixer norms
        if isinstance(p_head, tuple):  # a quantized model (mambakit/quantize.py): `_layers_q`, qpanels' head
            norm_w, eps, flat, offsets, qflat, sflat, qoffsets, G, b_in, conv_w, conv_b, dt_b, A, Dv, b_out = weights
            _LAYERS_Q[parallel](r.numpy(), norm_w, eps, flat, offsets, qflat, sflat, qoffsets, G, b_in, conv_w,
                                conv_b, _np(conv), R, dt_b, A, Dv, ssm.numpy(), b_out, hn, xz, xc, dbc, y, o, sync,
                                threads, rms_eps, dbn)
            h = model.backbone.norm_f(r)  # (b, D)
            return qpanels.linear(h, p_head, h_rows).to(h.dtype)  # (b, V), as MambaLM.step
        norm_w, eps, flat, offsets, b_in, conv_w, conv_b, dt_b, A, Dv, b_out = weights
        _LAYERS[parallel](r.numpy(), norm_w, eps, flat, offsets, b_in, conv_w, conv_b, _np(conv), R, dt_b, A,
                          Dv, ssm.numpy(), b_out, hn, xz, xc, dbc, y, o, sync, threads, rms_eps, dbn)
        h = model.backbone.norm_f(r)  # (b, D)
        return panels.linear(h, p_head, h_rows).to(h.dtype)  # (b, V), as MambaLM.step


_SCRATCH = threading.local()  # a thread's float32 scratch buffer and task counters, reused across steps


def _scratch(threads: int, b: int, D: int, E: int, R: int, N: int, L: int) -> tuple[np.ndarray, ...]:
    """The step's scratch arrays (`_layer`: hn (T, b, D), a normed input a thread; xz (b, 2E), y (b, E), o (b, D),
    the outputs of packed matrices, whole panels wide (`panels.padded`); xc (b, E); dbc (b, R + 2N), x_proj's
    output, whole panels wide too; dbn (T, b, R + 2N) a thread's FalconMamba-normed copy of it) as views
    of one float32 buffer, and the layers' task counters (L, sync_size), zeroed (ops/cpu/tasks.py).

    Reused from step to step (no allocation per step). Every scratch element is written before it is read
    within a step, so no step sees another's values. The buffer belongs to the calling Python thread
    (`threading.local`), so concurrent steps from two threads never share it; it grows to the largest batch
    seen and is carved into C-contiguous views for smaller ones (a server's batch changes from step to step)."""
    P = panels.padded
    shapes = ((threads, b, D), (b, P(2 * E)), (b, E), (b, P(R + 2 * N)), (b, P(E)), (b, P(D)),
              (threads, b, P(R + 2 * N)))
    sizes = [-(-int(np.prod(s)) // 16) * 16 for s in shapes]  # each view starts on a cache line
    n_sync = sync_size(PHASES, threads)
    buf, sync = getattr(_SCRATCH, "buf", None), getattr(_SCRATCH, "sync", None)
    if buf is None or buf.shape[0] < sum(sizes):
        raw = np.empty(sum(sizes) + 16, np.float32)
        skip = (-raw.ctypes.data % 64) // 4
        buf = _SCRATCH.buf = raw[skip:skip + sum(sizes)]
    if sync is None or sync.shape[0] < L * n_sync:
        sync = _SCRATCH.sync = np.empty(L * n_sync, np.int64)
    views, at = [], 0
    for shape, size in zip(shapes, sizes):
        views.append(buf[at:at + int(np.prod(shape))].reshape(shape))
        at += size
    counters = sync[:L * n_sync].reshape(L, n_sync)
    counters.fill(0)
    return (*views, counters)
