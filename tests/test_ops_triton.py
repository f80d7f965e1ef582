"""The Triton kernels (backend="triton") against the reference ops: the selective scan (outputs, final state,
every gradient), the causal conv (forward, backward, states), the single decoding steps, and the dispatch.

On a machine without a CUDA GPU they run under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors: the
same kernel code, executed op by op in numpy. Triton reads the variable when it decorates a function: its own
library (tl.sum, …) when triton is first imported, our kernels when mambakit.ops.triton.* is imported. This
module sets it around those imports and during its tests only, so other tests are unaffected. If triton was
already imported without it (another test module imported it first), this module's tests run instead in one
pytest subprocess with the variable set (test_in_fresh_interpreter_process).
Shapes are small and tiles are shrunk (TILES) so that a few steps and channels already span several tiles
and channel blocks.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

from mambakit import ops
from mambakit.ops.reference import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
)

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

    # False when triton (or our kernels) were imported before, without the interpreter: then the subprocess
    INTERPRETED = CUDA or type(triton.language.standard.sum).__name__ == "InterpretedFunction"
    if INTERPRETED:
        scan_triton, conv_triton, step_triton = (
            importlib.import_module(f"mambakit.ops.triton.{m}") for m in ("scan", "conv", "step")
        )
        INTERPRETED = CUDA or type(scan_triton._scan_fwd_kernel).__name__ == "InterpretedFunction"


# the kernels, through the checked entry point (the only way in); the modules above are for their tile sizes
scan_tri = partial(ops.selective_scan, backend="triton")
conv_tri = partial(ops.causal_conv1d, backend="triton")
state_update_tri = partial(ops.selective_state_update, backend="triton")
conv_update_tri = partial(ops.causal_conv1d_update, backend="triton")


def _interpreter_runs_loops() -> bool:
    """Triton's interpreter before 3.8 fails on `for i in range(runtime_int)` with numpy >= 2.4 (it calls
    int() on a 1-element array); the kernels loop over tiles that way."""
    import triton.language as tl

    def probe(out_ptr, count):
        acc = tl.zeros((2,), tl.float32)
        for _ in range(count):
            acc += 1.0
        tl.store(out_ptr + tl.arange(0, 2), acc)

    with interpreting():
        probe = triton.jit(probe)
    out = torch.zeros(2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "1")
            probe[(1,)](out, 3)
    except Exception:
        return False
    return bool((out == 3).all())


if INTERPRETED and not CUDA and not _interpreter_runs_loops():
    pytest.skip(
        f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime count with numpy "
        f"{np.__version__} (fixed in Triton 3.8): pip install 'triton>=3.8' to test the kernels on CPU",
        allow_module_level=True,
    )


@pytest.mark.skipif(INTERPRETED, reason="triton's interpreter is active in this process")
def test_in_fresh_interpreter_process():
    """This module's tests in a fresh process, where triton is first imported with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


# ----------------------------------------------------------------------------- a faster interpreter scan
def _sliced_scan(self, input):
    """Triton's interpreter runs tl.associative_scan one element at a time in Python (about 100 µs each); this
    runs the same sequential scan, in the same order, one slice along the scan axis at a time (numpy over the
    other axes): 30-100× faster. test_sliced_scan_equals_interpreter_scan checks the two agree."""
    data = [np.moveaxis(x.handle.data, self.axis, 0) for x in input]
    out = [np.empty_like(a) for a in data]
    acc = [self.to_tensor(a[0], x.dtype) for a, x in zip(data, input)]
    for o, a in zip(out, acc):
        o[0] = a.handle.data
    for i in range(1, data[0].shape[0]):
        ret = self.combine_fn.fn(*acc, *[self.to_tensor(a[i], x.dtype) for a, x in zip(data, input)])
        acc = list(ret) if isinstance(ret, tuple) else [ret]
        for o, a in zip(out, acc):
            o[i] = a.handle.data
    return [self.to_tensor(np.moveaxis(o, 0, self.axis), x.dtype) for o, x in zip(out, input)]


