"""The selective scan: the fused CPU kernel against the reference (outputs, final state, every gradient), the
reference against an independent closed form, gradcheck, chunking with state carry, single steps, numerical
safety, memory, and bad input."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from mambakit import ops
from mambakit.ops.reference import selective_scan_ref, selective_state_update_ref

# the fused kernels, through the checked entry point (the only way in)
scan_cpu = partial(ops.selective_scan, backend="cpu")
state_update_cpu = partial(ops.selective_state_update, backend="cpu")

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}  # max |a − b| / max(1, max |b|)


def assert_close(a, b, tol, what=""):
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:.1g} × {scale:.3g}"


def make_inputs(b, l, d, n, dtype=torch.float32, *, D=True, z=True, bias=True, h0=True, softplus=True, seed=0):
    """Random inputs in the ranges a Mamba layer sees; without softplus, delta is made positive (a step size)."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    return dict(
        u=r(b, l, d),
        delta=r(b, l, d, scale=0.5, shift=-1.0) if softplus else r(b, l, d).abs().mul(0.1).add(0.01).to(dtype),
        A=-torch.exp(r(d, n, scale=0.5)),  # negative, as −exp(A_log)
        B=r(b, l, n),
        C=r(b, l, n),
        D=r(d) if D else None,
        z=r(b, l, d) if z else None,
        delta_bias=r(d, scale=0.3) if bias else None,
        initial_state=r(b, d, n) if h0 else None,
    )


