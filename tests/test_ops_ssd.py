"""SSD (the Mamba-2 scan): the chunked CPU path against the sequential reference (outputs, final states, every
gradient), the reference against the Mamba-1 scan it generalises, float64 gradcheck, packed sequences against
separate runs, state carried across calls, bfloat16, the decoding step against the scan, transformers' torch
path, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import pytest
import torch

from mambakit import ops
from mambakit.ops.reference import selective_scan_ref, ssd_ref, ssd_state_update_ref

ssd_cpu = partial(ops.ssd, backend="cpu")  # the chunked path, through the checked entry point
ssd_reference = partial(ops.ssd, backend="reference")

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}  # max |a − b| / max(1, max |b|)


def assert_close(a, b, tol, what=""):
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:.1g} × {scale:.3g}"


def make_inputs(b, l, h, p, g, n, dtype=torch.float32, *, D="head", z=True, bias=True, h0=True, softplus=True,
                seed=0):
    """Random inputs in the ranges a Mamba-2 layer sees; without softplus, dt is made positive (a step size)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    Ds = {"head": (h,), "channel": (h, p), None: None}[D]
    return dict(
        x=r(b, l, h, p),
        dt=r(b, l, h, scale=0.5, shift=-1.0) if softplus else r(b, l, h).abs().mul(0.1).add(0.01).to(dtype),
        A=-torch.exp(r(h, scale=0.5, shift=0.5)),  # negative, as −exp(A_log)
        B=r(b, l, g, n),
        C=r(b, l, g, n),
        D=r(*Ds) if Ds else None,
        z=r(b, l, h, p) if z else None,
        dt_bias=r(h, scale=0.3).abs() if bias else None,  # ≥ 0: keeps Δ positive without softplus
        initial_states=r(b, h, p, n) if h0 else None,
    )


def run_with_grads(fn, inputs, seed=1, **kw):
    """y, final states and the gradient of a random projection of both w.r.t. every floating input."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    y, s = fn(**args, return_final_states=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gs = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    loss = (y.double() * gy).sum() + (s.double() * gs).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y.detach(), s.detach(), dict(zip(leaves, grads))


CASES = [  # (b, l, h, p, g, n, chunk, D, z, bias, h0, softplus, dt_limit)
    (2, 37, 4, 3, 1, 5, 8, "head", True, True, True, True, (0.0, float("inf"))),  # l % chunk != 0
    (1, 40, 6, 4, 3, 4, 16, "channel", True, True, True, True, (0.05, 1.5)),  # g > 1, D per channel, limits
    (2, 16, 4, 2, 2, 3, 16, None, False, False, False, False, (0.0, float("inf"))),  # the bare scan, one chunk
    (1, 5, 2, 3, 2, 2, 64, "head", False, True, True, True, (0.0, 0.3)),  # l < chunk, g = h
    (2, 33, 8, 2, 4, 6, 4, "channel", True, False, True, False, (0.02, float("inf"))),  # many chunks, no softplus
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}l{}h{}p{}g{}n{}Q{}".format(*c[:7]))
def test_chunked_matches_reference(case, dtype):
    b, l, h, p, g, n, Q, D, z, bias, h0, softplus, limit = case
    inputs = make_inputs(b, l, h, p, g, n, dtype, D=D, z=z, bias=bias, h0=h0, softplus=softplus)
    kw = dict(chunk_size=Q, dt_softplus=softplus, dt_limit=limit)
    y1, s1, g1 = run_with_grads(ssd_cpu, inputs, **kw)
    y2, s2, g2 = run_with_grads(ssd_reference, inputs, **kw)
    assert y1.dtype == dtype and y1.shape == (b, l, h, p) and s1.shape == (b, h, p, n)
    assert s1.dtype == dtype  # float32 states for float32 (and half) inputs, float64 for float64
    assert_close(y1, y2, TOL[dtype], "y")
    assert_close(s1, s2, TOL[dtype], "final states")
    assert g1.keys() == g2.keys()
    for k in g1:
        assert g1[k].dtype == inputs[k].dtype and g1[k].shape == inputs[k].shape
        assert_close(g1[k], g2[k], TOL[dtype], f"grad {k}")


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_result_does_not_depend_on_chunk_size(chunk):
    inputs = make_inputs(2, 21, 4, 3, 2, 4, torch.float64)
    want = ssd_ref(**inputs, dt_softplus=True, return_final_states=True)
    got = ssd_cpu(**inputs, chunk_size=chunk, dt_softplus=True, return_final_states=True)
    for a, b_, what in zip(got, want, ("y", "final states")):
        assert_close(a, b_, 1e-10, what)


def test_reference_with_one_group_is_the_mamba1_scan():
    """With g = 1, SSD is the Mamba-1 selective scan over d = h·p channels whose A (h·p, n) and Δ are constant
    within a head: an independent check of the reference (dt bias, softplus, D per channel, gate, states)."""
    b, l, h, p, n = 2, 13, 3, 4, 5
    inp = make_inputs(b, l, h, p, 1, n, torch.float64, D="channel")
    y, s = ssd_ref(**inp, dt_softplus=True, return_final_states=True)
    y1, s1 = selective_scan_ref(
        u=inp["x"].reshape(b, l, h * p),
        delta=inp["dt"].repeat_interleave(p, dim=2),
        A=inp["A"].repeat_interleave(p)[:, None].expand(h * p, n),
        B=inp["B"][:, :, 0],
        C=inp["C"][:, :, 0],
        D=inp["D"].reshape(h * p),
        z=inp["z"].reshape(b, l, h * p),
        delta_bias=inp["dt_bias"].repeat_interleave(p),
        delta_softplus=True,
        initial_state=inp["initial_states"].reshape(b, h * p, n),
        return_final_state=True,
    )
    assert_close(y.reshape(b, l, h * p), y1, 1e-12, "y")
    assert_close(s.reshape(b, h * p, n), s1, 1e-12, "final states")


def test_groups_are_contiguous_blocks_of_heads():
    """Head i reads group i // (h // g): grouped B, C equal per-head copies of them (g = h)."""
    inp = make_inputs(1, 11, 6, 2, 2, 3, torch.float64)
    per_head = dict(inp, B=inp["B"].repeat_interleave(3, dim=2), C=inp["C"].repeat_interleave(3, dim=2))
    for fn in (ssd_cpu, ssd_reference):
        want = fn(**per_head, chunk_size=4, dt_softplus=True)
        assert_close(fn(**inp, chunk_size=4, dt_softplus=True), want, 1e-12, "y")


