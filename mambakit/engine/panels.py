"""Weights packed in 32-row panels for decoding, and the multiply that streams them: y (b, o) = x (b, i) · Wᵀ.

Why: a decode step (paper §3.3, recurrent mode) multiplies a few activation rows by every weight matrix once,
so it should cost the time to read the weights. Read in their natural (o, i) layout, a kernel that shares
each weight load among several batch rows has to walk several weight rows side by side (four short
streams 3 KiB apart for the 130m in_proj), and DRAM serves that well below one sequential stream. Packed
as panels, P[g, j, k] = W[32g + k, j], one panel (32 output rows) is read front to back, and so is the whole
matrix: for every input column j the kernel loads the panel's 32 weights (two 16-lane vectors) and adds
x[bb, j] · them into 2 × (batch rows) vector accumulators, an outer product (no horizontal sums). Against the
natural-layout kernel it replaced: docs/engine.md.

The cost is memory: the decode path keeps this packed copy next to the parameters (which training and the
parallel forward read), i.e. the weights twice. `FusedDecoder` (fused.py) builds it on the first fused step.

Numerics: each output is one chain of fused multiply-adds over j = 0 … i − 1, in that order, whatever the
batch size, so a row's result never depends on the other rows of the batch (a batch of prompts decodes
exactly as each prompt alone). Weights are float32, or bfloat16 read as their 16 bits and widened exactly;
accumulation is float32. The reference twin is `F.linear`; tests compare them.

The inner loop is emitted as LLVM vector IR by a numba intrinsic (`_panel_kernel`): written as numba loops,
the 2 × 8 accumulators would live in memory (LLVM cannot keep array elements in registers across the loop).
"""

from __future__ import annotations

import types as pytypes

import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from torch import Tensor

from . import hugepages
from ..ops.cpu.primitives import kernel_options, set_threads, vector_fn, widen_ir

def renamed(fn, suffix: str):
    """fn under another name. numba's disk cache files a compiled function under its name and bytecode, not
    its options: a serial and a parallel build of one function would load each other's cached code."""
    g = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    g.__qualname__ = fn.__qualname__ + suffix
    return g


LANES = 16  # float32 lanes in an AVX-512 vector
GROUP = 2 * LANES  # output rows per panel: two vectors, so batch 1 still has two independent FMA chains
MAX_ROWS = 8  # batch rows per pass over a panel: 2 × 8 = 16 accumulators of the 32 vector registers