def run_with_grads(fn, inputs, softplus, seed=1):
    """y, final state and the gradient of a random projection of both w.r.t. every tensor input."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    y, h = fn(**args, delta_softplus=softplus, return_final_state=True)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    loss = (y.float() * gy.float()).sum() + (h.float() * gh.float()).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y.detach(), h.detach(), dict(zip(leaves, grads))


CASES = [  # (b, l, d, n, D, z, bias, h0, softplus)
    (2, 37, 70, 5, True, True, True, True, True),  # odd d across two channel blocks
    (1, 1, 3, 1, True, True, True, True, True),  # l = 1, n = 1
    (3, 130, 65, 16, False, False, False, False, False),  # the bare scan, 3 checkpoint chunks
    (2, 37, 64, 64, True, False, True, True, True),  # n = 64: short chunks
    (2, 50, 129, 7, False, True, False, True, False),
    (1, 300, 16, 2, True, True, True, False, True),  # n = 2: long chunks
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}l{}d{}n{}".format(*c[:4]))
def test_fused_matches_reference(case, dtype):
    b, l, d, n, D, z, bias, h0, softplus = case
    inputs = make_inputs(b, l, d, n, dtype, D=D, z=z, bias=bias, h0=h0, softplus=softplus)
    if not softplus and bias:
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    y1, h1, g1 = run_with_grads(scan_cpu, inputs, softplus)
    y2, h2, g2 = run_with_grads(selective_scan_ref, inputs, softplus)
    assert y1.dtype == dtype and y1.shape == (b, l, d) and h1.shape == (b, d, n)
    assert_close(y1, y2, TOL[dtype], "y")
    assert_close(h1, h2, TOL[dtype], "final state")
    assert g1.keys() == g2.keys()
    for k in g1:
        assert g1[k].dtype == inputs[k].dtype and g1[k].shape == inputs[k].shape
        assert_close(g1[k], g2[k], TOL[dtype], f"grad {k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_against_float32_reference(dtype):
    inputs = make_inputs(2, 40, 48, 8, dtype)
    y1, h1, g1 = run_with_grads(scan_cpu, inputs, True)
    as32 = {k: None if v is None else v.float() for k, v in inputs.items()}  # the same rounded values
    y2, h2, g2 = run_with_grads(selective_scan_ref, as32, True)
    assert y1.dtype == dtype and h1.dtype == torch.float32  # float32 state, as the accumulation
    assert_close(y1.float(), y2, 2e-2, "y")  # bf16 output rounding: 2^-8 relative
    assert_close(h1, h2, 1e-4, "final state")  # accumulated in float32
    for k in g1:
        assert g1[k].dtype == dtype
        assert_close(g1[k].float(), g2[k], 2e-2, f"grad {k}")


@pytest.mark.parametrize("with_z", [True, False])
def test_bfloat16_inputs_read_as_bits_equal_float32_rounded(with_z):
    """All-bf16 inputs go to the kernel as their 16 bits and y comes back rounded in the kernel: this must be
    bit for bit the float32 kernel on the same (exactly widened) values, rounded by torch."""
    inputs = make_inputs(2, 37, 150, 8, torch.bfloat16)  # d = 150: one full channel block and a partial one
    if not with_z:
        inputs["z"] = None
    as32 = {k: None if v is None else v.float() for k, v in inputs.items()}
    with torch.no_grad():
        y16, h16 = scan_cpu(**inputs, delta_softplus=True, return_final_state=True)
        y32, h32 = scan_cpu(**as32, delta_softplus=True, return_final_state=True)
    assert y16.dtype == torch.bfloat16 and h16.dtype == torch.float32
    assert torch.equal(y16.view(torch.int16), y32.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(h16, h32)


def test_bfloat16_rounding_in_kernel_matches_torch():
    """The kernel's float32 → bf16 rounding (round to nearest even) against torch's, on ties, carries into the
    exponent, the largest finite values, subnormals, overflow to inf and NaN."""
    specials = torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 1.0 + 2**-8 + 2**-9, 3.3895e38, -3.39e38,
                             1e-40, -1e-45, 3e38, float("inf")])
    u = torch.cat([specials, torch.randn(116) * 10.0 ** torch.randint(-30, 30, (116,)).float()])  # d = 128
    d = u.numel()
    D = torch.ones(d)
    D[10] = 2.0  # y = 6e38: overflows to inf in float32
    # Δ = 0 makes y = D·u (with u = inf, Δ·u = NaN: y is NaN), so the kernel's output is its rounding of D·u.
    args = dict(delta=torch.zeros(1, 1, d), B=torch.zeros(1, 1, 1), C=torch.zeros(1, 1, 1))
    y32 = scan_cpu(u=u.view(1, 1, d), A=-torch.ones(d, 1), D=D, **args).view(-1)
    assert torch.isinf(y32[10]) and torch.isnan(y32[11])
    as16 = {k: v.to(torch.bfloat16) for k, v in args.items()}
    y16 = scan_cpu(u=u.view(1, 1, d).to(torch.bfloat16), A=-torch.ones(d, 1), D=D, **as16).view(-1)
    # what the float32 kernel computes on the same (widened) values, rounded by torch
    want = scan_cpu(u=u.view(1, 1, d).to(torch.bfloat16).float(), A=-torch.ones(d, 1), D=D, **args)
    want = want.view(-1).to(torch.bfloat16)
    finite = ~torch.isnan(want)
    assert torch.isinf(want[10]) and not finite[11]
    assert torch.equal(y16.view(torch.int16)[finite], want.view(torch.int16)[finite])
    assert torch.equal(torch.isnan(y16), ~finite)


def test_reference_equals_closed_form_lti():
    """With Δ, B, C constant in time the scan is the convolution y_t = Σ_k C Ā^k B̄ u_{t−k} + D u_t (S4's
    kernel view, paper §2): an independent check of the specification."""
    d, n, l = 3, 4, 9
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, l, d, generator=g, dtype=torch.float64)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) - 0.1
    Bv, Cv = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    D = torch.randn(d, generator=g, dtype=torch.float64)
    dt = torch.full((1, l, d), 0.3, dtype=torch.float64)
    y = selective_scan_ref(u, dt, A, Bv.expand(1, l, n), Cv.expand(1, l, n), D)
    Abar = torch.exp(0.3 * A)  # (d, n)
    kernel = torch.stack([(Cv * Abar**k * 0.3 * Bv).sum(-1) for k in range(l)])  # (l, d)
    want = torch.stack([sum(kernel[k] * u[0, t - k] for k in range(t + 1)) for t in range(l)]) + D * u[0]
    torch.testing.assert_close(y[0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [scan_cpu, selective_scan_ref], ids=["cpu", "reference"])
def test_gradcheck_float64(fn):
    inputs = make_inputs(2, 6, 5, 3, torch.float64)
    names = list(inputs)
    leaves = [inputs[k].clone().requires_grad_() for k in names]

    def f(*xs):
        y, h = fn(**dict(zip(names, xs)), delta_softplus=True, return_final_state=True)
        return y, h

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_chunked_with_state_carry_equals_one_shot(backend):
    inputs = make_inputs(2, 100, 40, 8, torch.float32)
    y_all, h_all = ops.selective_scan(**inputs, delta_softplus=True, return_final_state=True, backend=backend)
    h = inputs["initial_state"]
    ys = []
    for t0, t1 in [(0, 1), (1, 33), (33, 34), (34, 100)]:
        piece = {k: v[:, t0:t1] if k in ("u", "delta", "z", "B", "C") else v for k, v in inputs.items()}
        piece["initial_state"] = h
        y, h = ops.selective_scan(**piece, delta_softplus=True, return_final_state=True, backend=backend)
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_all, 1e-5, "y")
    assert_close(h, h_all, 1e-5, "final state")


def test_gradient_flows_through_chunks_like_one_shot():
    """Stateful training: the gradient of a loss over two chunks, carried through the state, equals the
    one-shot gradient (fused kernel: initial_state and final_state are differentiable)."""
    inputs = make_inputs(1, 60, 24, 4, torch.float64)
    u = inputs["u"].clone().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k != "u"}
    y = ops.selective_scan(u, **rest, delta_softplus=True, backend="cpu")
    (g_one,) = torch.autograd.grad(y.pow(2).sum(), u)
    u2 = inputs["u"].clone().requires_grad_()
    halves = []
    h = rest["initial_state"]
    for t0, t1 in [(0, 25), (25, 60)]:
        piece = {k: v[:, t0:t1] if k in ("delta", "z", "B", "C") else v for k, v in rest.items()}
        piece["initial_state"] = h
        y, h = ops.selective_scan(u2[:, t0:t1], **piece, delta_softplus=True, return_final_state=True, backend="cpu")
        halves.append(y)
    (g_two,) = torch.autograd.grad(torch.cat(halves, 1).pow(2).sum(), u2)
    assert_close(g_two, g_one, 1e-10, "du")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_update_stepped_equals_scan(dtype):
    inputs = make_inputs(3, 20, 33, 6, dtype)
    y_scan, h_scan = ops.selective_scan(**inputs, delta_softplus=True, return_final_state=True)
    state = inputs["initial_state"].float().clone()
    ys = []
    for t in range(20):
        step = {k: inputs[k][:, t] for k in ("u", "delta", "B", "C", "z")}
        ys.append(ops.selective_state_update(state, **step, A=inputs["A"], D=inputs["D"],
                                             delta_bias=inputs["delta_bias"], delta_softplus=True))  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(torch.stack(ys, 1).float(), y_scan.float(), tol, "y")
    assert_close(state, h_scan, 1e-5, "state")


def test_numerically_safe_extremes():
    """Δ up to 20 after softplus, A down to −1e4: exp(ΔA) underflows to exactly 0, nothing is NaN/inf."""
    b, l, d, n = 1, 64, 20, 8
    inputs = make_inputs(b, l, d, n, torch.float32)
    inputs["delta"] = torch.full((b, l, d), 20.0)
    inputs["A"] = torch.full((d, n), -1e4)
    inputs["A"][:, 0] = -1e-4
    y1, h1, g1 = run_with_grads(scan_cpu, inputs, True)
    y2, h2, _ = run_with_grads(selective_scan_ref, inputs, True)
    for x in [y1, h1, *g1.values()]:
        assert torch.isfinite(x).all()
    assert_close(y1, y2, 1e-4, "y")
    # with exp(ΔA) = 0 the state is exactly the last input: h_T = Δ·B_T·u_T
    dt = F.softplus(inputs["delta"][0, -1] + inputs["delta_bias"])  # (d,)
    want = dt[:, None] * inputs["B"][0, -1][None, 1:] * inputs["u"][0, -1][:, None]
    torch.testing.assert_close(h1[0, :, 1:], want, rtol=1e-5, atol=1e-6)


def test_long_sequence_stays_finite_and_chunks_agree():
    """2^20 steps through the fused kernel: finite, and equal to two halves with the state carried."""
    b, l, d, n = 1, 1 << 20, 8, 4
    inputs = make_inputs(b, l, d, n, torch.float32, z=False, h0=False)
    y, h = ops.selective_scan(**inputs, delta_softplus=True, return_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    half = l // 2
    first = {k: v[:, :half] if k in ("u", "delta", "B", "C") else v for k, v in inputs.items()}
    second = {k: v[:, half:] if k in ("u", "delta", "B", "C") else v for k, v in inputs.items()}
    _, h_half = ops.selective_scan(**first, delta_softplus=True, return_final_state=True)
    second["initial_state"] = h_half
    y2, h2 = ops.selective_scan(**second, delta_softplus=True, return_final_state=True)
    assert_close(y2, y[:, half:], 1e-5, "second half")
    assert_close(h2, h, 1e-5, "final state")


_MEMORY_CHILD = """
import json, torch
from mambakit import ops
b, l, d, n = 1, 1 << 16, 256, 16
x = [torch.randn(b, l, d) for _ in range(3)]
A = -torch.rand(d, n) - 0.5; B = torch.randn(b, l, n); C = torch.randn(b, l, n)
small = [t[:, :8].clone().requires_grad_() for t in x]
ops.selective_scan(small[0], small[1], A, B[:, :8], C[:, :8], z=small[2], delta_softplus=True).sum().backward()
for t in x: t.requires_grad_()
def status_bytes(field):  # VmRSS: now; VmHWM: the high-water mark
    line = next(s for s in open('/proc/self/status').read().splitlines() if s.startswith(field + ':'))
    return int(line.split()[1]) * 1024