def test_gradcheck_float64():
    inp = make_inputs(1, 7, 2, 2, 1, 2, torch.float64, D="channel")
    inp["seq_idx"] = None
    names = [k for k, v in inp.items() if v is not None]

    def f(*tensors):
        args = dict(inp, **dict(zip(names, tensors)))
        y, s = ops.ssd(**args, chunk_size=3, dt_softplus=True, dt_limit=(0.01, 5.0), return_final_states=True,
                       backend="cpu")
        return y, s

    leaves = [inp[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


def test_gradcheck_float64_packed():
    inp = make_inputs(1, 9, 2, 1, 1, 2, torch.float64, D=None, z=False)
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2]])
    names = [k for k, v in inp.items() if v is not None]

    def f(*tensors):
        args = dict(inp, **dict(zip(names, tensors)))
        return ops.ssd(**args, chunk_size=4, dt_softplus=True, seq_idx=seq_idx, return_final_states=True,
                       backend="cpu")

    assert torch.autograd.gradcheck(f, [inp[k].clone().requires_grad_() for k in names], eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_packed_sequences_equal_separate_runs(backend):
    """seq_idx packs three sequences per row; each must equal its own run (the first from initial_states, the
    others from zero), and the final state must be the last sequence's."""
    lengths = [[5, 9, 4], [11, 1, 6]]  # boundaries inside and at the ends of chunks of 4
    b, l, h, p, g, n = 2, 18, 4, 3, 2, 3
    inp = make_inputs(b, l, h, p, g, n, torch.float64, D="channel")
    seq_idx = torch.tensor([[i for i, m in enumerate(row) for _ in range(m)] for row in lengths])
    y, s = ops.ssd(**inp, chunk_size=4, dt_softplus=True, dt_limit=(0.0, 2.0), seq_idx=seq_idx,
                   return_final_states=True, backend=backend)
    for r, row in enumerate(lengths):
        start = 0
        for i, m in enumerate(row):
            part = {k: (v[r:r + 1, start:start + m] if k in ("x", "dt", "B", "C", "z") else v)
                    for k, v in inp.items()}
            part["initial_states"] = inp["initial_states"][r:r + 1] if i == 0 else None
            ys, ss = ssd_ref(**part, dt_softplus=True, dt_limit=(0.0, 2.0), return_final_states=True)
            assert_close(y[r:r + 1, start:start + m], ys, 1e-10, f"row {r} sequence {i}")
            start += m
        assert_close(s[r:r + 1], ss, 1e-10, f"row {r} final state")


# ------------------------------------------------------------------ cu_seqlens: packed variable-length sequences
_TOKENWISE = ("x", "dt", "B", "C", "z")


def _separate_runs(inp, lengths, **kw):
    """y (1, l, h, p) and the per-sequence final states (m, h, p, n) of running each sequence on its own (the first
    from initial_states, the others from zero; an empty one keeps the state it starts from)."""
    ys, states, start = [], [], 0
    h0 = inp["initial_states"]
    for i, m in enumerate(lengths):
        if m == 0:
            states.append(h0[0].double() if i == 0 and h0 is not None else
                          torch.zeros(inp["x"].shape[2], inp["x"].shape[3], inp["B"].shape[3], dtype=torch.float64))
            continue
        part = {k: (v[:, start:start + m] if k in _TOKENWISE else v) for k, v in inp.items()}
        part["initial_states"] = h0 if i == 0 else None
        y, st = ssd_ref(**part, return_final_states=True, **kw)
        ys.append(y)
        states.append(st[0].double())
        start += m
    return torch.cat(ys, 1), torch.stack(states)


LENGTHS = [[5, 9, 4], [0, 7, 1, 0, 10], [18]]  # boundaries inside and at the ends of chunks of 4; empty sequences


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda ls: "-".join(map(str, ls)))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cu_seqlens_equal_separate_runs_with_every_gradient(backend, lengths):
    """cu_seqlens packs the sequences into one row: outputs, the per-sequence final states (return_varlen_states),
    the row's final state and the gradient of every input through all three equal those of separate runs."""
    l, h, p, g, n = sum(lengths), 4, 3, 2, 3
    inp = make_inputs(1, l, h, p, g, n, torch.float64, D="channel")
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    kw = dict(chunk_size=4, dt_softplus=True, dt_limit=(0.0, 2.0))
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y, final, varlen = ops.ssd(**leaves, **kw, cu_seqlens=cu, return_final_states=True, return_varlen_states=True,
                               backend=backend)
    assert varlen.shape == (len(lengths), h, p, n) and varlen.dtype == torch.float64
    leaves2 = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y2, varlen2 = _separate_runs(leaves2, lengths, **kw)
    assert_close(y, y2, 1e-10, "y")
    assert_close(varlen, varlen2, 1e-10, "varlen states")
    assert_close(final, varlen2[-1] if lengths[-1] else final, 1e-10, "final state = the last sequence's")
    gen = torch.Generator().manual_seed(4)
    gy, gv = torch.randn(y.shape, generator=gen, dtype=torch.float64), torch.randn(varlen.shape, generator=gen,
                                                                                     dtype=torch.float64)
    g1 = torch.autograd.grad((y * gy).sum() + (varlen * gv).sum(), list(leaves.values()), allow_unused=True)
    g2 = torch.autograd.grad((y2 * gy).sum() + (varlen2 * gv).sum(), list(leaves2.values()), allow_unused=True)
    for k, a, b in zip(leaves, g1, g2):
        a = torch.zeros_like(leaves[k]) if a is None else a
        b = torch.zeros_like(leaves[k]) if b is None else b
        assert_close(a, b, 1e-10, f"grad {k}")


