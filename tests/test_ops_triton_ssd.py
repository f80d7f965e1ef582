"""The Triton SSD kernels (backend="triton") against the reference twins: `ssd` (outputs, final states, every
gradient) and `ssd_state_update`, with groups, D per head and per channel, the z gate, dt bias / softplus /
limits, initial states, packed sequences (seq_idx) and lengths that are not a multiple of the chunk; and the
dispatch.

On a machine without a CUDA GPU they run under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, as
tests/test_ops_triton.py does for the Mamba-1 kernels: Triton reads the variable when triton is first imported
and when our kernels are decorated, so this module sets it around those imports and during its tests only. If
triton was already imported without it, the tests run in one pytest subprocess with the variable set
(test_in_fresh_interpreter_process). Block sizes are shrunk (TILES) so that tiny shapes span several blocks.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from functools import partial

import pytest
import torch

from mambakit import ops
from mambakit.ops.reference import ssd_ref, ssd_state_update_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@contextlib.contextmanager
def interpreting():
    """TRITON_INTERPRET=1 while kernels are decorated (without a GPU), then as it was."""
    old = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


with interpreting():
    triton = pytest.importorskip("triton", reason="Triton is not installed (pip install mambakit[triton])")
    import triton.language.standard

    # False when triton (or our kernels) were imported before without the interpreter: then the subprocess
    INTERPRETED = CUDA or type(triton.language.standard.sum).__name__ == "InterpretedFunction"
    if INTERPRETED:
        ssd_triton = importlib.import_module("mambakit.ops.triton.ssd")
        INTERPRETED = CUDA or type(ssd_triton._chunk_scan_kernel).__name__ == "InterpretedFunction"

ssd_tri = partial(ops.ssd, backend="triton")  # the kernels, through the checked entry point
step_tri = partial(ops.ssd_state_update, backend="triton")


@pytest.mark.skipif(INTERPRETED, reason="triton's interpreter is active in this process")
def test_in_fresh_interpreter_process():
    """This module's tests in a fresh process, where triton is first imported with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


@pytest.fixture(autouse=True)
def interpreter_mode(monkeypatch, request):
    """TRITON_INTERPRET=1 during each test (the interpreter consults it at run time too); small blocks."""
    if not INTERPRETED and request.node.name != "test_in_fresh_interpreter_process":
        pytest.skip("triton was imported without TRITON_INTERPRET: run by test_in_fresh_interpreter_process")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    if INTERPRETED:  # 16 (tl.dot's least) queries, keys and channels a block; 2 heads and 32 state elements
        monkeypatch.setattr(ssd_triton, "TILES", dict(BLOCK_M=16, BLOCK_P=16, BLOCK_H=2, BLOCK_PN=32))


# ------------------------------------------------------------------------------------------------ helpers
def assert_close(a, b, tol, what=""):
    """max |a − b| ≤ tol · max(1, max |b|)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not b.numel():
        return
    scale = max(1.0, b.double().abs().max().item())
    err = (a.double().cpu() - b.double().cpu()).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:.1g} × {scale:.3g}"


def make_inputs(b, l, h, p, g, n, dtype=torch.float32, *, D="head", z=True, bias=True, h0=True, softplus=True,
                seed=0):  # fmt: skip
    """Random inputs in a Mamba-2 layer's ranges; A, D, dt_bias, initial_states float32 (as in the model)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale + shift).to(dt).to(DEVICE)

    f32 = torch.float32
    Ds = {"head": (h,), "channel": (h, p), None: None}[D]
    return dict(
        x=r(b, l, h, p),
        dt=r(b, l, h, scale=0.5, shift=-1.0) if softplus else r(b, l, h).abs().mul(0.1).add(0.01).to(dtype),
        A=-torch.exp(r(h, scale=0.5, shift=0.5, dt=f32)),
        B=r(b, l, g, n),
        C=r(b, l, g, n),
        D=r(*Ds, dt=f32) if Ds else None,
        z=r(b, l, h, p) if z else None,
        dt_bias=r(h, scale=0.3, dt=f32).abs() if bias else None,
        initial_states=r(b, h, p, n, dt=f32) if h0 else None,
    )


def packed(b, l, cuts, first=0):
    """seq_idx (b, l): sequence first, first + 1, … starting at each cut."""
    s = torch.full((b, l), first, dtype=torch.int64)
    for i, c in enumerate(cuts):
        s[:, c:] = first + i + 1
    return s.to(DEVICE)