# the peak from here on: the warm-up's kernel compilation (LLVM, when the cache is cold) is not the scan's memory
open('/proc/self/clear_refs', 'w').write('5')
base = status_bytes('VmRSS')
y = ops.selective_scan(x[0], x[1], A, B, C, z=x[2], delta_softplus=True, backend='cpu')
y.backward(torch.ones_like(y))
peak = status_bytes('VmHWM')
print(json.dumps({"extra": peak - base, "state": b * l * d * n * 4}))
"""


def test_forward_backward_memory_is_not_b_l_d_n():
    """Peak extra memory of forward + backward at (1, 65536, 256, 16) stays far below one (b, l, d, n) float32
    tensor (1 GiB): states are checkpointed every chunk and recomputed (paper §3.3.2)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["extra"] < 0.5 * r["state"], r


# ------------------------------------------------------------------------------------------ dispatch, errors
def test_backend_choice_is_logged_once(caplog):
    inputs = make_inputs(1, 4, 4, 2)
    ops._logged.clear()
    with caplog.at_level(logging.DEBUG, logger="mambakit.ops"):
        ops.selective_scan(**inputs)
        ops.selective_scan(**inputs)
    msgs = [r.getMessage() for r in caplog.records if "selective_scan" in r.getMessage()]
    assert len(msgs) == 1 and "'cpu'" in msgs[0]