@pytest.mark.parametrize("tokens", [8, 4096])
def test_cu_seqlens_inference_path_float32(monkeypatch, tokens):
    """Without autograd the CPU path keeps the states entering each chunk from the fused kernels for the varlen
    states: equal to separate runs in float32 (one and several groups of chunks)."""
    from mambakit.ops.cpu import ssd_fused

    monkeypatch.setattr(ssd_fused, "BLOCK_TOKENS", tokens)
    lengths = [3, 0, 12, 1, 9]
    inp = make_inputs(1, sum(lengths), 4, 3, 2, 3, torch.float32, D="head")
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        y, varlen = ssd_cpu(**inp, chunk_size=4, dt_softplus=True, cu_seqlens=cu, return_varlen_states=True)
    y2, varlen2 = _separate_runs({k: v.double() for k, v in inp.items()}, lengths, dt_softplus=True)
    assert_close(y, y2, TOL[torch.float32], "y")
    assert_close(varlen, varlen2, TOL[torch.float32], "varlen states")


def test_cu_seqlens_gradcheck_float64():
    inp = make_inputs(1, 9, 2, 1, 1, 2, torch.float64, D=None, z=False)
    cu = torch.tensor([0, 4, 4, 6, 9])
    names = [k for k, v in inp.items() if v is not None]

    def f(*tensors):
        args = dict(inp, **dict(zip(names, tensors)))
        return ops.ssd(**args, chunk_size=4, dt_softplus=True, cu_seqlens=cu, return_final_states=True,
                       return_varlen_states=True, backend="cpu")

    assert torch.autograd.gradcheck(f, [inp[k].clone().requires_grad_() for k in names], eps=1e-6, atol=1e-7)


def test_cu_seqlens_and_seq_idx():
    """cu_seqlens implies seq_idx: given both, they must agree; the results equal those with seq_idx alone."""
    inp = make_inputs(1, 9, 2, 2, 1, 3, torch.float64)
    cu = torch.tensor([0, 2, 2, 9])
    seq_idx = torch.tensor([[0, 0, 2, 2, 2, 2, 2, 2, 2]])
    assert torch.equal(ops.seq_idx_from_cu_seqlens(cu, 9), seq_idx)
    for backend in ("cpu", "reference"):
        a = ops.ssd(**inp, cu_seqlens=cu, backend=backend)
        b = ops.ssd(**inp, cu_seqlens=cu, seq_idx=seq_idx, backend=backend)
        c = ops.ssd(**inp, seq_idx=seq_idx, backend=backend)
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="seq_idx and cu_seqlens disagree"):
        ops.ssd(**inp, cu_seqlens=cu, seq_idx=torch.zeros(1, 9, dtype=torch.int64))


