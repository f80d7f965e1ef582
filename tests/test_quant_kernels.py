"""The quantized decode kernels (mambakit/engine/qpanels.py) and the fused step on quantized models
(engine/fused.py) against their reference twins (QuantizedLinear.forward; MambaLM.step of the quantized model)."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import random_model

from mambakit.engine import FusedDecoder, qpanels, step_function
from mambakit.quantize import QuantizedLinear, quantize

EPS32 = 2.0 ** -24


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 8)])
@pytest.mark.parametrize("o,i", [(100, 64), (33, 256)])
def test_qpanels_linear_against_twin(bits, group, o, i):
    """Batches 1 … 9 (int8: 8 rows a pass, int4: 4), o not a multiple of 32. Both the kernel and the twin sum
    i float32 products in some order; each must be within the standard bound of such a sum, |error| ≤
    i · 2⁻²⁴ · Σ|x||W| (γ_i), of the exact (float64) product with the dequantised weight: a bound that a wrong
    nibble, scale or row would break by orders of magnitude."""
    torch.manual_seed(o + i)
    q = QuantizedLinear.from_linear(torch.nn.Linear(i, o, bias=False), bits, group)
    packed = qpanels.pack(q)
    w64 = q.dequantized(torch.float64)
    for b in (1, 4, 5, 9):
        x = torch.randn(b, i)
        exact = x.double() @ w64.T
        bound = (i + 1) * EPS32 * (x.double().abs() @ w64.abs().T)
        y = qpanels.linear(x, packed, o)
        assert y.shape == (b, o) and y.dtype == torch.float32
        assert ((y.double() - exact).abs() <= bound).all()
        assert ((q(x).double() - exact).abs() <= bound).all()  # the twin meets the same bound
        # a row's result does not depend on the other rows of the batch
        assert torch.equal(qpanels.linear(x[-1:], packed, o), y[-1:])


def test_qpanels_linear_bad_input():
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 40), 8, None)
    packed = qpanels.pack(q)
    with pytest.raises(ValueError, match="does not match"):
        qpanels.linear(torch.randn(2, 63), packed, 40)
    with pytest.raises(ValueError, match="outside"):
        qpanels.linear(torch.randn(2, 64), packed, 65)


# the fused step keeps intermediates in float32 where the bfloat16 reference rounds them (as in
# test_engine_fused.py); float32 differs only by the order of sums
TOL = {torch.float32: dict(atol=5e-5, rtol=5e-5), torch.bfloat16: dict(atol=0.05, rtol=0.02)}


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)])
@pytest.mark.parametrize("dtype,batch", [(torch.float32, 1), (torch.float32, 9), (torch.bfloat16, 5)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_fused_step_quantized_equals_reference(bits, group, dtype, batch):
    model = quantize(random_model(d_model=32, n_layer=3), bits, group).to(dtype)
    ids = torch.randint(0, 64, (batch, 12), generator=torch.Generator().manual_seed(batch))
    s_ref, s_fused = model.allocate_state(batch), model.allocate_state(batch)
    decoder = FusedDecoder(model)
    with torch.no_grad():
        ref = torch.stack([model.step(ids[:, t], s_ref).float() for t in range(12)], 1)
        out = torch.stack([decoder.step(ids[:, t], s_fused).float() for t in range(12)], 1)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(s_fused.ssm, s_ref.ssm, **TOL[dtype])
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_step_function_uses_fused_quantized_and_repacks():
    model = quantize(random_model(d_model=32, n_layer=2), 8)
    step = step_function(model, fused=True)
    state = model.allocate_state(2)
    ids = torch.tensor([1, 2])
    before = step(ids, copy.deepcopy(state))
    assert step.last == "fused"
    with torch.no_grad():  # replaced quantized weights are seen (the packed copy is rebuilt)
        m = model.backbone.layers[0].mixer.in_proj
        m.set_quantized(torch.zeros_like(m.qweight), m.scales.clone())
    after = step(ids, copy.deepcopy(state))
    ref = model.step(ids, copy.deepcopy(state))
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, ref, **TOL[torch.float32])


def test_partly_quantized_model_takes_the_reference_step():
    model = quantize(random_model(d_model=32, n_layer=2), 8)
    lin = model.backbone.layers[1].mixer.out_proj
    model.backbone.layers[1].mixer.out_proj = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
    with pytest.raises(ValueError, match="partly quantized"):
        FusedDecoder(model)