def run_with_grads(fn, inputs, seed=1, **kw):
    """y, the final states and the gradients of a random projection of both w.r.t. every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y, s = fn(**{k: leaves.get(k) for k in inputs}, return_final_states=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)
    gs = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.device)
    grads = torch.autograd.grad((y.double() * gy).sum() + (s.double() * gs).sum(), list(leaves.values()))
    return y.detach(), s.detach(), dict(zip(leaves, grads))


TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # relative to max(1, max |ref|)


# ------------------------------------------------------------------------------------------------ ssd
# (b, l, h, p, g, n, chunk, D, z, dt_bias, h0, softplus, dt_limit, seq_idx cuts or None)
SSD_CASES = [
    (2, 13, 4, 3, 2, 5, 4, "channel", True, True, True, True, None, None),  # g > 1, l % chunk ≠ 0
    (1, 20, 2, 4, 1, 3, 8, "head", True, False, True, True, None, (5, 16)),  # packed; a cut on a chunk edge
    (2, 9, 3, 2, 3, 4, 16, None, False, False, False, False, None, None),  # bare; one chunk longer than l
    (1, 17, 4, 2, 2, 6, 5, "head", False, True, True, True, (0.05, 0.3), (3,)),  # dt_limit; chunk 5
    (1, 40, 2, 20, 1, 4, 32, "channel", True, True, True, True, None, None),  # 2 query and 2 channel blocks
    (1, 1, 2, 2, 1, 2, 4, "head", True, True, True, True, None, None),  # l = 1
]


@pytest.mark.parametrize("case", SSD_CASES, ids=lambda c: "b{}l{}h{}p{}g{}n{}Q{}".format(*c[:7]))
def test_ssd_matches_reference(case):
    b, l, h, p, g, n, Q, D, z, bias, h0, softplus, limit, cuts = case
    inputs = make_inputs(b, l, h, p, g, n, D=D, z=z, bias=bias, h0=h0, softplus=softplus)
    kw = dict(chunk_size=Q, dt_softplus=softplus, seq_idx=packed(b, l, cuts) if cuts else None)
    if limit:
        kw["dt_limit"] = limit
    y1, s1, g1 = run_with_grads(ssd_tri, inputs, **kw)
    y2, s2, g2 = run_with_grads(ssd_ref, inputs, **kw)
    assert y1.dtype == torch.float32 and s1.dtype == torch.float32
    assert_close(y1, y2, TOL[torch.float32], "y")
    assert_close(s1, s2, TOL[torch.float32], "final states")
    assert g1.keys() == g2.keys()
    for k in g2:
        assert g1[k].dtype == g2[k].dtype, k
        assert_close(g1[k], g2[k], TOL[torch.float32], f"d{k}")


@pytest.mark.parametrize("lengths", [[5, 0, 9, 6], [0, 13], [7]], ids=lambda ls: "-".join(map(str, ls)))
def test_ssd_cu_seqlens_varlen_states(lengths):
    """cu_seqlens (batch 1): outputs, the row's final state and the state after each sequence's last token
    (return_varlen_states, forward only as in the official op) equal the reference's, which the CPU tests check
    against separate runs; empty sequences keep their starting state."""
    l = sum(lengths)
    inputs = make_inputs(1, l, 4, 3, 2, 5, D="channel")
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=DEVICE)
    kw = dict(chunk_size=4, dt_softplus=True, cu_seqlens=cu, return_final_states=True, return_varlen_states=True)
    with torch.no_grad():
        y1, s1, v1 = ssd_tri(**inputs, **kw)
    y2, s2, v2 = ops.ssd(**inputs, **kw, backend="reference")
    assert v1.shape == (len(lengths), 4, 3, 5) and v1.dtype == torch.float32
    assert_close(y1, y2, TOL[torch.float32], "y")
    assert_close(s1, s2, TOL[torch.float32], "final states")
    assert_close(v1, v2, TOL[torch.float32], "varlen states")
    # without the varlen states, cu_seqlens is seq_idx: the differentiable path, gradients as the reference's
    y3, s3, g3 = run_with_grads(ssd_tri, inputs, chunk_size=4, dt_softplus=True, cu_seqlens=cu)
    y4, s4, g4 = run_with_grads(ssd_ref, inputs, chunk_size=4, dt_softplus=True,
                                seq_idx=ops.seq_idx_from_cu_seqlens(cu, l))
    assert_close(y3, y4, TOL[torch.float32], "y with gradients")
    for k in g4:
        assert_close(g3[k], g4[k], TOL[torch.float32], f"d{k}")


def test_ssd_varlen_states_refuse_autograd():
    inputs = make_inputs(1, 6, 2, 2, 1, 3)
    x = inputs.pop("x").clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="forward only"):
        ssd_tri(x, **inputs, cu_seqlens=torch.tensor([0, 2, 6], device=DEVICE), return_varlen_states=True)


def test_ssd_row_starting_in_another_sequence():
    """initial_states feeds seq_idx 0 only: a row whose first token has seq_idx 2 starts from zero."""
    inputs = make_inputs(2, 11, 2, 3, 1, 4)
    seq = torch.stack([packed(1, 11, (4,), first=0)[0], packed(1, 11, (6,), first=2)[0]])
    kw = dict(chunk_size=4, dt_softplus=True, seq_idx=seq)
    y1, s1, g1 = run_with_grads(ssd_tri, inputs, **kw)
    y2, s2, g2 = run_with_grads(ssd_ref, inputs, **kw)
    assert_close(y1, y2, TOL[torch.float32], "y")
    assert_close(s1, s2, TOL[torch.float32], "final states")
    assert not g1["initial_states"][1].any()
    for k in g2:
        assert_close(g1[k], g2[k], TOL[torch.float32], f"d{k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ssd_half_precision(dtype):
    """bf16/fp16 inputs: float32 accumulation and states, y and gradients in the inputs' dtypes; against the
    reference on the same rounded inputs (which computes in float32)."""
    inputs = make_inputs(1, 19, 4, 3, 2, 5, dtype, D="channel")
    kw = dict(chunk_size=8, dt_softplus=True)
    y1, s1, g1 = run_with_grads(ssd_tri, inputs, **kw)
    y2, s2, g2 = run_with_grads(ssd_ref, inputs, **kw)
    assert y1.dtype == dtype and s1.dtype == torch.float32
    assert_close(y1, y2, TOL[dtype], "y")
    assert_close(s1, s2, TOL[dtype], "final states")
    for k in g2:
        assert g1[k].dtype == inputs[k].dtype, k
        assert_close(g1[k], g2[k], TOL[dtype], f"d{k}")


def test_ssd_in_pieces_equals_one_call():
    """A sequence run in two calls, the first's final states the second's initial states."""
    x = make_inputs(2, 14, 2, 3, 1, 4, h0=False)
    common = dict(A=x["A"], D=x["D"], dt_bias=x["dt_bias"], dt_softplus=True, chunk_size=4, return_final_states=True)
    y, s = ssd_tri(x["x"], x["dt"], B=x["B"], C=x["C"], z=x["z"], **common)
    parts = [{k: x[k][:, sl] for k in ("x", "dt", "B", "C", "z")} for sl in (slice(None, 5), slice(5, None))]
    ya, sa = ssd_tri(**parts[0], **common)
    yb, sb = ssd_tri(**parts[1], initial_states=sa, **common)
    assert_close(torch.cat([ya, yb], 1), y, 1e-5, "y")
    assert_close(sb, s, 1e-5, "final states")


def wider(t, lead, pad):
    """(wide, view): t as the model passes it, a column slice of a wider (…, lead dims, channels) tensor with
    `pad` more columns on each side; its trailing dims are a view of the slice (dense within a step, strided
    between steps). wide is a leaf, for gradients."""
    flat = t.reshape(*t.shape[:lead], -1)
    extra = torch.randn(*flat.shape[:-1], pad, dtype=t.dtype, device=t.device)
    wide = torch.cat([extra, flat, extra], dim=-1).requires_grad_()
    return wide, wide[..., pad: pad + flat.shape[-1]].view(t.shape)


def test_ssd_reads_views():
    """The model's views (x, dt, B, C: slices of one projection, each its own strides here) are read in place
    through their strides; z here has trailing dims that are not dense and is copied first. Results and
    gradients as with contiguous inputs, none in the columns around the slices."""
    x = make_inputs(2, 9, 2, 3, 1, 4)
    wides, views = {}, dict(x)
    for pad, k in enumerate(("x", "dt", "B", "C"), start=1):
        wides[k], views[k] = wider(x[k], 2, pad)
        assert not views[k].is_contiguous() and views[k][0, 0].is_contiguous()
    zw = torch.cat([x["z"], torch.randn_like(x["z"])], dim=-1).requires_grad_()
    views["z"] = zw[..., :3]
    assert not views["z"][0, 0].is_contiguous()
    kw = dict(chunk_size=4, dt_softplus=True)
    y1, s1 = ssd_tri(**views, return_final_states=True, **kw)
    y2, s2, g2 = run_with_grads(ssd_ref, x, **kw)
    assert_close(y1.detach(), y2, TOL[torch.float32], "y")
    assert_close(s1.detach(), s2, TOL[torch.float32], "final states")
    gen = torch.Generator().manual_seed(1)  # the projection run_with_grads uses
    gy = torch.randn(y1.shape, generator=gen, dtype=torch.float64).to(y1.device)
    gs = torch.randn(s1.shape, generator=gen, dtype=torch.float64).to(s1.device)
    grads = torch.autograd.grad((y1.double() * gy).sum() + (s1.double() * gs).sum(), [*wides.values(), zw])
    for pad, (k, g) in enumerate(zip(wides, grads), start=1):
        width = x[k][0, 0].numel()
        assert_close(g[..., pad: pad + width].reshape(x[k].shape), g2[k], TOL[torch.float32], f"d{k}")
        assert not g[..., :pad].any() and not g[..., pad + width:].any(), f"d{k} outside the slice"
    assert_close(grads[-1][..., :3], g2["z"], TOL[torch.float32], "dz")
    assert not grads[-1][..., 3:].any()


def test_ssd_saves_chunk_states_not_step_states():
    """For the backward the forward keeps the states entering each chunk, (b, c, h, p, n), never one per step
    (b, l, h, p, n); y alone (final states unused) and the final states alone (y unused) backpropagate."""
    b, l, h, p, g, n, Q = 1, 12, 2, 3, 1, 4, 4
    leaves = {k: v.requires_grad_() for k, v in make_inputs(b, l, h, p, g, n).items() if v is not None}
    y = ssd_tri(**leaves, chunk_size=Q, dt_softplus=True)
    saved = [tuple(t.shape) for t in y.grad_fn.saved_tensors if t is not None and t.dim() == 5]
    assert saved == [(b, -(-l // Q), h, p, n)]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device)
    got = torch.autograd.grad((y * gy).sum(), list(leaves.values()))
    want = torch.autograd.grad((ssd_ref(**leaves, dt_softplus=True) * gy).sum(), list(leaves.values()))
    for k, g1, g2 in zip(leaves, got, want):
        assert_close(g1, g2, TOL[torch.float32], f"d{k}")
    kw = dict(chunk_size=Q, dt_softplus=True, return_final_states=True)
    got = torch.autograd.grad(ssd_tri(**leaves, **kw)[1].sum(), list(leaves.values()), allow_unused=True)
    want = torch.autograd.grad(ssd_ref(**leaves, **kw)[1].sum(), list(leaves.values()), allow_unused=True)
    for k, g1, g2 in zip(leaves, got, want):  # C, D, z do not reach the state: zeros here, None there
        assert_close(g1, torch.zeros_like(g1) if g2 is None else g2, TOL[torch.float32], f"d{k} (state only)")


def test_ssd_in_inference_saves_nothing(monkeypatch):
    """Under no_grad nothing is saved for a backward, though the inputs require grad; y is the same."""
    from torch.autograd.function import FunctionCtx

    saved = []
    original = FunctionCtx.save_for_backward
    monkeypatch.setattr(FunctionCtx, "save_for_backward", lambda ctx, *t: saved.append(len(t)) or original(ctx, *t))
    leaves = {k: v.requires_grad_() for k, v in make_inputs(1, 7, 2, 2, 1, 3).items() if v is not None}
    with torch.no_grad():
        y0 = ssd_tri(**leaves, chunk_size=4)
    assert saved == []
    y1 = ssd_tri(**leaves, chunk_size=4)
    assert len(saved) == 1 and torch.equal(y0, y1.detach())


# ----------------------------------------------------------------------------------- the decoding step
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_step_matches_reference_and_ssd(state_dtype):
    """Token by token against ssd_state_update_ref (g > 1, D per channel, z, dt bias, softplus and limits);
    the float32 state after the steps equals ssd's final states from the same start."""
    b, h, p, g, n, steps = 2, 4, 3, 2, 5, 4
    x = make_inputs(b, steps, h, p, g, n, D="channel")
    s1 = x["initial_states"].to(state_dtype).clone()
    s2 = s1.clone()
    common = dict(A=x["A"], D=x["D"], dt_bias=x["dt_bias"], dt_softplus=True, dt_limit=(0.05, 0.6))
    for t in range(steps):
        step = {k: x[k][:, t] for k in ("x", "dt", "B", "C", "z")}
        y1 = step_tri(s1, **step, **common)
        y2 = ssd_state_update_ref(s2, **step, **common)
        assert y1.dtype == torch.float32
        assert_close(y1, y2, TOL[state_dtype], f"y at step {t}")
        assert_close(s1, s2, TOL[state_dtype], f"state at step {t}")
    if state_dtype == torch.float32:
        _, s = ssd_ref(x["x"], x["dt"], B=x["B"], C=x["C"], z=x["z"], initial_states=x["initial_states"],
                       return_final_states=True, **common)  # fmt: skip
        assert_close(s1, s, TOL[torch.float32], "state vs ssd")