@pytest.mark.parametrize("cu, exc, match", [
    (torch.tensor([1, 4, 9]), ValueError, "start at 0"),
    (torch.tensor([0, 5, 4, 9]), ValueError, "non-decreasing"),
    (torch.tensor([0, 4, 8]), ValueError, "end at l = 9"),
    (torch.tensor([0.0, 9.0]), TypeError, "cu_seqlens must be an integer tensor"),
    (torch.tensor([[0, 9]]), ValueError, r"cu_seqlens must have shape \(num_seqs \+ 1,\)"),
    (torch.tensor([9]), ValueError, "num_seqs >= 1"),
])
def test_cu_seqlens_bad_input(cu, exc, match):
    inp = make_inputs(1, 9, 2, 2, 1, 3)
    with pytest.raises(exc, match=match):
        ops.ssd(**inp, cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one_and_varlen_needs_cu_seqlens():
    inp = make_inputs(2, 9, 2, 2, 1, 3)
    with pytest.raises(ValueError, match="batch size 1"):
        ops.ssd(**inp, cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="return_varlen_states needs cu_seqlens"):
        ops.ssd(**inp, return_varlen_states=True)


def test_initial_states_feed_seq_idx_zero_only():
    """The official convention: the state before the first token is sequence 0's."""
    inp = make_inputs(1, 6, 2, 2, 1, 2, torch.float64)
    seq_idx = torch.ones(1, 6, dtype=torch.int32)
    without = dict(inp, initial_states=None)
    for fn in (ssd_cpu, ssd_reference):
        assert_close(fn(**inp, chunk_size=4, seq_idx=seq_idx), fn(**without, chunk_size=4), 1e-12, "y")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_pieces_with_state_carry_equal_one_shot(backend):
    """Chunked prefill: pieces of the sequence with the final state carried equal one call, forward and
    gradient (the state is differentiable both ways)."""
    inp = make_inputs(2, 30, 4, 2, 2, 3, torch.float64, D="channel")
    x = inp["x"].clone().requires_grad_()
    rest = {k: v for k, v in inp.items() if k != "x"}
    kw = dict(chunk_size=8, dt_softplus=True, return_final_states=True, backend=backend)
    y_all, s_all = ops.ssd(x, **rest, **kw)
    (g_all,) = torch.autograd.grad(y_all.pow(2).sum() + s_all.sum(), x)
    x2 = inp["x"].clone().requires_grad_()
    state, ys = inp["initial_states"], []
    for t0, t1 in [(0, 1), (1, 13), (13, 30)]:
        piece = {k: v[:, t0:t1] if k in ("dt", "B", "C", "z") else v for k, v in rest.items()}
        y, state = ops.ssd(x2[:, t0:t1], **dict(piece, initial_states=state), **kw)
        ys.append(y)
    (g_pieces,) = torch.autograd.grad(torch.cat(ys, 1).pow(2).sum() + state.sum(), x2)
    assert_close(torch.cat(ys, 1), y_all, 1e-10, "y")
    assert_close(state, s_all, 1e-10, "final states")
    assert_close(g_pieces, g_all, 1e-10, "dx")


def test_numerically_safe_extremes():
    """Δ up to 20, A down to −1e4: the decays underflow to exactly 0 and nothing is NaN or inf (masked entries
    go to −inf before exp, never inf·0)."""
    b, l, h, p, g, n = 1, 40, 4, 2, 1, 3
    inp = make_inputs(b, l, h, p, g, n)
    inp["dt"] = torch.full((b, l, h), 20.0)
    inp["A"] = torch.tensor([-1e4, -1.0, -1e-4, 0.0])
    y1, s1, g1 = run_with_grads(ssd_cpu, inp, chunk_size=16, dt_softplus=True)
    y2, s2, _ = run_with_grads(ssd_reference, inp, chunk_size=16, dt_softplus=True)
    for t in [y1, s1, *g1.values()]:
        assert torch.isfinite(t).all()
    assert_close(y1, y2, 1e-4, "y")
    assert_close(s1, s2, 1e-4, "final states")


_MEMORY_CHILD = """
import json, torch
from mambakit import ops
b, l, h, p, g, n, Q = 1, 8192, 2, 64, 1, 128, 64
x = torch.randn(b, l, h, p, requires_grad=True); dt = torch.randn(b, l, h, requires_grad=True)
A = -torch.rand(h) - 0.5
B = torch.randn(b, l, g, n, requires_grad=True); C = torch.randn(b, l, g, n, requires_grad=True)
def status_bytes(field):  # VmRSS: now; VmHWM: the high-water mark
    line = next(s for s in open('/proc/self/status').read().splitlines() if s.startswith(field + ':'))
    return int(line.split()[1]) * 1024
ops.ssd(x[:, :Q], dt[:, :Q], A, B[:, :Q], C[:, :Q], chunk_size=Q, dt_softplus=True).sum().backward()  # warm-up
open('/proc/self/clear_refs', 'w').write('5')
base = status_bytes('VmRSS')
y = ops.ssd(x, dt, A, B, C, chunk_size=Q, dt_softplus=True, backend='cpu')
y.backward(torch.ones_like(y))
print(json.dumps({"extra": status_bytes('VmHWM') - base, "states": b * l * h * p * n * 4}))
"""


def test_forward_backward_memory_is_not_b_l_h_p_n():
    """Peak extra memory of forward + backward at (b, l, h, p, n) = (1, 8192, 2, 64, 128), Q = 64 (the official
    head and state sizes) stays below a third of one float32 tensor of every step's state (512 MiB): only the
    chunk states and (b, c, h, Q, Q) blocks are formed, 4 to 8 MiB each here (measured about 140 MiB, of which
    about 70 MiB are the tensors autograd saves; a custom backward would recompute most of them)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["extra"] < r["states"] / 3, r


def test_non_contiguous_inputs():
    """x, B, C as the Mamba-2 block makes them: slices of one (b, l, h·p + 2·g·n) tensor; dt a transposed view."""
    b, l, h, p, g, n = 2, 10, 4, 2, 2, 3
    gen = torch.Generator().manual_seed(3)
    xBC = torch.randn(b, l, h * p + 2 * g * n, generator=gen)
    x, B, C = torch.split(xBC, [h * p, g * n, g * n], dim=-1)
    x, B, C = x.view(b, l, h, p), B.view(b, l, g, n), C.view(b, l, g, n)
    dt = torch.randn(h, b, l, generator=gen).permute(1, 2, 0)  # (b, l, h), not contiguous
    A = -torch.rand(h, generator=gen)
    for kw in (dict(), dict(dt_softplus=True)):
        want = ssd_ref(x.contiguous(), dt.abs().contiguous(), A, B.contiguous(), C.contiguous(), **kw)
        for backend in ("cpu", "reference"):
            got = ops.ssd(x, dt.abs(), A, B, C, chunk_size=5, backend=backend, **kw)
            assert_close(got, want, 1e-5, backend)


def test_float16_inputs_compute_in_float32():
    inputs = make_inputs(1, 20, 4, 4, 2, 4, torch.float16)
    y1, s1, _ = run_with_grads(ssd_cpu, inputs, chunk_size=8, dt_softplus=True)
    as32 = {k: None if v is None else v.float() for k, v in inputs.items()}
    y2, s2, _ = run_with_grads(ssd_reference, as32, chunk_size=8, dt_softplus=True)
    assert y1.dtype == torch.float16 and s1.dtype == torch.float32
    assert_close(y1.float(), y2, 2e-3, "y")  # only the output is rounded (2^-11)
    assert_close(s1, s2, 1e-4, "final states")


def test_bfloat16_inputs_against_float32_reference():
    """bf16 runs the GEMMs in bf16 with their outputs widened to float32: within 1.5e-2 (relative to the largest
    value) of the float32 reference on the same rounded values, for outputs, states and gradients (measured
    2e-3 to 7e-3 here: Δ·x, the scores and the GEMM outputs are rounded to bf16, 2^-9 relative each)."""
    inputs = make_inputs(2, 40, 4, 8, 2, 8, torch.bfloat16, D="channel")
    y1, s1, g1 = run_with_grads(ssd_cpu, inputs, chunk_size=16, dt_softplus=True)
    as32 = {k: None if v is None else v.float() for k, v in inputs.items()}
    y2, s2, g2 = run_with_grads(ssd_reference, as32, chunk_size=16, dt_softplus=True)
    assert y1.dtype == torch.bfloat16 and s1.dtype == torch.float32
    assert_close(y1.float(), y2, 1.5e-2, "y")
    assert_close(s1, s2, 1.5e-2, "final states")
    for k in g1:
        assert g1[k].dtype == torch.bfloat16
        assert_close(g1[k].float(), g2[k], 1.5e-2, f"grad {k}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("D", ["head", "channel"])
def test_state_update_token_by_token_equals_ssd(backend, D):
    b, l, h, p, g, n = 2, 9, 4, 3, 2, 5
    inp = make_inputs(b, l, h, p, g, n, D=D)
    y, s = ops.ssd(**inp, chunk_size=4, dt_softplus=True, return_final_states=True)
    state = inp["initial_states"].clone()
    for t in range(l):
        step = {k: inp[k][:, t] for k in ("x", "dt", "B", "C", "z")}
        yt = ops.ssd_state_update(state, **step, A=inp["A"], D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True,
                                  backend=backend)
        assert yt.shape == (b, h, p)
        assert_close(yt, y[:, t], 1e-5, f"y at step {t}")
    assert_close(state, s, 1e-5, "state")


def test_state_update_backends_agree_and_clamp():
    b, h, p, g, n = 3, 6, 2, 3, 4
    inp = make_inputs(b, 1, h, p, g, n, torch.float64, D="channel")
    step = {k: inp[k][:, 0] for k in ("x", "dt", "B", "C", "z")}
    s1, s2 = inp["initial_states"].clone(), inp["initial_states"].clone()
    kw = dict(A=inp["A"], D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True, dt_limit=(0.1, 0.4))
    y1 = ops.ssd_state_update(s1, **step, **kw, backend="cpu")
    y2 = ssd_state_update_ref(s2, **step, **kw)
    assert_close(y1, y2, 1e-12, "y")
    assert_close(s1, s2, 1e-12, "state")
    y3 = ops.ssd(**{k: v for k, v in inp.items()}, dt_softplus=True, dt_limit=(0.1, 0.4))
    assert_close(y1, y3[:, 0], 1e-12, "y vs ssd")


def test_default_backend_and_triton_refused(monkeypatch):
    """CPU tensors default to the chunked path; backend='triton' needs CUDA tensors (or Triton's interpreter,
    tests/test_ops_triton_ssd.py) and says so, or says Triton is missing."""
    inp = make_inputs(1, 5, 2, 2, 1, 2)
    assert_close(ops.ssd(**inp), ssd_cpu(**inp), 0.0, "default is the chunked path")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises((ValueError, ImportError), match=r"TRITON_INTERPRET|mambakit\[triton\]"):
        ops.ssd(**inp, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.ssd(**inp, backend="cuda")


def test_autocast_does_not_lower_precision():
    inp = make_inputs(1, 12, 2, 4, 1, 4)
    want = ssd_reference(**inp, dt_softplus=True)
    with torch.autocast("cpu", torch.bfloat16):
        got = ssd_cpu(**inp, dt_softplus=True)
    assert got.dtype == torch.float32
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(x=torch.randn(2, 5, 4)), ValueError, r"x must have shape \(b, l, h, p\)"),
        (dict(x=torch.randn(2, 0, 4, 3)), ValueError, r"x must have at least one time step"),
        (dict(dt=torch.randn(2, 5, 3)), ValueError, r"dt must have shape \(b, l, h\) = \(2, 5, 4\)"),
        (dict(A=torch.randn(4, 1)), ValueError, r"A must have shape \(h,\) = \(4\)"),
        (dict(A=torch.full((4,), float("nan"))), ValueError, r"A contains NaN or inf"),
        (dict(A=torch.tensor([-1.0, 0.5, -1.0, -1.0])), ValueError, r"A must be <= 0"),
        (dict(B=torch.randn(2, 5, 3, 3), C=torch.randn(2, 5, 3, 3)), ValueError,
         r"h = 4 .* multiple of the groups g = 3"),
        (dict(B=torch.randn(2, 4, 2, 3)), ValueError, r"B must have shape \(b, l, g, n\)"),
        (dict(C=torch.randn(2, 5, 2, 2)), ValueError, r"C must have shape \(b, l, g, n\) = \(2, 5, 2, 3\)"),
        (dict(D=torch.randn(3)), ValueError, r"D must have shape \(h,\) or \(h, p\)"),
        (dict(D=torch.randn(4, 2)), ValueError, r"D must have shape \(h,\) or \(h, p\) = \(4, 3\)"),
        (dict(z=torch.randn(2, 5, 4, 2)), ValueError, r"z must have shape like x"),
        (dict(dt_bias=torch.randn(4, 1)), ValueError, r"dt_bias must have shape \(h,\)"),
        (dict(initial_states=torch.randn(2, 4, 3, 2)), ValueError, r"initial_states must have shape \(b, h, p, n\)"),
        (dict(x=torch.randint(0, 3, (2, 5, 4, 3))), TypeError, r"x must be float16, bfloat16, float32 or float64"),
        (dict(B=[[0.0]]), TypeError, r"B must be a torch.Tensor"),
        (dict(chunk_size=0), ValueError, r"chunk_size must be a positive int"),
        (dict(chunk_size=2.0), ValueError, r"chunk_size must be a positive int"),
        (dict(dt_limit=(1.0, 0.5)), ValueError, r"dt_limit must be \(lo, hi\) with lo <= hi"),
        (dict(dt_limit=None), TypeError, r"dt_limit must be a pair"),
        (dict(seq_idx=torch.zeros(2, 5)), TypeError, r"seq_idx must be an integer tensor"),
        (dict(seq_idx=torch.zeros(2, 4, dtype=torch.int32)), ValueError,
         r"seq_idx must have shape \(b, l\) = \(2, 5\)"),
        (dict(seq_idx=torch.tensor([[0, 0, 1, 0, 1]] * 2)), ValueError, r"seq_idx must be >= 0 and non-decreasing"),
        (dict(seq_idx=torch.full((2, 5), -1)), ValueError, r"seq_idx must be >= 0"),
    ],
)
def test_bad_input_is_named(change, exc, match):
    inputs = make_inputs(2, 5, 4, 3, 2, 3)
    inputs.update(change)
    with pytest.raises(exc, match=match):
        ops.ssd(**inputs)


def test_state_update_bad_input():
    b, h, p, g, n = 2, 4, 3, 2, 3
    step = dict(x=torch.randn(b, h, p), dt=torch.randn(b, h), A=-torch.rand(h), B=torch.randn(b, g, n),
                C=torch.randn(b, g, n))
    with pytest.raises(ValueError, match=r"state must have shape \(b, h, p, n\) = \(2, 4, 3, 3\)"):
        ops.ssd_state_update(torch.zeros(b, h, p, 4), **step)
    with pytest.raises(ValueError, match=r"B must have shape \(b, g, n\)"):
        ops.ssd_state_update(torch.zeros(b, h, p, n), **{**step, "B": torch.randn(b, g)})
    with pytest.raises(ValueError, match=r"dt must have shape \(b, h\)"):
        ops.ssd_state_update(torch.zeros(b, h, p, n), **{**step, "dt": torch.randn(b, h, 1)})
    with pytest.raises(ValueError, match=r"multiple of the groups g = 3"):
        ops.ssd_state_update(torch.zeros(b, h, p, n), **{**step, "B": torch.randn(b, 3, n), "C": torch.randn(b, 3, n)})


def test_matches_transformers_torch_path(monkeypatch):
    """The outside world: transformers' pure-torch Mamba-2 scan and step (its fallbacks when the official
    kernels are absent) on the same inputs: g > 1, dt bias, softplus, limits, D, initial states."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    b, l, h, p, g, n = 2, 37, 6, 4, 2, 5
    inp = make_inputs(b, l, h, p, g, n, z=False)
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], initial_states=inp["initial_states"], dt_softplus=True,
              dt_limit=(0.05, 1.0), return_final_states=True)
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    y_hf, s_hf = hf.mamba2_chunk_scan(*args, 16, **kw)
    y, s = ops.ssd(*args, chunk_size=16, **kw)
    assert_close(y, y_hf, 1e-5, "y")
    assert_close(s, s_hf, 1e-5, "final states")
    # its step takes A (h, p, n), dt, D and dt_bias per channel: the per-head values broadcast
    s_hf, s = inp["initial_states"].clone(), inp["initial_states"].clone()
    x, dt, B, C = (inp[k][:, 3] for k in ("x", "dt", "B", "C"))
    y_hf = hf.mamba2_selective_state_update(
        s_hf, x, dt[..., None].expand(b, h, p), inp["A"][:, None, None].expand(h, p, n), B, C,
        inp["D"][:, None].expand(h, p), dt_bias=inp["dt_bias"][:, None].expand(h, p), dt_softplus=True)
    y = ops.ssd_state_update(s, x, dt, inp["A"], B, C, D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True)
    assert_close(y, y_hf, 1e-5, "step y")
    assert_close(s, s_hf, 1e-5, "step state")


