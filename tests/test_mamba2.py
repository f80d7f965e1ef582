"""The Mamba-2 model: config fields and presets, the official parameter layout and init, logits equal to
transformers' Mamba2ForCausalLM, a per-token recurrence of the block for what transformers cannot express
(D per channel, the MLP branch, norm before gate, no norm), state carried across calls and decoding steps,
bfloat16, and bad input named."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit import PRESETS, MambaConfig, MambaLM, MambaState
from mambakit.mamba2 import Mamba2


def cfg(**kw) -> MambaConfig:
    return MambaConfig(**{**dict(layer="Mamba2", d_model=32, n_layer=2, vocab_size=53, d_state=8, headdim=8,
                                 chunk_size=5), **kw})


def perturbed(config: MambaConfig, seed=0, dtype=torch.float32) -> MambaLM:
    """A model with every parameter moved off its init, so that every piece shows in the logits."""
    torch.manual_seed(seed)
    model = MambaLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "embedding" in name else 0.2))
    return model.to(dtype)


def ids_for(c, b=2, l=13, seed=1):
    return torch.randint(0, c.vocab_size, (b, l), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- config
def test_presets_are_the_released_sizes():
    sizes = {"mamba2-130m": (768, 24, 24, 128_989_632), "mamba2-370m": (1024, 48, 32, 368_346_624),
             "mamba2-780m": (1536, 48, 48, 780_161_280), "mamba2-1.3b": (2048, 48, 64, 1_343_757_312),
             "mamba2-2.7b": (2560, 64, 80, 2_702_599_680)}
    for name, (d, n_layer, heads, params) in sizes.items():
        c = MambaConfig.from_preset(name)
        assert (c.layer, c.d_model, c.n_layer, c.nheads, c.d_state, c.headdim, c.ngroups, c.padded_vocab_size) == (
            "Mamba2", d, n_layer, heads, 128, 64, 1, 50288)
        if d <= 1024:  # the parameter counts of mamba2.md §4a (computed for the released, tied checkpoints)
            with torch.device("meta"):
                assert MambaLM(c).num_parameters() == params, name
    for small in ("mamba2-tiny", "mamba2-mini", "mamba2-small"):
        c = MambaConfig.from_preset(small)
        assert c.nheads >= 2 and c.vocab_size == 258 and c.d_model == MambaConfig.from_preset(small[7:]).d_model
    assert {"mamba2-130m", "mamba2-2.7b", "mamba2-tiny"} <= set(PRESETS)


def test_config_defaults_round_trip_and_old_dicts():
    c = MambaConfig(layer="Mamba2", d_model=64, n_layer=1, vocab_size=10)
    assert (c.d_state, c.headdim, c.d_ssm, c.nheads, c.chunk_size, c.dt_limit) == (128, 64, 128, 2, 256, (0.0, math.inf))
    assert MambaConfig.from_dict(c.to_dict()) == c
    assert MambaConfig(layer="Mamba1", d_model=8, n_layer=1, vocab_size=10).layer == "Mamba"
    # a config dict written before Mamba-2 existed (no layer, no d_state): Mamba-1 with its own defaults
    old = MambaConfig.from_dict(dict(d_model=8, n_layer=1, vocab_size=10))
    assert (old.layer, old.d_state, old.nheads) == ("Mamba", 16, 0)
    listed = MambaConfig.from_dict({**c.to_dict(), "dt_limit": [0.001, 0.5]})  # a JSON list
    assert listed.dt_limit == (0.001, 0.5)


@pytest.mark.parametrize("kw, error, field", [
    (dict(headdim=7), ValueError, "headdim"), (dict(ngroups=3), ValueError, "ngroups"),
    (dict(d_ssm=44), ValueError, "d_ssm"), (dict(d_ssm=80), ValueError, "d_ssm"),
    (dict(chunk_size=0), ValueError, "chunk_size"), (dict(A_init_range=(0, 16)), ValueError, "A_init_range"),
    (dict(dt_limit=(0.5, 0.1)), ValueError, "dt_limit"), (dict(dt_limit=(0.0,)), TypeError, "dt_limit"),
    (dict(D_has_hdim=1), TypeError, "D_has_hdim"), (dict(layer="Mamba3"), ValueError, "layer"),
    (dict(layer="Mamba", headdim=16), ValueError, "headdim"), (dict(layer="Mamba", ngroups=2), ValueError, "ngroups"),
    (dict(conv_init=-1.0), ValueError, "conv_init"),
])
def test_bad_config_names_the_field(kw, error, field):
    with pytest.raises(error, match=field):
        cfg(**kw)


# ------------------------------------------------------------------------------------------------- layout
def test_parameter_names_shapes_and_init_are_official():
    c = cfg(d_model=64, n_layer=6, ngroups=2, bias=True, d_state=16, headdim=16)
    torch.manual_seed(0)
    model = MambaLM(c)
    E, G, N, H, W, D = c.d_inner, c.ngroups, c.d_state, c.nheads, c.d_conv, c.d_model
    conv_dim = E + 2 * G * N
    want = {"backbone.embedding.weight": (c.padded_vocab_size, D), "backbone.norm_f.weight": (D,),
            "lm_head.weight": (c.padded_vocab_size, D)}
    for i in range(c.n_layer):
        p = f"backbone.layers.{i}."
        want.update({p + "norm.weight": (D,), p + "mixer.in_proj.weight": (2 * E + 2 * G * N + H, D),
                     p + "mixer.in_proj.bias": (2 * E + 2 * G * N + H,), p + "mixer.conv1d.weight": (conv_dim, 1, W),
                     p + "mixer.conv1d.bias": (conv_dim,), p + "mixer.dt_bias": (H,), p + "mixer.A_log": (H,),
                     p + "mixer.D": (H,), p + "mixer.norm.weight": (E,), p + "mixer.out_proj.weight": (D, E),
                     p + "mixer.out_proj.bias": (D,)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    for layer in model.backbone.layers:
        m = layer.mixer
        assert isinstance(m, Mamba2)
        dt = F.softplus(m.dt_bias)
        assert dt.min() >= c.dt_min * 0.999 and dt.max() <= c.dt_max * 1.001
        A = m.A_log.exp()
        assert A.min() >= 1 and A.max() <= 16
        assert torch.equal(m.D, torch.ones(H)) and torch.equal(m.norm.weight, torch.ones(E))
        assert m.dt_bias._no_weight_decay and m.A_log._no_weight_decay and m.D._no_weight_decay
        assert torch.equal(m.in_proj.bias, torch.zeros_like(m.in_proj.bias))
        # out_proj: kaiming_uniform(a=√5) = U(±1/√fan_in), then / √n_layer, as for Mamba-1
        assert abs(m.out_proj.weight.std().item() / (1 / math.sqrt(3 * E) / math.sqrt(c.n_layer)) - 1) < 0.05
    # the variants' shapes: D per channel, no gated norm, an MLP branch (d_ssm < d_inner)
    m = Mamba2(cfg(D_has_hdim=True, rmsnorm=False, d_ssm=32))
    assert m.D.shape == (32,) and not hasattr(m, "norm") and m.conv1d.weight.shape[0] == 32 + 2 * 8
    assert m.in_proj.weight.shape[0] == 2 * 64 + 2 * 8 + 4


# ----------------------------------------------------------------------------------------- transformers
def hf_twin(model: MambaLM):
    """transformers' Mamba2ForCausalLM with the model's weights, its config written here field by field."""
    transformers = pytest.importorskip("transformers")
    c = model.config
    hc = transformers.Mamba2Config(
        vocab_size=c.padded_vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layer, num_heads=c.nheads,
        head_dim=c.headdim, state_size=c.d_state, n_groups=c.ngroups, expand=c.expand, conv_kernel=c.d_conv,
        chunk_size=c.chunk_size, use_conv_bias=c.conv_bias, use_bias=c.bias, tie_word_embeddings=c.tie_embeddings,
        time_step_limit=c.dt_limit, layer_norm_epsilon=c.norm_eps, residual_in_fp32=c.residual_in_fp32)
    hf = transformers.Mamba2ForCausalLM(hc).eval()
    sd = dict(model.state_dict())
    sd["backbone.embeddings.weight"] = sd.pop("backbone.embedding.weight")
    hf.load_state_dict(sd, strict=True)
    return hf


HF_CONFIGS = {
    "groups 2, chunk 5 of 13 tokens": dict(ngroups=2),
    "no conv bias, untied head": dict(conv_bias=False, tie_embeddings=False),
    "odd vocab padded, projection biases": dict(vocab_size=61, pad_vocab_size_multiple=16, bias=True),
    "4 groups of 1 head, dt_limit, long chunk": dict(ngroups=4, headdim=16, d_model=32, expand=2, chunk_size=64,
                                                     dt_limit=(0.01, 0.3)),
    "bf16-free residual": dict(residual_in_fp32=False, d_conv=3, expand=3, headdim=12),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_equal_transformers(name):
    model = perturbed(cfg(**HF_CONFIGS[name]))
    hf = hf_twin(model)
    ids = ids_for(model.config, l=13)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ a per-token recurrence
def naive_block(m: Mamba2, u: torch.Tensor) -> torch.Tensor:
    """The block of mamba2.md §1, one token at a time, written from the formulas (float64): u (b, l, D)."""
    c = m.config
    b, l, _ = u.shape
    E, S, H, P, G, N, W = c.d_inner, c.d_ssm, c.nheads, c.headdim, c.ngroups, c.d_state, c.d_conv
    d_mlp = E - S
    zxbcdt = F.linear(u, m.in_proj.weight, m.in_proj.bias)
    z0, x0, z, xbc, dt = torch.split(zxbcdt, [d_mlp, d_mlp, S, S + 2 * G * N, H], dim=-1)
    padded = torch.cat([xbc.new_zeros(b, W - 1, xbc.shape[-1]), xbc], dim=1)
    w = m.conv1d.weight[:, 0]  # (channels, W)
    conv = torch.stack([(padded[:, t: t + W].transpose(1, 2) * w).sum(-1) for t in range(l)], dim=1)
    if m.conv1d.bias is not None:
        conv = conv + m.conv1d.bias
    conv = F.silu(conv)
    x, B, C = torch.split(conv, [S, G * N, G * N], dim=-1)
    group_of_head = torch.arange(H) // (H // G)
    A = -torch.exp(m.A_log)
    Dh = m.D.reshape(H, P) if c.D_has_hdim else m.D[:, None].expand(H, P)
    state = u.new_zeros(b, H, P, N)
    ys = []
    for t in range(l):
        delta = F.softplus(dt[:, t] + m.dt_bias).clamp(*c.dt_limit)  # (b, H)
        xt = x[:, t].reshape(b, H, P)
        Bt = B[:, t].reshape(b, G, N)[:, group_of_head]  # (b, H, N)
        Ct = C[:, t].reshape(b, G, N)[:, group_of_head]
        for h in range(H):
            state[:, h] = (torch.exp(delta[:, h] * A[h])[:, None, None] * state[:, h]
                           + delta[:, h, None, None] * xt[:, h, :, None] * Bt[:, h, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ct) + Dh * xt)
    y = torch.stack(ys, 1).reshape(b, l, S)
    if c.rmsnorm:
        gate = F.silu(z)
        v = y if c.norm_before_gate else y * gate
        v = v.reshape(b, l, G, S // G)
        v = (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + c.norm_eps)).reshape(b, l, S) * m.norm.weight
        y = v * gate if c.norm_before_gate else v
    else:
        y = y * F.silu(z)
    if d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


RECURRENCE_CONFIGS = {
    "D per channel (D_has_hdim)": dict(D_has_hdim=True, ngroups=2),
    "MLP branch (d_ssm < d_inner), bias": dict(d_ssm=32, bias=True),
    "norm before gate, dt_limit": dict(norm_before_gate=True, ngroups=4, dt_limit=(0.02, 0.2)),
    "no gated norm (z gate in the op)": dict(rmsnorm=False, D_has_hdim=True),
}


@pytest.mark.parametrize("name", list(RECURRENCE_CONFIGS))
def test_block_equals_a_per_token_recurrence(name):
    model = perturbed(cfg(n_layer=1, **RECURRENCE_CONFIGS[name])).double()
    m = model.backbone.layers[0].mixer
    u = torch.randn(2, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = naive_block(m, u)
        torch.testing.assert_close(m(u), want, atol=1e-10, rtol=1e-9)
        # and one token at a time through step
        conv = torch.zeros(2, m.conv_dim, 3, dtype=torch.float64)
        ssm = torch.zeros(2, m.config.nheads, m.config.headdim, m.config.d_state, dtype=torch.float64)
        stepped = torch.stack([m.step(u[:, t], conv, ssm) for t in range(13)], 1)
        torch.testing.assert_close(stepped, want, atol=1e-10, rtol=1e-9)


# ------------------------------------------------------------------------------------------------ state
@pytest.mark.parametrize("kw", [dict(ngroups=2), dict(D_has_hdim=True, dt_limit=(0.01, 0.5), d_ssm=48, headdim=16)])
def test_chunked_forward_and_steps_equal_one_forward(kw):
    model = perturbed(cfg(**kw))
    ids = ids_for(model.config, l=17)
    with torch.no_grad():
        full = model(ids, return_state=True)
        state, parts = None, []
        for a, b in ((0, 3), (3, 4), (4, 12), (12, 17)):  # lengths 3, 1, 8, 5 against chunk_size 5
            out = model(ids[:, a:b], state=state, return_state=True)
            parts.append(out.logits)
            state = out.state
        torch.testing.assert_close(torch.cat(parts, 1), full.logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(state.ssm, full.state.ssm, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(state.conv, full.state.conv)
        # prefill 9 tokens, then step the other 8; the state is updated in place
        state = model(ids[:, :9], return_state=True).state
        ptrs = state.conv.data_ptr(), state.ssm.data_ptr()
        steps = torch.stack([model.step(ids[:, t], state) for t in range(9, 17)], 1)
        torch.testing.assert_close(steps, full.logits[:, 9:], atol=1e-4, rtol=1e-4)
        assert (state.conv.data_ptr(), state.ssm.data_ptr()) == ptrs
        # from allocate_state: all 17 by step
        zero = model.allocate_state(2)
        assert isinstance(zero, MambaState) and zero.ssm.dtype == torch.float32
        all_steps = torch.stack([model.step(ids[:, t], zero) for t in range(17)], 1)
        torch.testing.assert_close(all_steps, full.logits, atol=1e-4, rtol=1e-4)


def test_state_shapes_loss_last_tokens_and_gradients():
    c = cfg(ngroups=2)
    model = perturbed(c).train()
    ids = ids_for(c)
    out = model(ids, labels=ids, return_state=True)
    conv_dim = c.d_inner + 2 * c.ngroups * c.d_state
    assert out.state.conv.shape == (2, 2, conv_dim, c.d_conv - 1)
    assert out.state.ssm.shape == (2, 2, c.nheads, c.headdim, c.d_state)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids, num_last_tokens=3).logits, out.logits[:, -3:])


def test_bfloat16_keeps_the_ssm_parameters_in_float32():
    model32 = perturbed(cfg(ngroups=2), seed=4)
    model16 = perturbed(cfg(ngroups=2), seed=4).to(torch.bfloat16)
    for m in (layer.mixer for layer in model16.backbone.layers):
        assert m.dt_bias.dtype == m.A_log.dtype == m.D.dtype == torch.float32
        assert m.in_proj.weight.dtype == m.norm.weight.dtype == torch.bfloat16
    ids = ids_for(model32.config, l=20)
    with torch.no_grad():
        want, got = model32(ids).logits, model16(ids).logits
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
        state = model16(ids[:, :19], return_state=True).state
        step = model16.step(ids[:, 19], state)
        assert (step.float() - got[:, 19].float()).abs().max() < 0.05 * want.abs().max()


def test_a_state_of_the_other_mixer_is_refused_by_shape():
    model = perturbed(cfg())
    mamba1 = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=53, d_state=8))
    ids = ids_for(model.config)
    with pytest.raises(ValueError, match=r"\(n_layer, b, h, p, n\)"):
        model(ids, state=MambaState.zeros(model.config, 3))
    with pytest.raises(ValueError, match="matching the state"):
        model.step(ids[:, 0], mamba1.allocate_state(2))
    with pytest.raises(ValueError, match="Mamba2"):
        model(ids, state=MambaState(torch.zeros(2, 2, 64, 3), torch.zeros(2, 2, 4, 16, 8)))
    with pytest.raises(TypeError, match="mixer_cls"):
        MambaLM(cfg(), mixer_cls=type(mamba1.backbone.layers[0].mixer))
