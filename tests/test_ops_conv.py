"""The causal depthwise conv: fused kernel vs reference (outputs, final state, gradients), causality,
gradcheck, chunking with state carry, single steps, bad input."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mambakit import ops
from mambakit.ops.reference import causal_conv1d_ref, causal_conv1d_update_ref

# the fused kernels, through the checked entry point (the only way in)
conv_cpu = partial(ops.causal_conv1d, backend="cpu")
conv_update_cpu = partial(ops.causal_conv1d_update, backend="cpu")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make(b, l, d, w, dtype=torch.float32, bias=True, h0=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    return dict(x=r(b, l, d), weight=r(d, w), bias=r(d) if bias else None, initial_state=r(b, d, w - 1) if h0 else None)


def run(fn, inputs, activation):
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    y, f = fn(**{k: leaves.get(k) for k in inputs}, return_final_state=True, activation=activation)
    g = torch.Generator().manual_seed(1)
    gy, gf = torch.randn(y.shape, generator=g).to(y.dtype), torch.randn(f.shape, generator=g).to(f.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (f * gf).sum(), list(leaves.values()))
    return y.detach(), f.detach(), dict(zip(leaves, grads))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize(
    "shape, bias, h0",
    [((2, 37, 70, 4), True, True), ((1, 1, 3, 1), True, False), ((3, 200, 130, 4), False, True), ((2, 2, 5, 4), True, True)],
    ids=["odd-d", "l1-w1", "3-chunks", "l<w"],
)
def test_fused_matches_reference(shape, bias, h0, activation, dtype):
    inputs = make(*shape, dtype, bias=bias, h0=h0)
    y1, f1, g1 = run(conv_cpu, inputs, activation)
    y2, f2, g2 = run(causal_conv1d_ref, inputs, activation)
    b, l, d, w = shape
    assert y1.shape == (b, l, d) and f1.shape == (b, d, w - 1) and y1.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)  # the final state is a copy of inputs
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=tol * 10, atol=tol * 10, msg=f"grad {k}")


def test_reference_is_causal_and_matches_the_definition():
    inputs = make(1, 9, 3, 4, torch.float64)
    y = causal_conv1d_ref(**inputs)
    x, W, bias, h0 = inputs["x"][0], inputs["weight"], inputs["bias"], inputs["initial_state"][0]
    xp = torch.cat([h0.t(), x])  # (w − 1 + l, d)
    want = torch.stack([bias + (W.t() * xp[t : t + 4]).sum(0) for t in range(9)])
    torch.testing.assert_close(y[0], want)
    x2 = inputs["x"].clone()
    x2[:, 5:] += 1.0  # changing the future leaves the past unchanged
    torch.testing.assert_close(conv_cpu(**{**inputs, "x": x2})[:, :5], conv_cpu(**inputs)[:, :5])


@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradcheck_float64(activation):
    inputs = make(2, 7, 5, 4, torch.float64)
    names = list(inputs)
    leaves = [inputs[k].clone().requires_grad_() for k in names]

    def f(*xs):
        return conv_cpu(**dict(zip(names, xs)), return_final_state=True, activation=activation)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_chunked_with_state_carry_equals_one_shot(backend):
    inputs = make(2, 50, 24, 4)
    y_all, f_all = ops.causal_conv1d(**inputs, return_final_state=True, activation="silu", backend=backend)
    state, ys = inputs["initial_state"], []
    for t0, t1 in [(0, 1), (1, 3), (3, 30), (30, 50)]:  # pieces shorter than w − 1 too
        y, state = ops.causal_conv1d(inputs["x"][:, t0:t1], inputs["weight"], inputs["bias"], state, True, "silu", backend)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_all)
    torch.testing.assert_close(state, f_all)


def test_update_stepped_equals_conv():
    inputs = make(3, 12, 10, 4)
    y_all, f_all = ops.causal_conv1d(**inputs, return_final_state=True, activation="silu")
    state = inputs["initial_state"].clone()
    ys = [ops.causal_conv1d_update(state, inputs["x"][:, t], inputs["weight"], inputs["bias"], "silu") for t in range(12)]
    torch.testing.assert_close(torch.stack(ys, 1), y_all)
    torch.testing.assert_close(state, f_all)


def test_bfloat16_inputs():
    inputs = make(2, 20, 16, 4, torch.bfloat16)
    y1 = ops.causal_conv1d(**inputs, activation="silu", backend="cpu")
    y2 = ops.causal_conv1d(**{k: v.float() for k, v in inputs.items()}, activation="silu", backend="reference")
    assert y1.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y2, rtol=2e-2, atol=2e-2)


def test_bfloat16_read_as_bits_equals_float32_rounded():
    """bf16 inputs go to the kernel as their bits and y comes back rounded in the kernel: bit for bit the
    float32 kernel on the same (exactly widened) values, rounded by torch; the final state is the input's."""
    inputs = make(2, 70, 40, 4, torch.bfloat16)
    as32 = {k: v.float() for k, v in inputs.items()}
    with torch.no_grad():
        y16, s16 = conv_cpu(**inputs, activation="silu", return_final_state=True)
        y32, s32 = conv_cpu(**as32, activation="silu", return_final_state=True)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.bfloat16
    assert torch.equal(y16.view(torch.int16), y32.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(s16.float(), s32)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(2, 5)), r"x must have shape \(b, l, d\)"),
        (dict(weight=torch.randn(5, 4)), r"weight must have shape \(d, w\) = \(6, \?\)"),
        (dict(bias=torch.randn(4)), r"bias must have shape \(d,\)"),
        (dict(initial_state=torch.randn(2, 6, 2)), r"initial_state must have shape \(b, d, w-1\) = \(2, 6, 3\)"),
        (dict(activation="relu"), r"activation must be None or 'silu'"),
    ],
)
def test_bad_input(change, match):
    inputs = make(2, 5, 6, 4)
    inputs.update(change)
    with pytest.raises(ValueError, match=match):
        ops.causal_conv1d(**inputs)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_fused_update_matches_reference(activation):
    inputs = make(3, 1, 11, 4)
    s1, s2 = inputs["initial_state"].clone(), inputs["initial_state"].clone()
    y1 = conv_update_cpu(s1, inputs["x"][:, 0], inputs["weight"], inputs["bias"], activation)
    y2 = causal_conv1d_update_ref(s2, inputs["x"][:, 0], inputs["weight"], inputs["bias"], activation)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(s1, s2)