# ------------------------------------------------------------------------ the fused inference kernel
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("packed", [False, True])
def test_fused_inference_equals_autograd_path(case, packed):
    """Without autograd, ssd_cpu sums steps 1 and 4 in the numba kernel (ssd_fused.py); with autograd, in its torch
    twin `intra_chunk`. Both must give the reference's outputs and final states, and each other's to rounding."""
    b, l, h, p, g, n, chunk, D, z, bias, h0, softplus, dt_limit = case
    inp = make_inputs(b, l, h, p, g, n, torch.float32, D=D, z=z, bias=bias, h0=h0, softplus=softplus)
    kw = dict(chunk_size=chunk, dt_softplus=softplus, dt_limit=dt_limit, return_final_states=True)
    if packed:
        kw["seq_idx"] = torch.sort(torch.randint(0, 3, (b, l), generator=torch.Generator().manual_seed(2)), 1).values
    with torch.no_grad():
        y_fused, s_fused = ssd_cpu(**inp, **kw)
    leaf = inp["x"].clone().requires_grad_()
    y_torch, s_torch = ssd_cpu(**dict(inp, x=leaf), **kw)
    y_ref, s_ref = ssd_reference(**{k: v.double() if v is not None else None for k, v in inp.items()}, **kw)
    assert_close(y_fused, y_ref, TOL[torch.float32], "fused y vs reference")
    assert_close(s_fused, s_ref, TOL[torch.float32], "fused state vs reference")
    assert_close(y_fused, y_torch.detach(), 1e-5, "fused vs torch twin")


