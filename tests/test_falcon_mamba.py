"""FalconMamba (config.mixer_rms_eps): logits and greedy generation against transformers' FalconMambaForCausalLM,
the transformers layout both ways (no official layout), the fused decode step against MambaLM.step, the config."""

from __future__ import annotations

import json

import pytest
import torch

from mambakit import MambaConfig, MambaLM, generate
from mambakit.checkpoint import CheckpointError
from mambakit.cli import main as cli_main
from mambakit.engine import FusedDecoder

transformers = pytest.importorskip("transformers")  # the test-only extra

# Small transformers configs: d_state ≠ 16, biases, untied head, odd widths, Falcon3's epsilon, and
# falcon-mamba-7b's contradiction (expand 16 with an intermediate_size of 2·hidden: the latter wins).
HF_CONFIGS = {
    "base": dict(vocab_size=101, hidden_size=64, num_hidden_layers=2),
    "d_state-8-bias-untied": dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, state_size=8, use_bias=True,
                                  tie_word_embeddings=False, conv_kernel=3, expand=3, time_step_rank=5,
                                  mixer_rms_eps=1e-5),
    "expand-16-intermediate-2x": dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, expand=16,
                                      intermediate_size=64, time_step_rank=8, mixer_rms_eps=1e-3),
}
PROMPTS = [[5, 17, 3, 40, 22, 9, 31], [12], [7, 7, 50, 2], [33, 1, 60, 4, 4, 18, 27, 11, 9, 2, 45]]


def hf_falcon(**kw):
    """A random FalconMambaForCausalLM, every parameter perturbed (norms, D, biases off their init values)."""
    torch.manual_seed(0)
    model = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def falcon_model(seed=0, **kw) -> MambaLM:
    """A random mambakit FalconMamba, perturbed as tests/_models.random_model does."""
    torch.manual_seed(seed)
    kw = {**dict(d_model=32, n_layer=2, vocab_size=64, mixer_rms_eps=1e-6), **kw}
    model = MambaLM(MambaConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "embedding" in name else 0.1))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    dirs = {}
    for name, kw in HF_CONFIGS.items():
        d = tmp_path_factory.mktemp(name)
        hf_falcon(**kw).save_pretrained(d)
        dirs[name] = d
    return dirs


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", HF_CONFIGS)
def test_logits_match_transformers(hf_dirs, name):
    hf = transformers.FalconMambaForCausalLM.from_pretrained(hf_dirs[name]).eval()
    ours = MambaLM.from_pretrained(hf_dirs[name]).eval()
    c = ours.config
    assert c.mixer_rms_eps == HF_CONFIGS[name].get("mixer_rms_eps", 1e-6)
    assert c.d_inner == hf.config.intermediate_size
    ids = torch.randint(0, HF_CONFIGS[name]["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids).logits
        plain = MambaLM(MambaConfig(**{**c.to_dict(), "mixer_rms_eps": None}))
        plain.load_state_dict(ours.state_dict())
        without_norms = plain(ids).logits
    diff = (want - got).abs().max().item()
    print(f"{name}: max |logit diff| vs transformers = {diff:.2e}")
    assert diff <= 1e-4
    assert (want - without_norms).abs().max() > 1e-2  # the norms matter: plain Mamba-1 is far off


def test_chunked_forward_and_steps_equal_one_call():
    model = falcon_model(d_state=16)
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        a = model(ids[:, :7], return_state=True)
        b = model(ids[:, 7:], state=a.state, return_state=True)
        torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full, atol=1e-5, rtol=1e-5)
        state = model.allocate_state(3)
        steps = torch.stack([model.step(ids[:, t], state) for t in range(20)], 1)
        torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)


def test_greedy_generation_on_a_mixed_length_batch_matches_transformers(tmp_path):
    ours = falcon_model(seed=1, d_model=48, n_layer=3)
    ours.save_pretrained(tmp_path, layout="hf")
    hf = transformers.FalconMambaForCausalLM.from_pretrained(tmp_path).eval()
    batch = generate(ours, PROMPTS, 12, temperature=0, eos_token_id=0)  # one batch of four lengths
    for i, prompt in enumerate(PROMPTS):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=0,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert batch.sequences[i] == ref
    assert len({tuple(s) for s in batch.sequences}) > 1  # rows differ: not a constant continuation


