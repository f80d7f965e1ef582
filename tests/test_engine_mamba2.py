"""The fused Mamba-2 decode step (mambakit/engine/mamba2.py) against its reference twin, MambaLM.step with the
Mamba2 mixer, and the engine's step function for Mamba-2 models."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
    # N = 40: two vectors of 16 and 8 states into lane 0; 5 heads in 5 groups; S + h = 85: one in_proj panel holds
    # the last z and the dt rows; xBC 480 channels = 15 panels, an odd number of panels a task (IN_PANELS = 2)
    dict(d_model=40, d_state=40, ngroups=5),
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


def test_a_row_decodes_as_alone_in_every_batch_size():
    """Batches 1 … 9 (every panel-kernel width, and 8 + 1): row 0 of each equals row 0 decoded alone, bitwise."""
    model = _model(3, **CONFIGS[3])
    ids = torch.randint(0, 64, (9, 5), generator=torch.Generator().manual_seed(9))
    alone, alone_state = _run(model, ids[:1], fused=True)
    for b in range(2, 10):
        out, state = _run(model, ids[:b], fused=True)
        assert torch.equal(out[:1], alone), b
        assert torch.equal(state.ssm[:, :1], alone_state.ssm) and torch.equal(state.conv[:, :1], alone_state.conv)


ROOT = Path(__file__).resolve().parents[1]
CHILD = textwrap.dedent("""
    import json, sys
    import numba, torch
    sys.path.insert(0, sys.argv[2])
    from test_engine_mamba2 import CONFIGS, _model
    from mambakit.engine import mamba2

    torch.set_num_threads(int(sys.argv[3]))
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(1, **CONFIGS[1]).to(dtype)
        dec, state = mamba2.Mamba2Decoder(model), model.allocate_state(3)
        for t in range(4):
            res[f"{dtype}.logits{t}"] = dec.step(torch.tensor([1, 7, 30 + t]), state)
        res.update({f"{dtype}.ssm": state.ssm, f"{dtype}.conv": state.conv})
    hits = sum(sum(d.stats.cache_hits.values()) for d in mamba2._LAYERS.values())
    misses = sum(sum(d.stats.cache_misses.values()) for d in mamba2._LAYERS.values())
    torch.save(res, sys.argv[1])
    print(json.dumps({"hits": hits, "misses": misses}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_step_equals_cached(tmp_path, threads):
    """The step compiled in a process and loaded from numba's disk cache by the next give the same bits
    (kernel_options: no fast-math; see tests/test_ops_cache.py), serial and parallel builds."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
    env.pop("MAMBAKIT_NO_CACHE", None)
    runs = []
    for name in ("cold", "warm"):
        p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / f"{name}.pt"), str(ROOT / "tests"),
                            str(threads)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert runs[0]["misses"] > 0 and runs[0]["hits"] == 0, runs
    assert runs[1]["hits"] > 0 and runs[1]["misses"] == 0, runs
    a, b = torch.load(tmp_path / "cold.pt"), torch.load(tmp_path / "warm.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