@pytest.mark.parametrize("tokens", [8, 24, 4096])  # several groups of chunks (a shorter last one), or one group
def test_fused_inference_chunk_groups(monkeypatch, tokens):
    """The inference path takes the chunks in groups of about BLOCK_TOKENS tokens, the state carried from one group
    to the next: any group size gives the reference's outputs and final states (packed sequences, g > 1, padding)."""
    from mambakit.ops.cpu import ssd_fused

    monkeypatch.setattr(ssd_fused, "BLOCK_TOKENS", tokens)
    b, l, h, p, g, n = 2, 45, 4, 3, 2, 5
    inp = make_inputs(b, l, h, p, g, n, torch.float32, D="channel")
    seq = torch.sort(torch.randint(0, 4, (b, l), generator=torch.Generator().manual_seed(5)), 1).values
    for s in (None, seq):
        kw = dict(chunk_size=8, dt_softplus=True, seq_idx=s, return_final_states=True)
        with torch.no_grad():
            y, st = ssd_cpu(**inp, **kw)
        y_ref, s_ref = ssd_reference(**{k: v.double() if v is not None else None for k, v in inp.items()}, **kw)
        assert_close(y, y_ref, TOL[torch.float32], f"y, BLOCK_TOKENS {tokens}")
        assert_close(st, s_ref, TOL[torch.float32], f"final states, BLOCK_TOKENS {tokens}")


