"""S4D (mambakit/baselines/s4d.py): the convolution mode (FFT) and the recurrent mode (one step) against the
float64 recurrence, both inits, with and without an initial state; the Mamba block with S4D and S4DLM:
forward = token-by-token decoding, chunked = one call; gradients reach every S4D parameter."""

import math

import pytest
import torch

from mambakit import MambaConfig, MambaLM, MambaState
from mambakit.baselines.s4d import (
    MambaS4D,
    MambaS4DReal,
    S4DKernel,
    S4DLM,
    s4d_conv,
    s4d_recurrence_ref,
    s4d_step,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _kernel(init, d=6, n=8):
    # a wide Δ range so that both slow (Ā ≈ 1) and fast modes are exercised
    return S4DKernel(d, n, init, dt_min=0.01, dt_max=0.5)


def test_inits_are_the_papers():
    lin = S4DKernel(3, 8, "lin")
    A = lin.A()
    assert A.dtype == torch.complex64 and A.shape == (3, 4)
    torch.testing.assert_close(A.real, torch.full((3, 4), -0.5))
    torch.testing.assert_close(A.imag, (math.pi * torch.arange(4.0)).expand(3, 4))  # S4D-Lin: −1/2 + iπn
    real = S4DKernel(3, 8, "real")
    torch.testing.assert_close(real.A(), -(torch.arange(8.0) + 1).expand(3, 8))  # S4D-Real: −(n + 1)
    dt = torch.exp(real.log_dt)
    assert bool(((dt >= 1e-3) & (dt <= 1e-1)).all())


@pytest.mark.parametrize("init", ["lin", "real"])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_and_step_match_recurrence(init, with_state):
    k = _kernel(init)
    D = torch.randn(6)
    x = torch.randn(3, 41, 6)
    s0 = torch.randn(3, 6, 8) if with_state else None
    y_ref, h_ref = s4d_recurrence_ref(x, k, D, s0)
    y, h = s4d_conv(x, k, D, s0)
    assert y.shape == (3, 41, 6) and h.shape == (3, 6, 8) and h.dtype == torch.float32
    tol = dict(atol=2e-5 * y_ref.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(h.double(), h_ref, atol=1e-5 * h_ref.abs().max().item(), rtol=1e-4)
    state = s0.clone() if with_state else torch.zeros(3, 6, 8)
    ys = torch.stack([s4d_step(x[:, t], k, state, D) for t in range(41)], dim=1)
    torch.testing.assert_close(ys.double(), y_ref, **tol)
    torch.testing.assert_close(state.double(), h_ref, atol=1e-5 * h_ref.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("init", ["lin", "real"])
def test_kernel_is_the_impulse_response(init):
    k = _kernel(init)
    impulse = torch.zeros(1, 30, 6)
    impulse[:, 0] = 1.0
    y, _ = s4d_recurrence_ref(impulse, k)
    torch.testing.assert_close(k.kernel(30).double(), y[0].T, atol=1e-6, rtol=1e-5)


def test_chunked_conv_equals_one_call():
    k = _kernel("lin")
    x = torch.randn(2, 50, 6)
    y, h = s4d_conv(x, k)
    y1, h1 = s4d_conv(x[:, :17], k)
    y2, h2 = s4d_conv(x[:, 17:], k, state=h1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2, h, atol=1e-5, rtol=1e-5)


def test_bad_shapes_and_inits():
    with pytest.raises(ValueError, match="init"):
        S4DKernel(4, 8, "inv")
    with pytest.raises(ValueError, match="even"):
        S4DKernel(4, 7, "lin")
    with pytest.raises(ValueError, match="channels"):
        s4d_conv(torch.randn(1, 5, 3), S4DKernel(4, 8))


@pytest.mark.parametrize("mixer_cls", [MambaS4D, MambaS4DReal])
def test_mamba_block_with_s4d(mixer_cls):
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=16)
    model = MambaLM(cfg, mixer_cls=mixer_cls)
    mixer = model.backbone.layers[0].mixer
    assert not hasattr(mixer, "x_proj") and not hasattr(mixer, "dt_proj") and not hasattr(mixer, "A_log")
    assert mixer.s4d.init == mixer_cls.s4d_init
    ids = torch.randint(0, 16, (2, 25))
    out = model(ids, labels=ids, return_state=True)
    # decoding token by token through ssm_step gives the forward's logits and final state
    state = model.allocate_state(2)
    logits = torch.stack([model.step(ids[:, t], state) for t in range(25)], dim=1)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state.ssm, out.state.ssm, atol=1e-4, rtol=1e-4)
    # a sequence fed in two calls continues through MambaState
    a = model(ids[:, :10], return_state=True)
    b = model(ids[:, 10:], state=a.state)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), out.logits, atol=1e-4, rtol=1e-4)
    out.loss.backward()
    for name, p in mixer.s4d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the SSM parameters stay float32 in a bf16 model
    model.to(torch.bfloat16)
    assert mixer.s4d.log_dt.dtype == torch.float32 and mixer.D.dtype == torch.float32
    assert model(ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("init", ["lin", "real"])
def test_s4d_lm(init):
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=16)
    model = S4DLM(cfg, init)
    ids = torch.randint(0, 16, (2, 20))
    out = model(ids, labels=ids, return_state=True)
    assert out.logits.shape == (2, 20, cfg.padded_vocab_size) and out.state.shape == (2, 2, 16, 16)
    state = model.allocate_state(2)
    logits = torch.stack([model.step(ids[:, t], state) for t in range(20)], dim=1)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    out.loss.backward()
    assert model.layers[0].s4d.log_dt.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.full((1, 3), 16))
