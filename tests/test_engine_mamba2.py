"""The fused Mamba-2 decode step (mambakit/engine/mamba2.py) against its reference twin, MambaLM.step with the
Mamba2 mixer, and the engine's step function for Mamba-2 models."""

from __future__ import annotations

import logging

import pytest
import torch

from mambakit import MambaConfig, MambaLM, engine, generate
from mambakit.engine import Mamba2Decoder, step_function

# float32: both paths compute in float32 (sums in another order); bfloat16: the reference rounds the projections'
# outputs to bfloat16 where the fused step keeps float32, a few bf16 ulps of the logits
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=0.05, rtol=0.02)}


def _model(seed=0, **overrides) -> MambaLM:
    """A small Mamba-2 LM with its SSM parameters moved off their init (so D, dt_bias, the norm weights matter)."""
    torch.manual_seed(seed)
    cfg = dict(d_model=48, n_layer=3, vocab_size=64, d_state=24, headdim=16)
    cfg.update(overrides)
    model = MambaLM(MambaConfig(layer="Mamba2", **cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _run(model, ids, fused, state=None):
    state = model.allocate_state(ids.shape[0]) if state is None else state
    step = Mamba2Decoder(model).step if fused else model.step
    logits = [step(ids[:, t], state).float() for t in range(ids.shape[1])]
    return torch.stack(logits, 1), state


CONFIGS = [
    dict(),  # one group, D per head, norm after the gate, conv bias
    dict(ngroups=3, D_has_hdim=True, norm_before_gate=True, conv_bias=False),
    dict(ngroups=2, d_state=16, dt_limit=(0.01, 0.2), d_conv=2),  # N a multiple of 16, Δ clamped, short conv
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 9])  # 9: a pass of 8 rows over a panel and one left over
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_fused_step_equals_reference(dtype, batch, config):
    model = _model(config, **CONFIGS[config]).to(dtype)
    ids = torch.randint(0, 64, (batch, 16), generator=torch.Generator().manual_seed(batch))
    ref, ref_state = _run(model, ids, fused=False)
    out, state = _run(model, ids, fused=True)
    assert out.shape == ref.shape == (batch, 16, model.config.padded_vocab_size)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(state.ssm, ref_state.ssm, **TOL[dtype])
    torch.testing.assert_close(state.conv.float(), ref_state.conv.float(), **TOL[dtype])
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_rows_decode_as_alone_and_threads_do_not_change_bits():
    """Each row's result is computed in one fixed order: a row of a batch equals that row decoded alone, and one
    thread equals two, bit for bit."""
    model = _model()
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(5))
    both, _ = _run(model, ids, fused=True)
    alone, _ = _run(model, ids[2:3], fused=True)
    assert torch.equal(both[2:3], alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _run(model, ids, fused=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, both)


def test_fused_step_continues_a_prefill_and_reads_a_pool_in_place():
    model = _model()
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(3))
    full = model(ids).logits
    out = model(ids[:, :12], return_state=True)
    pool = model.allocate_state(5)  # the server's pool: rows 0, 1 used, the rest must stay untouched
    pool.conv[:, 2:] = 7.0
    pool.ssm[:, 2:] = 7.0
    pool.conv[:, :2] = out.state.conv
    pool.ssm[:, :2] = out.state.ssm
    view = type(pool)(pool.conv[:, :2], pool.ssm[:, :2])
    logits, _ = _run(model, ids[:, 12:], fused=True, state=view)
    torch.testing.assert_close(logits[:, :-1], full[:, 12:-1], atol=1e-4, rtol=1e-4)
    assert bool((pool.conv[:, 2:] == 7.0).all()) and bool((pool.ssm[:, 2:] == 7.0).all())


def test_fused_step_follows_weight_changes():
    model = _model()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    dec = Mamba2Decoder(model)
    dec.step(ids[:, 0], model.allocate_state(2))
    with torch.no_grad():
        model.backbone.layers[1].mixer.in_proj.weight.mul_(1.5)  # an in-place update: the version changes
        model.backbone.layers[0].mixer.A_log.add_(0.3)
    state = model.allocate_state(2)
    got = torch.stack([dec.step(ids[:, t], state) for t in range(6)], 1)
    want, _ = _run(model, ids, fused=False)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("override, reason", [
    (dict(bias=True), "bias"), (dict(rmsnorm=False), "gated RMSNorm"), (dict(d_ssm=64), "MLP branch"),
    (dict(rms_norm=False), "LayerNorm"),
])
def test_unsupported_models_take_the_reference_and_say_why(override, reason, caplog, monkeypatch):
    model = _model(**override)
    assert reason in engine.unsupported(model)
    with pytest.raises(ValueError, match=reason):
        Mamba2Decoder(model)
    monkeypatch.setattr(engine, "_SAID", set())  # the log-once set is per process
    with caplog.at_level(logging.INFO, logger="mambakit.engine"):
        step = step_function(model)
    assert step == model.step
    assert any(reason in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=reason):
        step_function(model, fused=True)


def test_step_function_and_generate_use_the_mamba2_decoder(monkeypatch):
    monkeypatch.setattr(engine, "_SAID", set())
    model = _model()
    step = step_function(model)
    assert isinstance(step.decoder, Mamba2Decoder)
    state = model.allocate_state(2)
    step(torch.tensor([1, 2]), state)
    assert step.last == "fused"
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]  # mixed lengths
    fast = generate(model, prompts, 8, temperature=0, fused=True)
    slow = generate(model, prompts, 8, temperature=0, fused=False)
    assert fast.tokens.tolist() == slow.tokens.tolist()


def test_a_state_that_does_not_fit_is_refused_before_any_kernel_runs():
    model = _model()
    other = _model(d_state=16)
    with pytest.raises(ValueError, match="state"):
        Mamba2Decoder(model).step(torch.tensor([1]), other.allocate_state(1))
    state = model.allocate_state(1)
    with pytest.raises(ValueError):
        Mamba2Decoder(model).step(torch.tensor([1, 2]), state)  # batch of 2 against a state of 1