def test_fused_inference_workspaces_outlive_inference_mode():
    """The inference path keeps its buffers between calls: one made under torch.inference_mode (as generate runs)
    must still be writable by the next call under plain no_grad (a model evaluated after generating), and give the
    same result."""
    inp = make_inputs(1, 40, 4, 3, 2, 5, torch.float32, D="channel")
    kw = dict(chunk_size=8, dt_softplus=True)
    with torch.inference_mode():
        y_inf = ssd_cpu(**inp, **kw)
    with torch.no_grad():
        y = ssd_cpu(**inp, **kw)
    assert torch.equal(y, y_inf)


def test_fused_inference_bfloat16_equals_autograd_path():
    """In bfloat16 the inference kernels write the GEMM operands in bf16, as the autograd path rounds them: the two
    agree to bf16 rounding, and both are within the bf16 tolerance of the float32 reference."""
    inputs = make_inputs(2, 40, 4, 8, 2, 8, torch.bfloat16, D="channel")
    kw = dict(chunk_size=16, dt_softplus=True, return_final_states=True)
    with torch.no_grad():
        y_inf, s_inf = ssd_cpu(**inputs, **kw)
    y_ag, s_ag, _ = run_with_grads(ssd_cpu, inputs, chunk_size=16, dt_softplus=True)
    y_ref, s_ref = ssd_reference(**{k: None if v is None else v.float() for k, v in inputs.items()}, **kw)
    assert y_inf.dtype == torch.bfloat16 and s_inf.dtype == torch.float32
    assert_close(y_inf.float(), y_ag.float(), 1e-2, "inference vs autograd path, y")
    assert_close(s_inf, s_ag, 1e-2, "inference vs autograd path, final states")
    assert_close(y_inf.float(), y_ref, 1.5e-2, "inference y vs float32 reference")
    assert_close(s_inf, s_ref, 1.5e-2, "inference final states vs float32 reference")


