"""The fused decode step (mambakit/engine/fused.py) against its reference twin, the unfused MambaLM.step, and the
engine's step function (fused where it applies, logged; never reachable with a state that does not fit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _models import random_model

from mambakit import MambaConfig, MambaLM, engine
from mambakit.engine import FusedDecoder, fused as decode_fused, step_function

# float32: both paths compute in float32 (sums in another order); bfloat16: the unfused step rounds x, z and the
# projections to bfloat16 where the fused one keeps float32, so they differ by a few bf16 ulps of the logits
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=0.05, rtol=0.02)}


def _run(model, ids, fused):
    state = model.allocate_state(ids.shape[0])
    step = FusedDecoder(model).step if fused else model.step
    logits = [step(ids[:, t], state).float() for t in range(ids.shape[1])]
    return torch.stack(logits, 1), state


# batches up to each dtype's fused limit (MAX_BATCH: 64 float32, 16 bfloat16); 9, 13, 21: passes of 8 rows over
# a panel and rows left over
BATCHES = [(torch.float32, b) for b in (1, 3, 4, 9, 16, 21)] + [(torch.bfloat16, b) for b in (1, 3, 4, 9, 13, 16)]


@pytest.mark.parametrize("dtype,batch", BATCHES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("bias", [False, True])
def test_fused_step_equals_reference(dtype, batch, bias):
    assert batch <= decode_fused.MAX_BATCH[dtype], "a batch above the fused limit would test the unfused step"
    model = random_model(d_model=32, n_layer=3, bias=bias, conv_bias=not bias).to(dtype)
    ids = torch.randint(0, 64, (batch, 24), generator=torch.Generator().manual_seed(batch))
    ref, ref_state = _run(model, ids, fused=False)
    out, state = _run(model, ids, fused=True)
    assert out.dtype == ref.dtype and out.shape == (batch, 24, model.config.padded_vocab_size)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(state.ssm, ref_state.ssm, **TOL[dtype])
    torch.testing.assert_close(state.conv.float(), ref_state.conv.float(), **TOL[dtype])
    # the logits are far from uniform, so agreeing argmaxes mean something
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_state", [16, 5])
def test_fused_step_odd_sizes(dtype, d_state):
    """d_state 16 (the vector state update, `_channels16`) and 5 (the loop), d_inner 80: a 64-channel task boundary inside the x
    channels, one inside the z channels; in_proj's 160 rows, x_proj's 35 (13 for d_state 5), out_proj's 40 and
    dt_proj's 80 not whole 32-row panels (the last one padded)."""
    torch.manual_seed(1)
    model = MambaLM(MambaConfig(d_model=40, n_layer=2, vocab_size=64, d_state=d_state)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    ids = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(2))
    ref, ref_state = _run(model, ids, fused=False)
    out, state = _run(model, ids, fused=True)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(state.ssm, ref_state.ssm, **TOL[dtype])


def test_scratch_is_reused_and_steps_do_not_share_it():
    """The step's scratch (`engine.fused._scratch`) is one buffer a Python thread, reused by every step: steps of
    two models of other sizes and batches, interleaved (a large batch, then smaller ones carved from the same
    buffer), equal each model's steps alone; two threads stepping at once each get their own buffer."""
    import threading

    small = random_model(d_model=32, n_layer=3)
    big = random_model(d_model=48, n_layer=2, seed=1)
    ids = {b: torch.randint(0, 64, (b, 6), generator=torch.Generator().manual_seed(b)) for b in (2, 7)}
    alone = {(m, b): _run(model, ids[b], fused=True)[0] for m, model in (("s", small), ("b", big)) for b in ids}
    states = {(m, b): model.allocate_state(b) for m, model in (("s", small), ("b", big)) for b in ids}
    out = {k: [] for k in states}
    decoders = {"s": FusedDecoder(small), "b": FusedDecoder(big)}
    for t in range(6):
        for m in ("b", "s"):
            for b in (7, 2):
                out[m, b].append(decoders[m].step(ids[b][:, t], states[m, b]))
    for k, v in out.items():
        torch.testing.assert_close(torch.stack(v, 1), alone[k], atol=0, rtol=0)
    hn = decode_fused._scratch(2, 2, 32, 64, 2, 16, 3)[0]
    assert np.shares_memory(hn, decode_fused._scratch(2, 1, 32, 64, 2, 16, 3)[0])  # the same buffer, carved
    seen = []
    worker = threading.Thread(target=lambda: seen.append(decode_fused._scratch(2, 2, 32, 64, 2, 16, 3)[0]))
    worker.start()
    worker.join()
    assert not np.shares_memory(seen[0], hn)