from triton.runtime import interpreter as _interpreter  # noqa: E402

_INTERPRETER_SCAN = getattr(getattr(_interpreter, "ScanOps", None), "generic_scan", None)


@pytest.fixture(autouse=True)
def interpreter_mode(monkeypatch, request):
    """TRITON_INTERPRET=1 during each test (the interpreter consults it at run time too), and the faster scan."""
    if not INTERPRETED and request.node.name != "test_in_fresh_interpreter_process":
        pytest.skip("triton was imported without TRITON_INTERPRET: run by test_in_fresh_interpreter_process")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if _INTERPRETER_SCAN is not None:
            monkeypatch.setattr(_interpreter.ScanOps, "generic_scan", _sliced_scan)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 steps and 8 (forward) / 4 (backward) channels, a checkpoint every 2 tiles: several tiles,
    blocks and checkpoint intervals (the last one partial) on small shapes."""
    monkeypatch.setattr(scan_triton, "TILES", dict(BLOCK_T=4, FWD_D=8, BWD_D=4, CKPT_TILES=2))
    monkeypatch.setattr(conv_triton, "BLOCK_T", 8)
    monkeypatch.setattr(conv_triton, "BLOCK_D", 8)


# ------------------------------------------------------------------------------------------------ helpers
def assert_close(a, b, tol, what=""):
    """max |a − b| ≤ tol · max(1, max |b|)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not b.numel():
        return
    scale = max(1.0, b.double().abs().max().item())
    err = (a.double().cpu() - b.double().cpu()).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:.1g} × {scale:.3g}"


def make_inputs(b, l, d, n, dtype, *, D=True, z=True, bias=True, h0=True, softplus=True, seed=0):
    """Random scan inputs in a Mamba layer's ranges; A, D, delta_bias stay float32 (as in the model)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(dt).to(DEVICE)

    delta = r(b, l, d, scale=0.5, shift=-1.0) if softplus else r(b, l, d).abs().mul(0.1).add(0.01).to(dtype)
    return dict(
        u=r(b, l, d),
        delta=delta,
        A=-torch.exp(r(d, n, scale=0.5, dt=torch.float32)),
        B=r(b, l, n),
        C=r(b, l, n),
        D=r(d, dt=torch.float32) if D else None,
        z=r(b, l, d) if z else None,
        delta_bias=r(d, scale=0.3, dt=torch.float32).abs() if bias else None,
        initial_state=r(b, d, n, dt=torch.float32) if h0 else None,
    )


def scan_with_grads(fn, inputs, softplus, use_y=True, seed=1):
    """y, the final state and the gradients of a random projection of both w.r.t. every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y, h = fn(**{k: leaves.get(k) for k in inputs}, delta_softplus=softplus, return_final_state=True)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.device)
    loss = (h.double() * gh).sum() + ((y.double() * gy).sum() if use_y else 0)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=not use_y)  # C, D, z: unused by h
    grads = [torch.zeros_like(v) if gr is None else gr for v, gr in zip(leaves.values(), grads)]
    return y.detach(), h.detach(), dict(zip(leaves, grads))


# relative tolerances: outputs in the input dtype; gradients of bf16/fp16 inputs are rounded to them
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


# ------------------------------------------------------------------------------------------ the scan
SCAN_CASES = [  # (b, l, d, n, D, z, bias, h0, softplus)
    (2, 13, 11, 5, True, True, True, True, True),  # every option; 4 tiles (last one partial), 2 + 3 blocks
    (1, 1, 3, 1, True, True, True, True, True),  # l = 1, n = 1
    (2, 9, 6, 4, False, False, False, False, False),  # the bare scan
    (1, 8, 9, 3, True, False, True, False, True),  # l a multiple of the tile
    (2, 10, 5, 2, False, True, False, True, False),
]