@pytest.mark.parametrize("n", [5, 16, 37, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_state_update_equals_reference(n, dtype):
    """The numba step (ssd_step.py: one pass over the state, h·C in 16 lanes) against the reference twin: y and
    the state updated in place, n below, at and between multiples of the lanes, bfloat16 activations, groups,
    D per channel, z, dt limits; and in place through a view of a larger pool (as the server's state pool)."""
    b, h, p, g = 3, 6, 4, 3
    inp = make_inputs(b, 1, h, p, g, n, dtype, D="channel", h0=False, seed=n)
    step = {k: inp[k][:, 0] for k in ("x", "dt", "B", "C", "z")}
    kw = dict(A=inp["A"].float(), D=inp["D"].float(), dt_bias=inp["dt_bias"].float(), dt_softplus=True,
              dt_limit=(0.01, 2.0))
    pool = torch.randn(5, h, p, n, generator=torch.Generator().manual_seed(7))
    s1, s2 = pool[1:4], pool[1:4].clone()  # s1: rows 1..3 of the pool, updated where they lie
    y1 = ops.ssd_state_update(s1, **step, **kw, backend="cpu")
    y2 = ssd_state_update_ref(s2, **step, **kw)
    assert y1.dtype == dtype
    assert_close(y1, y2, 1e-5 if dtype == torch.float32 else 1e-2, "y")
    assert_close(pool[1:4], s2, 1e-6, "state in the pool")