def test_step_without_options_and_strided_state():
    """No options; a strided state (updated in place through a copy) and inputs that are slices of wider
    tensors (read in place)."""
    b, h, p, g, n = 2, 3, 2, 1, 4
    x = make_inputs(b, 1, h, p, g, n, D=None, z=False, bias=False, softplus=False)
    big = torch.randn(b, h, p, n + 3, device=DEVICE)
    s1 = big[..., :n]
    s2 = s1.clone()
    step = {k: x[k][:, 0] for k in ("x", "dt", "B", "C")}
    y1 = step_tri(s1, A=x["A"], **{k: wider(v, 1, i + 1)[1].detach() for i, (k, v) in enumerate(step.items())})
    y2 = ssd_state_update_ref(s2, A=x["A"], **step)
    assert_close(y1, y2, TOL[torch.float32], "y")
    assert_close(big[..., :n], s2, TOL[torch.float32], "state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_half_precision(dtype):
    x = make_inputs(2, 1, 4, 3, 2, 5, dtype, D="head")
    s1 = x["initial_states"].clone()
    s2 = s1.clone()
    step = {k: x[k][:, 0] for k in ("x", "dt", "B", "C", "z")}
    y1 = step_tri(s1, A=x["A"], D=x["D"], dt_bias=x["dt_bias"], dt_softplus=True, **step)
    y2 = ssd_state_update_ref(s2, A=x["A"], D=x["D"], dt_bias=x["dt_bias"], dt_softplus=True, **step)
    assert y1.dtype == dtype
    assert_close(y1, y2, TOL[dtype], "y")
    assert_close(s1, s2, TOL[torch.float32], "state")


# --------------------------------------------------------------------------------------------- dispatch
def test_empty_batch():
    """b = 0: nothing to launch; empty results of the right shapes."""
    x = make_inputs(0, 5, 2, 3, 1, 4)
    y, s = ssd_tri(**x, chunk_size=4, return_final_states=True)
    assert y.shape == (0, 5, 2, 3) and s.shape == (0, 2, 3, 4)
    step = {k: x[k][:, 0] for k in ("x", "dt", "B", "C", "z")}
    assert step_tri(x["initial_states"].clone(), A=x["A"], **step).shape == (0, 2, 3)


def test_dispatch(monkeypatch):
    """backend='triton' through the public ops: CPU tensors only under the interpreter, no float64; backend=None
    picks Triton for CUDA tensors when it is installed (a stand-in CUDA tensor) and the chunked path otherwise."""
    x = make_inputs(1, 5, 2, 2, 1, 2)
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            ops.ssd(**x, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert ops._ssd_implementation("ssd", None, x["x"]).__name__ == "ssd_cpu"  # CPU default unchanged
    with pytest.raises(ValueError, match="float32"):
        ops.ssd(**{k: v.double() if v is not None else None for k, v in x.items()}, backend="triton")

    class FakeCuda:
        device = torch.device("cuda")
        dtype = torch.float32

    assert ops._ssd_implementation("ssd", None, FakeCuda()).__name__ == "ssd_triton"
    assert ops._ssd_implementation("ssd_state_update", None, FakeCuda()).__name__ == "ssd_state_update_triton"
    f64 = FakeCuda()
    f64.dtype = torch.float64
    assert ops._ssd_implementation("ssd", None, f64).__name__ == "ssd_cpu"
    monkeypatch.setattr(ops, "_triton_available", lambda: False)
    assert ops._ssd_implementation("ssd", None, FakeCuda()).__name__ == "ssd_cpu"
    with pytest.raises(ImportError, match=r"mambakit\[triton\]"):
        ops._ssd_implementation("ssd", "triton", FakeCuda())