def _panel_kernel(B: int):
    """An intrinsic `k(P, g, x, b0, out)`: out[b0 + bb, 32g + k] = Σ_{j < i} x[b0 + bb, j] · P[g, j, k] for
    bb < B, k < 32; P (og, i, 32) float32 or int16 (bfloat16 bits), x (b, ≥ i) and out (b, ≥ 32·og) float32,
    all C-contiguous. The caller guarantees the shapes (no bounds checks in the loop)."""

    @intrinsic
    def kernel(typingctx, P, g, x, b0, out):
        if not (isinstance(P, types.Array) and P.ndim == 3 and P.layout == "C"
                and P.dtype in (types.float32, types.int16)):
            return None
        for a in (x, out):
            if not (isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" and a.dtype == types.float32):
                return None
        if not (isinstance(g, types.Integer) and isinstance(b0, types.Integer)):
            return None
        sig = types.void(P, g, x, b0, out)

        def codegen(context, builder, signature, args):
            i64, f32 = ir.IntType(64), ir.FloatType()
            vec = ir.VectorType(f32, LANES)
            Pa = context.make_array(signature.args[0])(context, builder, args[0])
            xa = context.make_array(signature.args[2])(context, builder, args[2])
            oa = context.make_array(signature.args[4])(context, builder, args[4])
            gv = context.cast(builder, args[1], signature.args[1], types.int64)
            b0v = context.cast(builder, args[3], signature.args[3], types.int64)
            n_in = builder.extract_value(Pa.shape, 1)  # i
            x_stride = builder.extract_value(xa.shape, 1)  # x's rows may be longer than i: only i are read
            n_out = builder.extract_value(oa.shape, 1)
            bf16 = signature.args[0].dtype == types.int16
            fma = vector_fn(builder, "fma", vec, 3)

            def const(v):
                return ir.Constant(i64, v)

            panel = builder.mul(gv, builder.mul(n_in, const(GROUP)))  # P[g] starts here (elements)
            zero = ir.Constant(vec, [0.0] * LANES)
            start = builder.block
            loop = builder.append_basic_block("panel_loop")
            done = builder.append_basic_block("panel_done")
            builder.cbranch(builder.icmp_signed(">", n_in, const(0)), loop, done)
            builder.position_at_end(loop)
            j = builder.phi(i64)
            j.add_incoming(const(0), start)
            acc = [builder.phi(vec) for _ in range(B * 2)]
            for a in acc:
                a.add_incoming(zero, start)
            col = builder.add(panel, builder.mul(j, const(GROUP)))  # P[g, j, 0]
            w = []
            for h in range(2):
                ptr = builder.gep(Pa.data, [builder.add(col, const(LANES * h))])
                if bf16:
                    bits = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(16), LANES).as_pointer()),
                                        align=2)
                    w.append(widen_ir(builder, bits))
                else:
                    w.append(builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4))
            new = []
            splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
            for bb in range(B):
                row = builder.add(b0v, const(bb))
                xs = builder.load(builder.gep(xa.data, [builder.add(builder.mul(row, x_stride), j)]))
                xv = builder.insert_element(ir.Constant(vec, ir.Undefined), xs, ir.Constant(ir.IntType(32), 0))
                xv = builder.shuffle_vector(xv, ir.Constant(vec, ir.Undefined), splat_mask)
                for h in range(2):
                    new.append(builder.call(fma, [xv, w[h], acc[2 * bb + h]]))
            j_next = builder.add(j, const(1))
            j.add_incoming(j_next, builder.block)
            for a, v in zip(acc, new):
                a.add_incoming(v, builder.block)
            builder.cbranch(builder.icmp_signed("<", j_next, n_in), loop, done)
            builder.position_at_end(done)
            results = []
            for v in new:  # phis first: LLVM wants them at the top of the block
                res = builder.phi(vec)
                res.add_incoming(zero, start)
                res.add_incoming(v, loop)
                results.append(res)
            for bb in range(B):
                row = builder.add(b0v, const(bb))
                for h in range(2):
                    res = results[2 * bb + h]
                    at = builder.add(builder.mul(row, n_out), builder.add(builder.mul(gv, const(GROUP)),
                                                                         const(LANES * h)))
                    builder.store(res, builder.bitcast(builder.gep(oa.data, [at]), vec.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return kernel


_K1, _K2, _K3, _K4, _K5, _K6, _K7, _K8 = (_panel_kernel(B) for B in range(1, MAX_ROWS + 1))


def panel_rows(P, g, x, out):
    """out[:, 32g : 32g + 32] = x · (panel g)ᵀ for every row of x, MAX_ROWS rows per pass (the panel's
    later passes come from cache)."""
    b = x.shape[0]
    for b0 in range(0, b, MAX_ROWS):
        n = min(MAX_ROWS, b - b0)
        if n == 8:
            _K8(P, g, x, b0, out)
        elif n == 1:
            _K1(P, g, x, b0, out)
        elif n == 2:
            _K2(P, g, x, b0, out)
        elif n == 3:
            _K3(P, g, x, b0, out)
        elif n == 4:
            _K4(P, g, x, b0, out)
        elif n == 5:
            _K5(P, g, x, b0, out)
        elif n == 6:
            _K6(P, g, x, b0, out)
        else:
            _K7(P, g, x, b0, out)


panel_rows = njit(inline="always", **kernel_options(parallel=False))(panel_rows)


def _linear_panels(x, P, out):
    """out (b, 32·og) = x (b, i) · Wᵀ over all panels of P (og, i, 32), split between the threads."""
    for g in prange(P.shape[0]):
        panel_rows(P, g, x, out)


_LINEAR = {
    True: njit(**kernel_options(parallel=True))(_linear_panels),
    False: njit(**kernel_options(parallel=False))(renamed(_linear_panels, "_serial")),
}


def padded(o: int) -> int:
    """Rows of a packed matrix with o output rows (o rounded up to whole panels)."""
    return -(-o // GROUP) * GROUP


def pack_into(weight: Tensor, dst: Tensor) -> np.ndarray:
    """Packs weight (o, i), float32 or bfloat16, into dst (a flat tensor of padded(o) · i elements of its dtype;
    rows beyond o are zero) and returns dst as the kernel's (og, i, 32) array (bfloat16 as int16 bits)."""
    o, i = weight.shape
    og = padded(o) // GROUP
    d = dst.view(og, i, GROUP)
    with torch.no_grad():
        full = o // GROUP  # (og, 32, i) → (og, i, 32): one transposed copy of each whole panel
        d[:full].copy_(weight.detach()[: full * GROUP].view(full, GROUP, i).transpose(1, 2))
        if full < og:
            d[full:].zero_()
            d[full, :, : o - full * GROUP].copy_(weight.detach()[full * GROUP:].t())
    return d.view(torch.int16).numpy() if d.dtype == torch.bfloat16 else d.numpy()


def pack_flat(weights: list[Tensor]) -> tuple[np.ndarray, list[int]]:
    """Each weight packed, all in one flat buffer in 2 MiB pages where the machine has them (see `hugepages`), in
    the order given (the order a decode step reads them, so the step reads one stream). Returns the buffer
    (float32, or int16 bits for bfloat16) and where each weight's panels start in it (elements); weight k is
    buffer[offsets[k] : offsets[k] + padded(o) · i] as (og, i, 32)."""
    dtype = weights[0].dtype
    sizes = [padded(w.shape[0]) * w.shape[1] for w in weights]
    nbytes = sum(sizes) * weights[0].element_size()
    buf = None
    if hugepages.supported()[0] and nbytes >= hugepages.MIN_BYTES:
        try:
            with torch.inference_mode(False):
                buf = hugepages.huge_page_arena(nbytes).view(dtype)
        except OSError:
            buf = None
    if buf is None:
        buf = torch.empty(sum(sizes), dtype=dtype)
    offsets, offset = [], 0
    for w, n in zip(weights, sizes):
        if w.dtype != dtype:
            raise ValueError(f"pack: weights of one buffer share a dtype ({w.dtype} vs {dtype})")
        pack_into(w, buf[offset : offset + n])
        offsets.append(offset)
        offset += n
    return (buf.view(torch.int16) if dtype == torch.bfloat16 else buf).numpy(), offsets


def panels_at(flat: np.ndarray, offset: int, weight: Tensor) -> np.ndarray:
    """The packed `weight` (o, i) in a `pack_flat` buffer, from its offset: the kernel's (og, i, 32) view."""
    o, i = weight.shape
    return flat[offset : offset + padded(o) * i].reshape(-1, i, GROUP)


def pack(weights: list[Tensor]) -> list[np.ndarray]:
    """Each weight packed (`pack_flat`), as the kernel's (og, i, 32) arrays, views of one buffer."""
    flat, offsets = pack_flat(weights)
    return [panels_at(flat, at, w) for w, at in zip(weights, offsets)]


def linear(x: Tensor, P: np.ndarray, o: int) -> Tensor:
    """x (b, i) · Wᵀ → (b, o) float32, W given packed (`pack`); the decode counterpart of F.linear(x, W)."""
    if x.dim() != 2 or x.shape[1] != P.shape[1]:
        raise ValueError(f"panels.linear: x {tuple(x.shape)} does not match packed weight of {P.shape[1]} inputs")
    if not 0 < o <= P.shape[0] * GROUP:
        raise ValueError(f"panels.linear: o = {o} outside the packed weight's 1 … {P.shape[0] * GROUP} rows")
    parallel = torch.get_num_threads() > 1
    if parallel:
        set_threads()
    x32 = x.detach().float().contiguous()
    out = torch.empty(x.shape[0], P.shape[0] * GROUP, dtype=torch.float32)
    _LINEAR[parallel](x32.numpy(), P, out.numpy())
    return out if out.shape[1] == o else out[:, :o].contiguous()