@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "b{}l{}d{}n{}".format(*c[:4]))
def test_scan_matches_reference(case, small_tiles):
    b, l, d, n, D, z, bias, h0, softplus = case
    inputs = make_inputs(b, l, d, n, torch.float32, D=D, z=z, bias=bias, h0=h0, softplus=softplus)
    y1, h1, g1 = scan_with_grads(scan_tri, inputs, softplus)
    y2, h2, g2 = scan_with_grads(selective_scan_ref, inputs, softplus)
    assert_close(y1, y2, TOL[torch.float32], "y")
    assert_close(h1, h2, TOL[torch.float32], "final state")
    assert h1.dtype == torch.float32 and y1.dtype == torch.float32
    assert g1.keys() == g2.keys()
    for k in g2:
        assert g1[k].dtype == g2[k].dtype, k
        assert_close(g1[k], g2[k], TOL[torch.float32], f"d{k}")


def test_scan_default_tiles():
    """The tile sizes the GPU uses (one tile per 32 steps here, n = 16)."""
    inputs = make_inputs(1, 40, 20, 16, torch.float32)
    y1, h1, g1 = scan_with_grads(scan_tri, inputs, True)
    y2, h2, g2 = scan_with_grads(selective_scan_ref, inputs, True)
    assert_close(y1, y2, TOL[torch.float32], "y")
    assert_close(h1, h2, TOL[torch.float32], "final state")
    for k in g2:
        assert_close(g1[k], g2[k], TOL[torch.float32], f"d{k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_half_precision(dtype, small_tiles):
    """bf16/fp16 inputs: float32 inside, outputs and gradients in the inputs' dtypes; compared with the
    reference on the same (rounded) inputs, which also computes in float32."""
    inputs = make_inputs(2, 11, 10, 4, dtype)
    y1, h1, g1 = scan_with_grads(scan_tri, inputs, True)
    y2, h2, g2 = scan_with_grads(selective_scan_ref, inputs, True)
    assert y1.dtype == dtype and h1.dtype == torch.float32
    assert_close(y1, y2, TOL[dtype], "y")
    assert_close(h1, h2, TOL[torch.float32], "final state")
    for k in g2:
        assert g1[k].dtype == inputs[k].dtype, k
        assert_close(g1[k], g2[k], TOL[dtype], f"d{k}")


def test_scan_gradient_from_final_state_only(small_tiles):
    """Only the final state is used (y gets no gradient): the backward starts from d(final state) alone."""
    inputs = make_inputs(2, 7, 9, 3, torch.float32)
    _, _, g1 = scan_with_grads(scan_tri, inputs, True, use_y=False)
    _, _, g2 = scan_with_grads(selective_scan_ref, inputs, True, use_y=False)
    for k in g2:
        assert_close(g1[k], g2[k], TOL[torch.float32], f"d{k}")


def test_scan_in_pieces_equals_one_call(small_tiles):
    """A sequence scanned in two calls, the first's final state passed as the second's initial state."""
    x = make_inputs(2, 14, 6, 3, torch.float32, h0=False)
    f = scan_tri
    common = dict(A=x["A"], D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True)
    y, h = f(x["u"], x["delta"], B=x["B"], C=x["C"], z=x["z"], return_final_state=True, **common)
    cut = 5
    parts = [
        {k: x[k][:, s] for k in ("u", "delta", "B", "C", "z")} for s in (slice(None, cut), slice(cut, None))
    ]
    ya, ha = f(**parts[0], return_final_state=True, **common)
    yb, hb = f(**parts[1], initial_state=ha, return_final_state=True, **common)
    assert_close(torch.cat([ya, yb], 1), y, 1e-6, "y")
    assert_close(hb, h, 1e-6, "final state")


def test_scan_and_conv_read_views(small_tiles):
    """Views as the model passes them (z, B, C: column slices of wider projections) are read in place through
    their strides; a view whose channels are not contiguous (u here) is copied first. Results as with
    contiguous inputs, gradients included."""
    x = make_inputs(2, 9, 6, 3, torch.float32)
    views = dict(x)
    for k in ("delta", "z", "B", "C"):
        v = x[k]
        views[k] = torch.cat([v, torch.randn_like(v)], dim=-1)[..., : v.shape[-1]]  # time stride 2·width
        assert not views[k].is_contiguous() and views[k].stride(-1) == 1
    views["u"] = x["u"].transpose(1, 2).contiguous().transpose(1, 2)  # channel stride l
    y1, h1, g1 = scan_with_grads(scan_tri, views, True)
    y2, h2, g2 = scan_with_grads(selective_scan_ref, x, True)
    assert_close(y1, y2, TOL[torch.float32], "y")
    assert_close(h1, h2, TOL[torch.float32], "final state")
    for k in g2:
        assert_close(g1[k], g2[k], TOL[torch.float32], f"d{k}")
    xc = torch.randn(2, 11, 12, device=DEVICE)
    wc, bc = torch.randn(6, 4, device=DEVICE), torch.randn(6, device=DEVICE)
    half = xc[..., :6].clone().requires_grad_()
    view = xc.clone().requires_grad_()
    y1, f1 = conv_tri(view[..., :6], wc, bc, return_final_state=True, activation="silu")
    y2, f2 = causal_conv1d_ref(half, wc, bc, return_final_state=True, activation="silu")
    assert_close(y1, y2, TOL[torch.float32], "conv y")
    assert_close(f1, f2, 0, "conv final state")
    gy = torch.randn(y2.shape, device=DEVICE)
    (dv,) = torch.autograd.grad((y1 * gy).sum(), [view])
    (dh,) = torch.autograd.grad((y2 * gy).sum(), [half])
    assert_close(dv[..., :6], dh, TOL[torch.float32], "conv dx")
    assert not dv[..., 6:].any()


@pytest.mark.parametrize("ckpt_tiles", [1, 2, 3])
def test_scan_saves_checkpoint_states_only(ckpt_tiles, small_tiles):
    """The backward keeps the state every CKPT_TILES tiles, (b, l / (BLOCK_T·CKPT_TILES), d, n), never one per
    step, whatever the interval (the backward recomputes each interval's tile starts: gradients unchanged)."""
    scan_triton.TILES["CKPT_TILES"] = ckpt_tiles
    inputs = make_inputs(1, 17, 4, 2, torch.float32)
    y1, _, g1 = scan_with_grads(scan_tri, inputs, True)
    _, _, g2 = scan_with_grads(selective_scan_ref, inputs, True)
    for k in g2:
        assert_close(g1[k], g2[k], TOL[torch.float32], f"d{k}")
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    y = scan_tri(**leaves, delta_softplus=True)
    saved = [t for t in y.grad_fn.saved_tensors if t.dim() == 4]
    assert [tuple(t.shape) for t in saved] == [(1, -(-17 // (4 * ckpt_tiles)), 4, 2)]


def test_scan_in_inference_saves_nothing(monkeypatch, small_tiles):
    """Under no_grad the scan writes no checkpoint states and saves nothing, though its inputs require grad
    (autograd still marks them in ctx.needs_input_grad); with grad it saves, and y is the same."""
    from torch.autograd.function import FunctionCtx

    saved = []
    original = FunctionCtx.save_for_backward
    monkeypatch.setattr(FunctionCtx, "save_for_backward", lambda ctx, *t: saved.append(len(t)) or original(ctx, *t))
    inputs = make_inputs(1, 17, 4, 2, torch.float32)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        y0 = scan_tri(**leaves, delta_softplus=True)
    assert saved == []
    y1 = scan_tri(**leaves, delta_softplus=True)
    assert len(saved) == 1 and torch.equal(y0, y1.detach())


def test_sliced_scan_equals_interpreter_scan():
    """The test-speed scan above against Triton's own interpreter scan, on both combine functions the kernels
    use, forwards and in reverse."""
    if CUDA or _INTERPRETER_SCAN is None:
        pytest.skip("the interpreter's scan is only used without a GPU")
    import triton
    import triton.language as tl

    def kernel(a_ptr, b_ptr, o_ptr, T: tl.constexpr, K: tl.constexpr, REVERSE: tl.constexpr):
        off = tl.arange(0, T)[:, None] * K + tl.arange(0, K)[None, :]
        a = tl.load(a_ptr + off)
        b = tl.load(b_ptr + off)
        one = tl.full((T, K), 1.0, tl.float32)
        zero = tl.zeros((T, K), tl.float32)
        ca, cb = tl.associative_scan((a, b), 0, scan_triton._compose, reverse=REVERSE)
        _, _, ea, eb = tl.associative_scan((a, b, one, zero), 0, scan_triton._compose_excl, reverse=REVERSE)
        tl.store(o_ptr + off, ca)
        tl.store(o_ptr + T * K + off, cb)
        tl.store(o_ptr + 2 * T * K + off, ea)
        tl.store(o_ptr + 3 * T * K + off, eb)

    with interpreting():
        kernel = triton.jit(kernel)
    a, b = torch.rand(8, 4), torch.randn(8, 4)
    for reverse in (False, True):
        results = []
        for scan in (_INTERPRETER_SCAN, _sliced_scan):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_interpreter.ScanOps, "generic_scan", scan)
                out = torch.empty(4, 8, 4)
                kernel[(1,)](a, b, out, 8, 4, reverse)
            results.append(out)
        assert torch.equal(results[0], results[1])
        # and both are the recurrence h_t = a_t h_{t−1} + b_t (reversed: from the end), inclusive and exclusive
        h, ex, inc = torch.zeros(4), torch.empty(8, 4), torch.empty(8, 4)
        for t in range(7, -1, -1) if reverse else range(8):
            ex[t] = h
            h = a[t] * h + b[t]
            inc[t] = h
        assert torch.allclose(results[0][1], inc, atol=1e-6) and torch.allclose(results[0][3], ex, atol=1e-6)


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Every kernel compiles for sm_90 (H100/H200) without spilling registers, with Triton's bundled ptxas and
    no GPU: what the interpreter does not check (types, layouts, register allocation). About a minute."""
    import pathlib

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton build has no NVIDIA backend (ptxas)")
    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(script), "--compile-only", "--compile-dtypes", "bfloat16,float32"],
                       env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0 and "all kernels compiled" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith(("scan", "conv", "state"))]
    assert len(rows) == 18 and all(row[-2] == "0" for row in rows), r.stdout  # spill bytes


# ------------------------------------------------------------------------------------------ the conv
CONV_CASES = [  # (b, l, d, w, bias, init, silu)
    (2, 19, 11, 4, True, True, True),
    (1, 2, 5, 4, False, True, False),  # l < w − 1: the final state mixes initial state and input
    (2, 9, 3, 3, True, False, True),
    (1, 6, 4, 1, True, False, False),  # w = 1: no state
    (2, 7, 6, 4, True, "float32", True),  # a float32 state with other inputs (as a bf16 model passes it)
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "b{}l{}d{}w{}".format(*c[:4]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_matches_reference(case, dtype, small_tiles):
    b, l, d, w, bias, init, silu = case
    g = torch.Generator().manual_seed(0)

    def r(*s, dt=dtype):
        return torch.randn(*s, generator=g).to(dt).to(DEVICE)

    inputs = dict(
        x=r(b, l, d), weight=r(d, w, dt=torch.float32), bias=r(d, dt=torch.float32) if bias else None,
        initial_state=r(b, d, w - 1, dt=torch.float32 if init == "float32" else dtype) if init else None,
    )  # fmt: skip
    act = "silu" if silu else None
    results = []
    for fn in (conv_tri, causal_conv1d_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
        y, fin = fn(**{k: leaves.get(k) for k in inputs}, return_final_state=True, activation=act)
        gg = torch.Generator().manual_seed(1)
        loss = (y.double() * torch.randn(y.shape, generator=gg, dtype=torch.float64)).sum()
        loss = loss + (fin.double() * torch.randn(fin.shape, generator=gg, dtype=torch.float64)).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        results.append((y.detach(), fin.detach(), dict(zip(leaves, grads))))
    (y1, f1, g1), (y2, f2, g2) = results
    tol = TOL[dtype]
    assert y1.dtype == dtype and f1.dtype == f2.dtype
    assert_close(y1, y2, tol, "y")
    assert_close(f1, f2, 0, "final state")
    for k in g2:
        assert g1[k].dtype == g2[k].dtype, k
        assert_close(g1[k], g2[k], tol, f"d{k}")


# ----------------------------------------------------------------------------------- the decoding steps
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_state_update_matches_reference_and_scan(state_dtype):
    b, d, n, steps = 3, 10, 5, 4
    x = make_inputs(b, steps, d, n, torch.float32)
    s1 = x["initial_state"].to(state_dtype).clone()
    s2 = s1.clone()
    common = dict(A=x["A"], D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True)
    for t in range(steps):
        step = {k: x[k][:, t] for k in ("u", "delta", "B", "C", "z")}
        y1 = state_update_tri(s1, **step, **common)
        y2 = selective_state_update_ref(s2, **step, **common)
        assert_close(y1, y2, TOL[state_dtype], f"y at step {t}")
        assert_close(s1, s2, TOL[state_dtype], f"state at step {t}")
    if state_dtype == torch.float32:  # stepping equals the scan from the same state
        y, h = selective_scan_ref(x["u"], x["delta"], B=x["B"], C=x["C"], z=x["z"], initial_state=x["initial_state"],
                                  return_final_state=True, **common)  # fmt: skip
        assert_close(s1, h, TOL[torch.float32], "state vs scan")


def test_state_update_without_options_and_strided_state():
    b, d, n = 2, 7, 3
    x = make_inputs(b, 1, d, n, torch.float32, D=False, z=False, bias=False, softplus=False)
    big = torch.randn(b, d, n + 2, device=DEVICE)
    s1 = big[..., :n]  # a non-contiguous view: updated in place through a copy
    s2 = s1.clone()
    step = {k: x[k][:, 0] for k in ("u", "delta", "B", "C")}
    y1 = state_update_tri(s1, A=x["A"], **step)
    y2 = selective_state_update_ref(s2, A=x["A"], **step)
    assert_close(y1, y2, TOL[torch.float32], "y")
    assert_close(big[..., :n], s2, TOL[torch.float32], "state")


@pytest.mark.parametrize("w", [4, 2, 1])
def test_conv_update_matches_reference(w):
    b, d = 3, 9
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(d, w, generator=g), torch.randn(d, generator=g)
    s1 = torch.randn(b, d, w - 1, generator=g)
    s2 = s1.clone()
    for t in range(3):
        x = torch.randn(b, d, generator=g)
        y1 = conv_update_tri(s1, x, weight, bias, "silu")
        y2 = causal_conv1d_update_ref(s2, x, weight, bias, "silu")
        assert_close(y1, y2, TOL[torch.float32], f"y at step {t}")
        assert torch.equal(s1, s2), f"state at step {t}"


# --------------------------------------------------------------------------------------------- dispatch
def test_dispatch_backend_triton(monkeypatch):
    """backend='triton' through the public ops; on CPU tensors only under the interpreter."""
    x = make_inputs(1, 5, 4, 2, torch.float32)
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            ops.selective_scan(**x, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    y1 = ops.selective_scan(**x, delta_softplus=True, backend="triton")
    assert_close(y1, selective_scan_ref(**x, delta_softplus=True), TOL[torch.float32], "y")
    xc = torch.randn(1, 5, 4, device=DEVICE)
    wc = torch.randn(4, 4, device=DEVICE)
    assert_close(ops.causal_conv1d(xc, wc, backend="triton"), causal_conv1d_ref(xc, wc), TOL[torch.float32], "conv")
    with pytest.raises(ValueError, match="float32"):
        ops.selective_scan(**{k: v.double() if v is not None else None for k, v in x.items()}, backend="triton")
    if not CUDA:  # CPU tensors still default to the numba kernels
        assert ops._resolve_backend("selective_scan", None, x["u"]) == "cpu"


def test_dispatch_default_for_cuda_tensors(monkeypatch):
    """backend=None picks Triton for CUDA tensors when it is installed, the reference for float64, and the
    reference with a one-time warning when Triton is missing (checked with a stand-in CUDA tensor)."""

    class FakeCuda:
        device = torch.device("cuda")
        dtype = torch.float32

    monkeypatch.setattr(ops, "_logged", set())
    assert ops._resolve_backend("selective_scan", None, FakeCuda()) == "triton"
    f64 = FakeCuda()
    f64.dtype = torch.float64
    assert ops._resolve_backend("selective_scan", None, f64) == "reference"
    monkeypatch.setattr(ops, "_triton_available", lambda: False)
    assert ops._resolve_backend("selective_scan", None, FakeCuda()) == "reference"
    with pytest.raises(ImportError, match=r"mambakit\[triton\]"):
        ops._resolve_backend("selective_scan", "triton", FakeCuda())


# ---------------------------------------------------------------------------------------------- the model
def test_model_on_triton_kernels(monkeypatch):
    """A small MambaLM with every op on the Triton kernels (on CPU, Triton's interpreter runs them) against the
    same model on the reference ops: logits, every parameter's gradient, the state after a prefix, and decoding
    steps from it. float32 (the kernels compute in float32, so the two agree closely), each tensor compared
    relative to its own largest entry: a zero or a wrong-scale gradient fails, and so would a Triton run that
    fell back to other kernels (the dispatch is recorded). Large tiles (few programs): the interpreter's cost is
    per program and op."""
    from mambakit import MambaConfig, MambaLM

    monkeypatch.setattr(scan_triton, "TILES", dict(BLOCK_T=16, FWD_D=64, BWD_D=64))
    monkeypatch.setattr(conv_triton, "BLOCK_T", 16)

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=50)).to(DEVICE)
    with torch.no_grad():  # away from the init (D = 1, zero biases), so that every parameter matters
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    ids = torch.randint(0, 50, (2, 21), device=DEVICE)  # 21 steps: two time tiles, the second partial
    used = set()
    implementation = ops._implementation

    def run(backend):
        def recorded(op, b, x):
            fn = implementation(op, backend, x)
            used.add((op, fn.__module__))
            return fn

        monkeypatch.setattr(ops, "_implementation", recorded)
        model.zero_grad()
        out = model(ids, labels=ids, return_state=True)
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        state = out.state
        with torch.no_grad():
            steps = [model.step(ids[:, t], state) for t in range(2)]
        return out.logits.detach(), grads, state, torch.stack(steps)

    logits1, grads1, state1, steps1 = run("triton")
    assert {m for _, m in used} == {"mambakit.ops.triton.scan", "mambakit.ops.triton.conv", "mambakit.ops.triton.step"}
    used.clear()
    logits2, grads2, state2, steps2 = run("reference")
    assert {m for _, m in used} == {"mambakit.ops.reference"}

    def close(a, b, what, tol=1e-4):
        scale = b.double().abs().max().item()
        assert scale > 0, f"{what}: the reference is all zeros"
        err = (a.double().cpu() - b.double().cpu()).abs().max().item()
        assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:.1g} × {scale:.3g}"

    close(logits1, logits2, "logits")
    assert grads1.keys() == grads2.keys()
    for k in grads2:
        close(grads1[k], grads2[k], f"gradient of {k}", tol=1e-3)  # through a loss, two layers, both passes
    close(state1.ssm, state2.ssm, "ssm state")
    close(state1.conv, state2.conv, "conv state")
    close(steps1, steps2, "decoding steps")