def test_autocast_does_not_lower_the_scan_precision():
    inputs = make_inputs(1, 30, 16, 4)
    want = ops.selective_scan(**inputs, delta_softplus=True, backend="reference")
    for backend in ("reference", "cpu"):
        with torch.autocast("cpu", torch.bfloat16):
            got = ops.selective_scan(**inputs, delta_softplus=True, backend=backend)
        assert got.dtype == torch.float32
        assert_close(got, want, 1e-5, backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.selective_scan(**make_inputs(1, 4, 4, 2), backend="cuda")


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(u=torch.randn(2, 5)), ValueError, r"u must have shape \(b, l, d\)"),
        (dict(delta=torch.randn(2, 5, 7)), ValueError, r"delta must have shape \(b, l, d\) = \(2, 5, 6\)"),
        (dict(A=torch.randn(5, 3)), ValueError, r"A must have shape \(d, n\) = \(6, \?\)"),
        (dict(B=torch.randn(2, 5, 4)), ValueError, r"B must have shape \(b, l, n\) = \(2, 5, 3\)"),
        (dict(C=torch.randn(2, 4, 3)), ValueError, r"C must have shape"),
        (dict(D=torch.randn(5)), ValueError, r"D must have shape \(d,\)"),
        (dict(z=torch.randn(1, 5, 6)), ValueError, r"z must have shape"),
        (dict(delta_bias=torch.randn(6, 1)), ValueError, r"delta_bias must have shape"),
        (dict(initial_state=torch.randn(2, 6, 4)), ValueError, r"initial_state must have shape \(b, d, n\)"),
        (dict(u=torch.randint(0, 3, (2, 5, 6))), TypeError, r"u must be float16, bfloat16, float32 or float64"),
        (dict(B=[[0.0]]), TypeError, r"B must be a torch.Tensor"),
        (dict(A=torch.full((6, 3), float("nan"))), ValueError, r"A contains NaN or inf"),
    ],
)
def test_bad_input_is_named(change, exc, match):
    inputs = make_inputs(2, 5, 6, 3)
    inputs.update(change)
    with pytest.raises(exc, match=match):
        ops.selective_scan(**inputs)


