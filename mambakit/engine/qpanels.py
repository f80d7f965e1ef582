"""Quantized weights (mambakit/quantize.py's int8 and int4) packed in 32-row panels, and the multiply that streams
them for decoding: y (b, o) = x (b, i) · Wᵀ with W = q · s dequantised in registers.

Why: a decode step's time is its weight bytes over the memory bandwidth (panels.py); int8 weights are half the
bytes of bfloat16 and int4 a quarter. The layout is panels.py's, P[g, j, k] = q[32g + k, j], so a panel is read
front to back and each weight load is shared by the batch's rows:
- int8: P (og, i, 32) int8, S (og, 32) float32 (the rows' scales). Per input column j: 32 bytes, widened to two
  16-lane float32 vectors (sign-extend, convert: exact), x[bb, j] · them added into 2 × B accumulators; the
  scales multiply the sums once at the end (a per-row scale factors out of the row's sum).
- int4: P (og, i, 16) uint8, byte k of column j holding row k's value + 8 in its low nibble and row 16 + k's
  in its high one; S (og, i/G, 32) float32, one scale per row and group of G inputs. Per group the partial
  sums start at zero and are added to the totals times the group's scales (one fma per vector a group).
Why widening and not AVX-512 VNNI (`vpdpbusd`, int8 · uint8 dot products): VNNI needs the activations
quantised too (a second rounding the reference twin does not have, and the prefill path would not share), and
at batch 1 the stream, not the arithmetic, sets the time (docs/engine.md has the measurements).

Numerics: each output is s · (one fma chain over j in order) for int8, and Σ_groups fma(partial, s_group, total)
in group order for int4, whatever the batch; a row's result never depends on the other rows. The reference twin
is `QuantizedLinear.forward` (dequantise, F.linear); they differ only in rounding order (the twin rounds each
q · s product, the kernel sums q-weighted activations first), bounded in tests/test_quant_kernels.py.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload
from torch import Tensor

from . import hugepages
from .panels import GROUP, LANES, panel_rows, renamed
from ..ops.cpu.primitives import kernel_options, set_threads, vector_fn
from ..quantize import unpack_int4

MAX_ROWS = {8: 8, 4: 4}  # batch rows a pass: int4 keeps partial sums and totals, 4 × B vector registers


def _carried_loop(builder, n, values, body, name):
    """for j in range(n): values = body(j, values), values LLVM vectors carried in registers (phis); returns the
    final values (the initial ones when n ≤ 0)."""
    i64 = ir.IntType(64)
    start = builder.block
    loop, done = builder.append_basic_block(f"{name}_body"), builder.append_basic_block(f"{name}_done")
    builder.cbranch(builder.icmp_signed(">", n, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    j = builder.phi(i64)
    j.add_incoming(ir.Constant(i64, 0), start)
    phis = [builder.phi(v.type) for v in values]
    for p, v in zip(phis, values):
        p.add_incoming(v, start)
    new = body(j, phis)
    end = builder.block
    j_next = builder.add(j, ir.Constant(i64, 1))
    j.add_incoming(j_next, end)
    for p, v in zip(phis, new):
        p.add_incoming(v, end)
    builder.cbranch(builder.icmp_signed("<", j_next, n), loop, done)
    builder.position_at_end(done)
    out = []
    for v0, v in zip(values, new):
        r = builder.phi(v0.type)
        r.add_incoming(v0, start)
        r.add_incoming(v, end)
        out.append(r)
    return out


def _qpanel_kernel(B: int):
    """An intrinsic `k(P, S, g, x, b0, out)`: out[b0 + bb, 32g + k] = Σ_j x[b0 + bb, j] · W[32g + k, j] for
    bb < B, k < 32, W the dequantised panel g: P int8 (og, i, 32) with S (og, 32), or P uint8 (og, i, 16) with
    S (og, i/G, 32); x (b, ≥ i) and out (b, ≥ 32·og) float32; all C-contiguous. No bounds checks: the caller
    guarantees the shapes."""

    @intrinsic
    def kernel(typingctx, P, S, g, x, b0, out):
        if not (isinstance(P, types.Array) and P.layout == "C" and P.ndim == 3 and P.dtype in (types.int8, types.uint8)):
            return None
        int4 = P.dtype == types.uint8
        if not (isinstance(S, types.Array) and S.layout == "C" and S.dtype == types.float32
                and S.ndim == (3 if int4 else 2)):
            return None
        for a in (x, out):
            if not (isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" and a.dtype == types.float32):
                return None
        if not (isinstance(g, types.Integer) and isinstance(b0, types.Integer)):
            return None
        sig = types.void(P, S, g, x, b0, out)

        def codegen(context, builder, signature, args):
            i8, i32, i64, f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
            vec, i32v, b16 = ir.VectorType(f32, LANES), ir.VectorType(i32, LANES), ir.VectorType(i8, LANES)
            Pa, Sa, xa, oa = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 1, 3, 5))
            gv = context.cast(builder, args[2], signature.args[2], types.int64)
            b0v = context.cast(builder, args[4], signature.args[4], types.int64)
            n_in = builder.extract_value(Pa.shape, 1)  # i
            x_stride = builder.extract_value(xa.shape, 1)
            n_out = builder.extract_value(oa.shape, 1)
            fma = vector_fn(builder, "fma", vec, 3)
            width = LANES if int4 else GROUP  # bytes a column of a panel

            def c(v):
                return ir.Constant(i64, v)

            def splat_x(bb, j):
                row = builder.add(b0v, c(bb))
                xs = builder.load(builder.gep(xa.data, [builder.add(builder.mul(row, x_stride), j)]))
                xv = builder.insert_element(ir.Constant(vec, ir.Undefined), xs, ir.Constant(i32, 0))
                return builder.shuffle_vector(xv, ir.Constant(vec, ir.Undefined), ir.Constant(i32v, [0] * LANES))

            def weights(j):  # column j of panel g as two float32 vectors (rows 0 … 15, 16 … 31)
                at = builder.add(builder.mul(gv, builder.mul(n_in, c(width))), builder.mul(j, c(width)))
                ptr = builder.gep(Pa.data, [at])
                if not int4:
                    return [builder.sitofp(builder.sext(builder.load(builder.bitcast(
                        builder.gep(ptr, [c(LANES * h)]), b16.as_pointer()), align=1), i32v), vec) for h in range(2)]
                v = builder.load(builder.bitcast(ptr, b16.as_pointer()), align=1)
                lo = builder.and_(v, ir.Constant(b16, [15] * LANES))
                hi = builder.lshr(v, ir.Constant(b16, [4] * LANES))
                eight = ir.Constant(i32v, [8] * LANES)
                return [builder.sitofp(builder.sub(builder.zext(h, i32v), eight), vec) for h in (lo, hi)]

            def column(j, acc):  # acc[2bb + h] += x[bb, j] · W column j, rows 16h …
                w = weights(j)
                new = []
                for bb in range(B):
                    xv = splat_x(bb, j)
                    new += [builder.call(fma, [xv, w[h], acc[2 * bb + h]]) for h in range(2)]
                return new

            zero = ir.Constant(vec, [0.0] * LANES)
            zeros = [zero] * (2 * B)

            def scales(at):  # S's 32 floats from element `at`, as two vectors
                return [builder.load(builder.bitcast(builder.gep(Sa.data, [builder.add(at, c(LANES * h))]),
                                                     vec.as_pointer()), align=4) for h in range(2)]

            if not int4:
                acc = _carried_loop(builder, n_in, zeros, column, "qcol")
                s = scales(builder.mul(gv, c(GROUP)))
                res = [builder.fmul(acc[2 * bb + h], s[h]) for bb in range(B) for h in range(2)]
            else:
                n_groups = builder.extract_value(Sa.shape, 1)
                G = builder.sdiv(n_in, n_groups)

                def group(k, tot):
                    j0 = builder.mul(k, G)
                    part = _carried_loop(builder, G, zeros, lambda j, acc: column(builder.add(j0, j), acc), "qgrp")
                    s = scales(builder.mul(builder.add(builder.mul(gv, n_groups), k), c(GROUP)))
                    return [builder.call(fma, [part[2 * bb + h], s[h], tot[2 * bb + h]])
                            for bb in range(B) for h in range(2)]

                res = _carried_loop(builder, n_groups, zeros, group, "qgroups")
            for bb in range(B):
                row = builder.add(b0v, c(bb))
                for h in range(2):
                    at = builder.add(builder.mul(row, n_out), builder.add(builder.mul(gv, c(GROUP)), c(LANES * h)))
                    builder.store(res[2 * bb + h], builder.bitcast(builder.gep(oa.data, [at]), vec.as_pointer()),
                                  align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


_Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _Q8 = (_qpanel_kernel(B) for B in range(1, 9))


def qpanel_rows(P, S, g, x, out):
    """out[:, 32g : 32g + 32] = x · (dequantised panel g)ᵀ for every row of x, MAX_ROWS rows a pass (int8: 8,
    int4: 4; the panel's later passes come from cache)."""
    b = x.shape[0]
    step = 8 if S.ndim == 2 else 4
    for b0 in range(0, b, step):
        n = min(step, b - b0)
        if n == 8:
            _Q8(P, S, g, x, b0, out)
        elif n == 1:
            _Q1(P, S, g, x, b0, out)
        elif n == 2:
            _Q2(P, S, g, x, b0, out)
        elif n == 3:
            _Q3(P, S, g, x, b0, out)
        elif n == 4:
            _Q4(P, S, g, x, b0, out)
        elif n == 5:
            _Q5(P, S, g, x, b0, out)
        elif n == 6:
            _Q6(P, S, g, x, b0, out)
        else:
            _Q7(P, S, g, x, b0, out)


qpanel_rows = njit(inline="always", **kernel_options(parallel=False))(qpanel_rows)


def _linear_qpanels(x, P, S, out):
    """out (b, 32·og) = x (b, i) · Wᵀ over all panels, split between the threads."""
    for g in prange(P.shape[0]):
        qpanel_rows(P, S, g, x, out)


_LINEAR = {
    True: njit(**kernel_options(parallel=True))(_linear_qpanels),
    False: njit(**kernel_options(parallel=False))(renamed(_linear_qpanels, "_serial")),
}


def padded(o: int) -> int:
    return -(-o // GROUP) * GROUP


def _panel_sizes(module) -> tuple[int, int]:
    """(bytes of P, floats of S) of a quantized module packed."""
    o, i = module.out_features, module.in_features
    og = padded(o) // GROUP
    if module.bits == 8:
        return og * i * GROUP, og * GROUP
    return og * i * LANES, og * (i // module.group_size) * GROUP


def _pack_module(module, p: Tensor, s: Tensor) -> None:
    """Packs module's q into p (uint8, flat, _panel_sizes bytes) and its scales into s (float32, flat)."""
    o, i = module.out_features, module.in_features
    og = padded(o) // GROUP
    with torch.no_grad():
        if module.bits == 8:
            q = torch.zeros(og * GROUP, i, dtype=torch.int8)
            q[:o] = module.qweight
            p.view(torch.int8).view(og, i, GROUP).copy_(q.view(og, GROUP, i).transpose(1, 2))  # (og, i, 32)
            sc = torch.zeros(og * GROUP, dtype=torch.float32)
            sc[:o] = module.scales
            s.copy_(sc)
            return
        v = torch.zeros(og * GROUP, i, dtype=torch.int16)  # values + 8 (padded rows: 0 + 8)
        v[:] = 8
        v[:o] = unpack_int4(module.qweight).to(torch.int16) + 8
        v = v.view(og, 2, LANES, i)  # (og, half, k, i): row 32g + 16·half + k
        byte = (v[:, 0] | (v[:, 1] << 4)).to(torch.uint8)  # (og, 16, i)
        p.view(og, i, LANES).copy_(byte.transpose(1, 2))
        n_groups = i // module.group_size
        sc = torch.zeros(og * GROUP, n_groups, dtype=torch.float32)
        sc[:o] = module.scales
        s.view(og, n_groups, GROUP).copy_(sc.view(og, GROUP, n_groups).transpose(1, 2))


def pack_flat(modules: list) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Quantized modules (QuantizedLinear/QuantizedEmbedding, one bit width) packed into one byte buffer (2 MiB
    pages where the machine has them), in the order given, and their scales into one float32 buffer. Returns
    (bytes, scales, [(byte offset, scale offset)] per module); `qpanels_at` gives a module's arrays."""
    bits = {m.bits for m in modules}
    if len(bits) != 1:
        raise ValueError(f"qpanels.pack_flat: modules of one buffer share a bit width, got {sorted(bits)}")
    sizes = [_panel_sizes(m) for m in modules]
    nbytes = sum(n for n, _ in sizes)
    buf = None
    if hugepages.supported()[0] and nbytes >= hugepages.MIN_BYTES:
        try:
            with torch.inference_mode(False):
                buf = hugepages.huge_page_arena(nbytes).view(torch.uint8)[:nbytes]
        except OSError:
            buf = None
    if buf is None:
        buf = torch.empty(nbytes, dtype=torch.uint8)
    sbuf = torch.empty(max(1, sum(n for _, n in sizes)), dtype=torch.float32)
    offsets, at, sat = [], 0, 0
    for m, (n, ns) in zip(modules, sizes):
        _pack_module(m, buf[at:at + n], sbuf[sat:sat + ns])
        offsets.append((at, sat))
        at, sat = at + n, sat + ns
    return buf.numpy(), sbuf.numpy(), offsets


def qpanels_at(flat: np.ndarray, sflat: np.ndarray, offset: tuple[int, int], module) -> tuple[np.ndarray, np.ndarray]:
    """The module's (P, S) kernel arrays in `pack_flat` buffers."""
    o, i = module.out_features, module.in_features
    og = padded(o) // GROUP
    n, ns = _panel_sizes(module)
    at, sat = offset
    if module.bits == 8:
        return flat[at:at + n].view(np.int8).reshape(og, i, GROUP), sflat[sat:sat + ns].reshape(og, GROUP)
    return flat[at:at + n].reshape(og, i, LANES), sflat[sat:sat + ns].reshape(og, i // module.group_size, GROUP)


def pack(module) -> tuple[np.ndarray, np.ndarray]:
    """One quantized module packed: its (P, S) kernel arrays."""
    flat, sflat, offsets = pack_flat([module])
    return qpanels_at(flat, sflat, offsets[0], module)


def linear(x: Tensor, packed: tuple[np.ndarray, np.ndarray], o: int) -> Tensor:
    """x (b, i) · Wᵀ → (b, o) float32 for a quantized W given packed (`pack`); the decode counterpart of
    QuantizedLinear.forward."""
    P, S = packed
    if x.dim() != 2 or x.shape[1] != P.shape[1]:
        raise ValueError(f"qpanels.linear: x {tuple(x.shape)} does not match packed weight of {P.shape[1]} inputs")
    if not 0 < o <= P.shape[0] * GROUP:
        raise ValueError(f"qpanels.linear: o = {o} outside the packed weight's 1 … {P.shape[0] * GROUP} rows")
    parallel = torch.get_num_threads() > 1
    if parallel:
        set_threads()
    x32 = x.detach().float().contiguous()
    out = torch.empty(x.shape[0], P.shape[0] * GROUP, dtype=torch.float32)
    _LINEAR[parallel](x32.numpy(), P, S, out.numpy())
    return out if out.shape[1] == o else out[:, :o].contiguous()


# For the fused decoder (fused.py): a packed matrix is either a float panel array (panels.py) or a quantized
# (P, S) pair; these three read either, chosen when numba compiles the caller (by the argument's type).
def rows(p, g, x, out):
    """out[:, 32g : 32g + 32] = x · (panel g of p)ᵀ, p a panels.py array or a (P, S) pair."""


def n_panels(p):
    """Panels of p (a panels.py array or a (P, S) pair)."""


def panel_stream(p, g0, g1):
    """Panels g0 … g1 − 1 of p as one flat array of their memory (what the fused step prefetches)."""


def qview(qflat, sflat, at, sat, og, i, G):
    """A quantized matrix's (P, S) in the fused decoder's buffers: og panels of i inputs, from byte `at` of qflat
    (int8 for 8 bits, uint8 for 4) and float `sat` of sflat; G the int4 group size (unused for int8)."""


@overload(rows)
def _rows(p, g, x, out):
    if isinstance(p, types.BaseTuple):
        return lambda p, g, x, out: qpanel_rows(p[0], p[1], g, x, out)
    return lambda p, g, x, out: panel_rows(p, g, x, out)


@overload(n_panels)
def _n_panels(p):
    if isinstance(p, types.BaseTuple):
        return lambda p: p[0].shape[0]
    return lambda p: p.shape[0]


@overload(panel_stream)
def _panel_stream(p, g0, g1):
    if isinstance(p, types.BaseTuple):
        return lambda p, g0, g1: p[0][g0:g1].reshape(-1)
    return lambda p, g0, g1: p[g0:g1].reshape(-1)


@overload(qview)
def _qview(qflat, sflat, at, sat, og, i, G):
    if qflat.dtype == types.int8:
        return lambda qflat, sflat, at, sat, og, i, G: (qflat[at:at + og * i * GROUP].reshape((og, i, GROUP)),
                                                        sflat[sat:sat + og * GROUP].reshape((og, GROUP)))
    return lambda qflat, sflat, at, sat, og, i, G: (
        qflat[at:at + og * i * LANES].reshape((og, i, LANES)),
        sflat[sat:sat + og * (i // G) * GROUP].reshape((og, i // G, GROUP)))
