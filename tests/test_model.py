"""MambaConfig, the Mamba block and MambaLM: layout, init recipe, state, loss, gradients, precision, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit import PRESETS, Mamba, MambaConfig, MambaLM, MambaState


def tiny(**kw) -> MambaConfig:
    return MambaConfig(**{**dict(d_model=32, n_layer=2, vocab_size=101), **kw})


def make(seed=0, **kw) -> MambaLM:
    torch.manual_seed(seed)
    return MambaLM(tiny(**kw))


def ids_for(cfg, b=2, l=24, seed=1):
    return torch.randint(0, cfg.vocab_size, (b, l), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- config
def test_config_derived_sizes_and_presets():
    c = MambaConfig.from_preset("130m")
    assert (c.d_model, c.n_layer, c.d_inner, c.dt_rank, c.padded_vocab_size) == (768, 24, 1536, 48, 50280)
    assert MambaConfig.from_preset("130m", pad_vocab_size_multiple=16).padded_vocab_size == 50288
    assert MambaConfig.from_preset("2.8b").d_inner == 5120
    assert set(PRESETS) >= {"130m", "370m", "790m", "1.4b", "2.8b", "tiny"}
    assert MambaConfig.from_dict(c.to_dict()) == c
    assert tiny(dt_rank=3).dt_rank == 3


def test_official_parameter_count_130m():
    with torch.device("meta"):
        model = MambaLM(MambaConfig.from_preset("130m"))
    # the parameter count of the released state-spaces/mamba-130m checkpoint (the head tied to the embedding)
    assert model.num_parameters() == 129_135_360


@pytest.mark.parametrize(
    "field, value, error",
    [("d_model", 0, ValueError), ("n_layer", 2.5, TypeError), ("vocab_size", -3, ValueError),
     ("d_state", True, TypeError), ("dt_rank", "big", ValueError), ("dt_min", 0.0, ValueError),
     ("dt_max", 1e-4, ValueError), ("dt_init", "normal", ValueError), ("norm_eps", float("nan"), TypeError),
     ("pad_vocab_size_multiple", 0, ValueError), ("tie_embeddings", 1, TypeError)],
)
def test_config_validation_names_the_field(field, value, error):
    with pytest.raises(error, match=field):
        tiny(**{field: value})


def test_config_unknown_key_and_preset():
    with pytest.raises(ValueError, match="d_modle"):
        MambaConfig.from_dict(dict(d_modle=8, n_layer=1, vocab_size=4))
    with pytest.raises(ValueError, match="unknown preset"):
        MambaConfig.from_preset("7b")


# ------------------------------------------------------------------------------------------------- layout
def test_parameter_names_and_shapes_are_official():
    c = tiny(d_state=8, bias=True)
    sd = MambaLM(c).state_dict()
    E, N, R, W, D, V = c.d_inner, c.d_state, c.dt_rank, c.d_conv, c.d_model, c.padded_vocab_size
    want = {"backbone.embedding.weight": (V, D), "backbone.norm_f.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(c.n_layer):
        p = f"backbone.layers.{i}."
        want.update({
            p + "norm.weight": (D,), p + "mixer.A_log": (E, N), p + "mixer.D": (E,),
            p + "mixer.in_proj.weight": (2 * E, D), p + "mixer.in_proj.bias": (2 * E,),
            p + "mixer.conv1d.weight": (E, 1, W), p + "mixer.conv1d.bias": (E,),
            p + "mixer.x_proj.weight": (R + 2 * N, E), p + "mixer.dt_proj.weight": (E, R),
            p + "mixer.dt_proj.bias": (E,), p + "mixer.out_proj.weight": (D, E), p + "mixer.out_proj.bias": (D,),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    model = MambaLM(c)
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert MambaLM(tiny(tie_embeddings=False)).lm_head.weight is not None


# --------------------------------------------------------------------------------------------------- init
def test_init_follows_the_official_recipe():
    torch.manual_seed(0)
    c = MambaConfig(d_model=128, n_layer=6, vocab_size=1000, bias=True)
    model = MambaLM(c)
    E = c.d_inner
    for layer in model.backbone.layers:
        m = layer.mixer
        dt = F.softplus(m.dt_proj.bias)
        assert dt.min() >= c.dt_min * 0.999 and dt.max() <= c.dt_max * 1.001
        assert dt.min() < 0.002 and dt.max() > 0.05  # log-uniform over the whole range
        log_dt = dt.log()  # log-uniform: mean of log dt is the midpoint of the log range
        assert abs(log_dt.mean() - (math.log(c.dt_min) + math.log(c.dt_max)) / 2) < 0.4
        assert torch.equal(m.A_log, torch.log(torch.arange(1, c.d_state + 1.0)).expand(E, -1))
        assert m.A_log.dtype == m.D.dtype == torch.float32 and torch.equal(m.D, torch.ones(E))
        r = c.dt_rank**-0.5
        assert m.dt_proj.weight.abs().max() <= r and m.dt_proj.weight.abs().max() > 0.9 * r
        assert torch.equal(m.in_proj.bias, torch.zeros(2 * E)) and torch.equal(m.out_proj.bias, torch.zeros(128))
        # kaiming_uniform(a=√5) = U(±1/√fan_in), std 1/√(3·E), then / √n_layer (GPT-2 residual scheme)
        want = 1 / math.sqrt(3 * E) / math.sqrt(c.n_layer)
        assert abs(m.out_proj.weight.std().item() / want - 1) < 0.03
        assert abs(m.in_proj.weight.std().item() / (1 / math.sqrt(3 * c.d_model)) - 1) < 0.03
        assert torch.equal(layer.norm.weight, torch.ones(128))
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.001


def test_dt_bias_survives_reinit():
    torch.manual_seed(0)
    model = MambaLM(tiny())
    bias = model.backbone.layers[0].mixer.dt_proj.bias.detach().clone()
    model.reset_parameters()
    assert torch.equal(model.backbone.layers[0].mixer.dt_proj.bias, bias)
    assert model.backbone.layers[0].mixer.A_log._no_weight_decay


# ------------------------------------------------------------------------------------------------ forward
def test_mamba_block_alone():
    torch.manual_seed(0)
    block = Mamba(tiny())
    u = torch.randn(3, 10, 32)
    y = block(u)
    assert y.shape == u.shape and torch.isfinite(y).all()
    y2, conv_state, ssm_state = block(u, return_state=True)
    assert torch.equal(y, y2) and conv_state.shape == (3, 64, 3) and ssm_state.shape == (3, 64, 16)
    assert ssm_state.dtype == torch.float32


def test_forward_shapes_and_num_last_tokens():
    model = make()
    ids = ids_for(model.config)
    out = model(ids)
    assert out.logits.shape == (2, 24, model.config.padded_vocab_size) and out.loss is None and out.state is None
    last = model(ids, num_last_tokens=3).logits
    torch.testing.assert_close(last, out.logits[:, -3:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("grad", [True, False])
def test_chunked_forward_with_state_equals_one_shot(grad):
    model = make(conv_bias=False)
    ids = ids_for(model.config, l=30)
    with torch.set_grad_enabled(grad):
        full = model(ids, return_state=True)
        state, pieces = None, []
        for a, b in [(0, 7), (7, 8), (8, 9), (9, 20), (20, 21), (21, 30)]:  # l = 1 chunks use the step ops
            out = model(ids[:, a:b], state=state, return_state=True)
            pieces.append(out.logits)
            state = out.state
    torch.testing.assert_close(torch.cat(pieces, 1), full.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.ssm, full.state.ssm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.conv, full.state.conv)
    zero = model(ids, state=model.allocate_state(2)).logits  # a zero state is "no prefix"
    torch.testing.assert_close(zero, full.logits, rtol=1e-5, atol=1e-5)


def test_loss_is_next_token_cross_entropy():
    model = make()
    ids = ids_for(model.config)
    labels = ids.clone()
    labels[0, 5:9] = -100
    out = model(ids, labels=labels)
    V = model.config.padded_vocab_size
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    assert out.loss.dtype == torch.float32


def test_backward_reaches_every_parameter():
    model = make(bias=True, tie_embeddings=False)
    ids = ids_for(model.config)
    state = model.allocate_state(2).ssm.requires_grad_()
    out = model(ids, labels=ids, state=MambaState(model.allocate_state(2).conv, state))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert state.grad is not None and torch.isfinite(state.grad).all()


# ---------------------------------------------------------------------------------------------- precision
def test_bfloat16_model_keeps_A_and_D_in_float32_and_is_close():
    model = make()
    ids = ids_for(model.config)
    ref = model(ids).logits
    A_log = model.backbone.layers[0].mixer.A_log.detach().clone()
    half = make().to(torch.bfloat16)
    m = half.backbone.layers[0].mixer
    assert m.A_log.dtype == m.D.dtype == torch.float32 and torch.equal(m.A_log, A_log)
    assert m.in_proj.weight.dtype == torch.bfloat16
    out = half(ids, labels=ids, return_state=True)
    assert out.logits.dtype == torch.bfloat16 and out.state.ssm.dtype == torch.float32
    err = (out.logits.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.03, err
    out.loss.backward()
    assert torch.isfinite(m.A_log.grad).all() and m.A_log.grad.dtype == torch.float32
    back = half.float()
    assert back.backbone.layers[0].mixer.in_proj.weight.dtype == torch.float32


def test_autocast_bfloat16_is_close():
    model = make()
    ids = ids_for(model.config)
    ref = model(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    err = (out.logits.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.03, err
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "ids, error, match",
    [(torch.tensor([[1, 101]]), ValueError, "101"), (torch.tensor([[-1, 2]]), ValueError, "-1"),
     (torch.zeros(1, 4), TypeError, "integer"), (torch.zeros(4, dtype=torch.long), ValueError, "input_ids\\[None\\]"),
     (torch.zeros(1, 2, 3, dtype=torch.long), ValueError, "shape"), (torch.zeros(1, 0, dtype=torch.long), ValueError,
                                                                    "at least one"),
     ([[1, 2]], TypeError, "torch.Tensor")],
)
def test_bad_input_ids(ids, error, match):
    with pytest.raises(error, match=match):
        make()(ids)


def test_bad_labels_and_state():
    model = make()
    ids = ids_for(model.config)
    with pytest.raises(ValueError, match="shape of input_ids"):
        model(ids, labels=ids[:, :-1])
    with pytest.raises(TypeError, match="labels"):
        model(ids, labels=ids.float())
    with pytest.raises(ValueError, match="-100"):
        model(ids, labels=ids - 5)
    with pytest.raises(ValueError, match="state does not fit"):
        model(ids, state=model.allocate_state(3))
    with pytest.raises(TypeError, match="MambaState"):
        model(ids, state=(1, 2))
    with pytest.raises(ValueError, match="num_last_tokens"):
        model(ids, num_last_tokens=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_saves_nothing_for_backward(monkeypatch, dtype):
    """Under torch.no_grad the fused ops keep no inputs, copies or state checkpoints for a backward: autograd
    marks every parameter as needing a gradient even then (ctx.needs_input_grad), so the ops must be told."""
    from torch.autograd.function import FunctionCtx

    saved = []
    original = FunctionCtx.save_for_backward
    monkeypatch.setattr(FunctionCtx, "save_for_backward", lambda ctx, *t: saved.append(len(t)) or original(ctx, *t))
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=64)).to(dtype)
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
    assert saved == []
    out = model(ids).logits  # with grad: both ops save for their backward, and the logits are the same
    assert len(saved) == 4 and torch.equal(out.detach(), ref)
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