# ----------------------------------------------------------------------------------------------- layouts
def test_save_and_load_round_trip_reloads_in_transformers(tmp_path):
    ours = falcon_model(tie_embeddings=False, bias=True)
    ours.save_pretrained(tmp_path, layout="hf")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "falcon_mamba" and cfg["architectures"] == ["FalconMambaForCausalLM"]
    assert cfg["mixer_rms_eps"] == 1e-6
    hf = transformers.FalconMambaForCausalLM.from_pretrained(tmp_path).eval()
    back = MambaLM.from_pretrained(tmp_path).eval()
    assert back.config == MambaConfig(**{**ours.config.to_dict(), "pad_vocab_size_multiple": 1})  # vocab 64 as is
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(ids).logits
        assert (hf(ids).logits - want).abs().max() <= 1e-4
        assert torch.equal(back(ids).logits, want)


def test_official_layout_is_refused_by_name(tmp_path, hf_dirs, capsys):
    model = falcon_model()
    with pytest.raises(CheckpointError, match="FalconMamba .* has no official layout"):
        model.save_pretrained(tmp_path / "official", layout="official")
    assert not (tmp_path / "official").exists() or not any((tmp_path / "official").iterdir())
    assert cli_main(["convert", str(hf_dirs["base"]), str(tmp_path / "conv"), "--layout", "official"]) != 0
    assert "has no official layout" in capsys.readouterr().err
    # hf → hf is the one conversion there is (a dtype change, say)
    assert cli_main(["convert", str(hf_dirs["base"]), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["model_type"] == "falcon_mamba"


@pytest.mark.parametrize("edit, phrase", [
    (dict(intermediate_size=50), "intermediate_size"),  # not a multiple of hidden_size 32
    (dict(mixer_rms_eps=-1.0), "mixer_rms_eps"),
    (dict(num_heads=4, head_dim=8), "Mamba-2's fields"),
    (dict(architectures=["MambaForCausalLM"]), "architectures"),
])
def test_bad_falcon_configs_are_refused_naming_the_field(tmp_path, edit, phrase):
    config = {"model_type": "falcon_mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64, **edit}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(CheckpointError, match=phrase):
        MambaLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ config
def test_presets_and_validation():
    c = MambaConfig.from_preset("falcon-mamba-7b")
    assert (c.d_model, c.n_layer, c.d_inner, c.dt_rank, c.d_state, c.padded_vocab_size) == (4096, 64, 8192, 256, 16,
                                                                                           65024)
    assert c.mixer_rms_eps == 1e-6 and not c.tie_embeddings
    assert MambaConfig.from_preset("falcon-mamba-tiny").mixer_rms_eps == 1e-6
    assert MambaConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="mixer_rms_eps"):
        MambaConfig(d_model=64, n_layer=2, vocab_size=64, layer="Mamba2", mixer_rms_eps=1e-6)
    with pytest.raises(ValueError, match="mixer_rms_eps"):
        MambaConfig(d_model=64, n_layer=2, vocab_size=64, mixer_rms_eps=0.0)
    with pytest.raises(TypeError, match="mixer_rms_eps"):
        MambaConfig(d_model=64, n_layer=2, vocab_size=64, mixer_rms_eps="1e-6")


# ------------------------------------------------------------------------------------------ fused decode
@pytest.mark.parametrize("dtype, batch, d_state", [(torch.float32, 1, 16), (torch.float32, 9, 16),
                                                   (torch.float32, 4, 5), (torch.bfloat16, 3, 16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_fused_step_equals_reference_step(dtype, batch, d_state):
    """The fused step's `_mixer_norms` against MambaLM.step (its reference twin): logits and both states over many
    steps; d_inner 80 and x_proj's R + 2N rows not whole panels."""
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    model = falcon_model(d_model=40, d_state=d_state, bias=batch == 9).to(dtype)
    ids = torch.randint(0, 64, (batch, 16), generator=torch.Generator().manual_seed(batch))
    decoder = FusedDecoder(model)
    results = []
    for step in (model.step, decoder.step):
        state = model.allocate_state(batch)
        results.append((torch.stack([step(ids[:, t], state).float() for t in range(16)], 1), state))
    (ref, ref_state), (out, state) = results
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(state.ssm, ref_state.ssm, **tol)
    torch.testing.assert_close(state.conv.float(), ref_state.conv.float(), **tol)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # the fused kernel applies the norms: the same weights as plain Mamba-1 step to other logits
    plain = MambaLM(MambaConfig(**{**model.config.to_dict(), "mixer_rms_eps": None})).to(dtype)
    plain.load_state_dict(model.state_dict())
    plain_state = plain.allocate_state(batch)
    plain_out = torch.stack([FusedDecoder(plain).step(ids[:, t], plain_state).float() for t in range(16)], 1)
    assert (plain_out - out).abs().max() > 1e-2