def test_state_update_bad_input():
    state = torch.zeros(2, 6, 3)
    step = dict(u=torch.randn(2, 6), delta=torch.randn(2, 6), A=-torch.rand(6, 3), B=torch.randn(2, 3), C=torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"state must have shape \(b, d, n\)"):
        ops.selective_state_update(torch.zeros(2, 6, 4), **step)
    with pytest.raises(ValueError, match=r"B must have shape \(b, n\)"):
        ops.selective_state_update(state, **{**step, "B": torch.randn(2, 4)})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b", [1, 16], ids=["serial", "parallel"])  # 16·70·130 states take the parallel kernel
def test_fused_state_update_matches_reference(dtype, b):
    inputs = make_inputs(b, 1, 70, 130, dtype)
    step = {k: inputs[k][:, 0] for k in ("u", "delta", "B", "C", "z")}
    rest = dict(A=inputs["A"], D=inputs["D"], delta_bias=inputs["delta_bias"], delta_softplus=True)
    s1, s2 = inputs["initial_state"].clone(), inputs["initial_state"].clone()
    y1 = state_update_cpu(s1, **step, **rest)
    y2 = selective_state_update_ref(s2, **step, **rest)
    assert_close(y1, y2, TOL[dtype], "y")
    assert_close(s1, s2, TOL[dtype], "state")


def test_fused_state_update_non_contiguous_state_is_updated_in_place():
    inputs = make_inputs(2, 1, 9, 4)
    step = {k: inputs[k][:, 0] for k in ("u", "delta", "B", "C")}
    base = inputs["initial_state"].transpose(1, 2).contiguous()  # (b, n, d)
    state = base.transpose(1, 2)  # a non-contiguous (b, d, n) view
    want = inputs["initial_state"].clone()
    y_ref = ops.selective_state_update(want, **step, A=inputs["A"], backend="reference")
    y = ops.selective_state_update(state, **step, A=inputs["A"], backend="cpu")
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(base.transpose(1, 2), want, 1e-5, "state seen through the caller's storage")


def test_kernels_leave_torch_thread_count_alone():
    """numba and torch share one OpenMP runtime; a kernel launch must not change torch's thread count."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        inputs = make_inputs(2, 8, 8, 4)
        ops.selective_scan(**inputs, backend="cpu")
        ops.selective_state_update(inputs["initial_state"].clone(), inputs["u"][:, 0], inputs["delta"][:, 0],
                                   inputs["A"], inputs["B"][:, 0], inputs["C"][:, 0], backend="cpu")  # fmt: skip
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_parameters_stay_resizable():
    """FSDP frees gathered parameters by resizing their storage to 0: kernels must not pin it."""
    inputs = make_inputs(1, 8, 8, 4)
    params = {k: torch.nn.Parameter(inputs[k].clone()) for k in ("A", "D", "delta_bias")}
    conv_w, conv_b = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8))
    y = ops.selective_scan(**{**inputs, **params}, delta_softplus=True, backend="cpu")
    y = ops.causal_conv1d(y, conv_w, conv_b, activation="silu", backend="cpu")
    y.sum().backward()
    for p in [*params.values(), conv_w, conv_b]:
        p.untyped_storage().resize_(0)  # raises "not resizable" if a numpy view pinned it