def test_vector_state_update_equals_the_loop():
    """`_channels16` (explicit vector code, a row's channels) against `_channel` (its reference loop): the new
    state and C·h, for Δ from tiny to large, so exp(ΔA) runs from 1 down to its underflow clamp (ΔA < −88
    gives exactly 0); over all channels of a row and over a part of one (e0 > 0, the rest untouched), with
    prefetches of a weight buffer on and off (they must not change results)."""
    import numba
    import numpy as np

    R = 3

    @numba.njit
    def both(st16, st, dbc, A, deltas, xs, y16, out, e0, n, ahead, per):
        for bb in range(st.shape[0]):
            for e in range(e0, e0 + n):
                y16[bb, e] = deltas[bb, e]
            decode_fused._channels16(st16, A, dbc, R, y16, xs, bb, e0, n, ahead, 5 * bb, per)
            for e in range(e0, e0 + n):
                d = deltas[bb, e]
                out[bb, e] = decode_fused._channel(st, dbc[bb, R:R + 16], dbc[bb, R + 16:], A, bb, e, d, d * xs[bb, e])

    rng = np.random.default_rng(0)
    b, E = 3, 40
    A = -np.exp(rng.uniform(-2, 4, (E, 16))).astype(np.float32)  # −0.14 … −55
    dbc = rng.standard_normal((b, R + 32)).astype(np.float32)
    deltas = np.exp(rng.uniform(-9, 3, (b, E))).astype(np.float32)  # 1e-4 … 20: ΔA down to −1100
    xs = rng.standard_normal((b, E)).astype(np.float32)
    for e0, n, ahead, per in ((0, E, np.zeros(0, np.float32), 0), (7, 20, np.ones(300, np.float32), 2),
                              (7, 20, np.ones(300, np.int16), 1)):
        st = rng.standard_normal((b, E, 16)).astype(np.float32)
        st16 = st.copy()
        y16, out = np.full((b, E), 7.0, np.float32), np.full((b, E), 7.0, np.float32)
        both(st16, st, dbc, A, deltas, xs, y16, out, e0, n, ahead, per)
        np.testing.assert_allclose(st16, st, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(y16, out, rtol=1e-5, atol=1e-5)
        assert (st16[:, e0:e0 + n] != 0).all() and np.isfinite(y16).all()
        assert (y16[:, :e0] == 7.0).all() and (y16[:, e0 + n:] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("W", [4, 3])  # 3: no preset has it, and every channel takes the loop
def test_vector_conv_equals_the_conv(dtype, bias, W):
    """`_x_channels` (in_proj's bias, the conv of whole 16-channel blocks as `_conv16`'s vector code, the rest
    in its loop, SiLU) against the conv written out in torch: the outputs and the shifted state, over channels
    7 … 7 + 36 − 1 (two vector blocks and four channels of loop) of a row of 80, the others untouched; in
    bfloat16 the state holds each new input rounded to nearest even, bit for bit as torch rounds."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    b, E, e0, n = 3, 80, 7, 36
    state = torch.randn(b, E, W - 1, generator=g).to(dtype)
    w = torch.randn(W, E, generator=g).to(dtype)  # the weight transposed, as `_layer_args` stacks it
    b_in = torch.randn(2 * E, generator=g).to(dtype) if bias else torch.zeros(0, dtype=dtype)
    conv_b = torch.randn(E, generator=g).to(dtype) if bias else torch.zeros(0, dtype=dtype)
    xz = torch.randn(b, 2 * E, generator=g)
    x = xz[:, e0:e0 + n] + (b_in[e0:e0 + n].float() if bias else 0)  # (b, n)
    window = torch.cat([state[:, e0:e0 + n].float(), x[..., None]], -1)  # (b, n, W): the last W inputs
    pre = (window * w[:, e0:e0 + n].float().t()).sum(-1) + (conv_b[e0:e0 + n].float() if bias else 0)
    new_state = state.clone()
    new_state[:, e0:e0 + n] = torch.cat([state[:, e0:e0 + n, 1:], x[..., None].to(dtype)], -1)

    xc = np.full((b, E), 7.0, np.float32)
    st = decode_fused._np(state.clone())
    decode_fused._x_channels(e0, n, decode_fused._np(b_in), decode_fused._np(w), decode_fused._np(conv_b), st,
                             xz.numpy().copy(), xc)
    out = torch.from_numpy(st).view(dtype) if dtype == torch.bfloat16 else torch.from_numpy(st)
    assert torch.equal(out, new_state)
    torch.testing.assert_close(torch.from_numpy(xc[:, e0:e0 + n]), torch.nn.functional.silu(pre), atol=1e-5, rtol=1e-5)
    assert (xc[:, :e0] == 7.0).all() and (xc[:, e0 + n:] == 7.0).all()


def test_fused_step_follows_weight_changes():
    """The kernel's numpy views of the weights are cached: in-place updates must show through, and a
    replaced parameter or .data must be picked up."""
    model = random_model()
    ids = torch.tensor([3, 5])

    decoder = FusedDecoder(model)

    def both():
        return decoder.step(ids, model.allocate_state(2)), model.step(ids, model.allocate_state(2))

    both()
    mixer = model.backbone.layers[1].mixer
    with torch.no_grad():
        mixer.in_proj.weight.mul_(1.5)  # in place (an optimizer step): the packed copy is rebuilt
        mixer.A_log.add_(0.3)
    torch.testing.assert_close(*both(), **TOL[torch.float32])
    with torch.no_grad():
        mixer.out_proj.weight.add_(0.1)
        model.lm_head.weight.mul_(0.5)  # packed too (the head, tied to the embedding)
    torch.testing.assert_close(*both(), **TOL[torch.float32])
    mixer.out_proj.weight = torch.nn.Parameter(torch.randn_like(mixer.out_proj.weight))  # replaced
    torch.testing.assert_close(*both(), **TOL[torch.float32])
    mixer.x_proj.weight.data = torch.randn_like(mixer.x_proj.weight)  # new storage under the same Parameter
    torch.testing.assert_close(*both(), **TOL[torch.float32])
    model.backbone.layers[0].mixer.dt_proj = torch.nn.Linear(*reversed(mixer.dt_proj.weight.shape))  # new module
    torch.testing.assert_close(*both(), **TOL[torch.float32])


def test_fused_step_continues_a_prefill():
    """Prefill with the parallel scan, then decode fused: the last logits equal one forward over everything."""
    model = random_model()
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    out = model(ids[:, :30], return_state=True)
    state = out.state
    decoder = FusedDecoder(model)
    for t in range(30, 40):
        logits = decoder.step(ids[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=1e-4)


def test_step_function_uses_fused_kernel_where_it_applies(monkeypatch, caplog):
    model = random_model()
    calls = []
    real = FusedDecoder.step
    monkeypatch.setattr(FusedDecoder, "step", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(engine, "_SAID", set())  # "once" is per process: forget what earlier tests made it say
    step = step_function(model)
    with caplog.at_level("INFO", logger="mambakit.engine"):
        step(torch.tensor([1]), model.allocate_state(1))
        assert calls == [1]
        big = decode_fused.MAX_BATCH[torch.float32] + 1
        step(torch.arange(big) % 64, model.allocate_state(big))  # unfused: larger batches gain nothing
        assert calls == [1]
        step(torch.arange(big) % 64, model.allocate_state(big))
    said = [r.getMessage() for r in caplog.records]
    assert any("fused CPU step" in m for m in said) and sum("batch above" in m for m in said) <= 1  # once


def test_fused_true_raises_where_it_does_not_apply():
    model = random_model(rms_norm=False)
    state = model.allocate_state(1)
    assert "LayerNorm" in engine.unsupported(model)
    with pytest.raises(ValueError, match="fused=True.*LayerNorm"):
        step_function(model, fused=True)
    with pytest.raises(ValueError, match="LayerNorm"):
        FusedDecoder(model)
    step_function(model)(torch.tensor([1]), state)  # the default falls back to the reference
    bf16 = random_model(residual_in_fp32=False).to(torch.bfloat16)
    assert "residual" in engine.unsupported(bf16)
    big = decode_fused.MAX_BATCH[torch.float32] + 1
    with pytest.raises(ValueError, match="batch"):
        step_function(random_model(), fused=True)(torch.arange(big) % 64, random_model().allocate_state(big))


def test_supports_follows_a_dtype_change():
    model = random_model()
    ids = torch.tensor([1])
    decoder = FusedDecoder(model)
    assert decoder.supports(ids, model.allocate_state(1)) is None
    model.half()
    assert "float16" in decoder.supports(ids, model.allocate_state(1))


@pytest.mark.parametrize("bad", ["layers", "d_state", "d_inner", "conv_width", "batch", "conv_dtype", "ids_shape"])
def test_a_state_that_does_not_fit_is_refused_before_any_kernel_runs(bad):
    """A state of another model (fewer layers, another d_state, d_inner or conv width), batch or dtype: a
    ValueError/TypeError naming it from the fused step and from the reference alike, never a crash."""
    model = MambaLM(MambaConfig(d_model=32, n_layer=3, vocab_size=64, d_state=16)).eval()
    other = {"layers": dict(n_layer=2), "d_state": dict(d_state=8), "d_inner": dict(d_model=16),
             "conv_width": dict(d_conv=3)}.get(bad, {})
    state = MambaLM(MambaConfig(**{**dict(d_model=32, n_layer=3, vocab_size=64, d_state=16), **other})
                    ).allocate_state(2)
    ids = {"batch": torch.tensor([1, 2, 3]), "ids_shape": torch.tensor([[1, 2]])}.get(bad, torch.tensor([1, 2]))
    if bad == "conv_dtype":
        state = type(state)(state.conv.double(), state.ssm)
    for step in (FusedDecoder(model).step, step_function(model), model.step):
        if bad == "conv_dtype" and step is not FusedDecoder.step and step == model.step:
            continue  # the reference computes in the state's dtype (the ops check what they take)
        if bad == "conv_dtype" and step is not model.step and not isinstance(step, type(model.step)):
            step(ids, state)  # the step function falls back to the reference for a state the kernel cannot read
            continue
        with pytest.raises((ValueError, TypeError), match="state|input_ids|batch"):
            step(ids, state)


def test_fused_step_reads_the_first_rows_of_a_pool_in_place():
    """The server decodes the first k rows of its pool of slots, a view that is not contiguous: the fused step
    takes it as it is, updates those rows only, and equals the reference on a contiguous copy."""
    model = random_model(d_model=32, n_layer=2)
    pool = model.allocate_state(6)
    torch.nn.init.normal_(pool.ssm)
    torch.nn.init.normal_(pool.conv)
    before = pool.ssm.clone(), pool.conv.clone()
    k = 3
    view = type(pool)(pool.conv[:, :k], pool.ssm[:, :k])
    assert not view.ssm.is_contiguous()
    ref_state = type(pool)(before[1][:, :k].clone(), before[0][:, :k].clone())
    ids = torch.tensor([4, 7, 9])
    decoder = FusedDecoder(model)
    assert decoder.supports(ids, view) is None
    torch.testing.assert_close(decoder.step(ids, view), model.step(ids, ref_state), **TOL[torch.float32])
    torch.testing.assert_close(pool.ssm[:, :k], ref_state.ssm, **TOL[torch.float32])
    torch.testing.assert_close(pool.conv[:, :k], ref_state.conv, **TOL[torch.float32])
    assert torch.equal(pool.ssm[:, k:], before[0][:, k:]) and torch.equal(pool.conv[:, k:], before[1][:, k:])
    # a view with another layout is not read in place: the step function takes the reference instead
    odd = type(pool)(pool.conv[:, ::2], pool.ssm[:, ::2])
    assert "layout" in decoder.supports(torch.tensor([1, 2, 3]), odd)


def test_decode_step_benchmark_quick_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_step.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1", "--dtypes", "float32"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| float32 |")]
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    # dtype, batch, unfused, fused, fused in 2 MiB pages ("—": a tiny model is not moved), two ratios, the
    # weight-streaming floor, fused ÷ floor, fused tokens/s
    assert len(rows) == 2 and all(len(c) == 10 and c[5].endswith("×") and c[4] == "—" and c[8].endswith("×")
                                  and float(c[9]) > 0 for c in cells)


def test_release_frees_the_packed_copy_and_training_samples_release_it():
    """The engine owns the packed weights (nothing is cached on the model); `release` drops them (the next step
    rebuilds them), and the trainer's sample() releases them before training resumes."""
    import gc

    from mambakit.tokenizer import ByteTokenizer
    from mambakit.train import sample

    model = random_model(vocab_size=260)
    ids, state = torch.tensor([3]), model.allocate_state(1)
    step = step_function(model)
    first = step(ids, state)
    assert step.decoder._packed is not None and not any(k.startswith("_fused") for k in model.__dict__)
    engine.release(model)
    assert step.decoder._packed is None and model not in engine._DECODERS
    torch.testing.assert_close(step_function(model)(ids, model.allocate_state(1)), first)
    sample(model, ByteTokenizer(), "ab", 3, seed=0)
    assert model not in engine._DECODERS and model.training
    # the shared decoder goes with its model
    import weakref

    step_function(model)(ids, model.allocate_state(1))
    decoder = weakref.ref(engine.decoder_for(model))
    del model, step
    gc.collect()
    assert decoder() is None
