"""Mamba-2 checkpoints: both layouts read and written, official ⇄ transformers round trips, what mambakit writes
loads in transformers' Mamba2ForCausalLM with the same logits and what transformers writes loads here, the
config fields mapped or refused by name."""

import json
import math

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.checkpoint import CheckpointError, load_config
from mambakit.cli import main as cli_main

transformers = pytest.importorskip("transformers")


def perturbed(seed=0, **kw) -> MambaLM:
    c = MambaConfig(**{**dict(layer="Mamba2", d_model=32, n_layer=2, vocab_size=53, d_state=8, headdim=8,
                              chunk_size=5), **kw})
    torch.manual_seed(seed)
    model = MambaLM(c).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


IDS = torch.randint(0, 53, (2, 13), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("kw", [dict(ngroups=2), dict(tie_embeddings=False, conv_bias=False, bias=True)])
def test_official_to_transformers_and_back(tmp_path, kw):
    model = perturbed(**kw)
    want = logits(model)
    model.save_pretrained(tmp_path / "official", layout="official")
    raw = json.loads((tmp_path / "official" / "config.json").read_text())
    assert raw["ssm_cfg"]["layer"] == "Mamba2" and raw["ssm_cfg"]["d_ssm"] is None
    assert cli_main(["convert", str(tmp_path / "official"), str(tmp_path / "hf"), "--layout", "hf"]) == 0
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (raw["model_type"], raw["n_groups"], raw["num_heads"]) == ("mamba2", model.config.ngroups, 8)
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, want, atol=1e-4, rtol=1e-4)
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--layout", "official"]) == 0
    for name in ("official", "hf", "back"):
        loaded = MambaLM.from_pretrained(tmp_path / name)
        assert loaded.config.layer == "Mamba2" and loaded.config.ngroups == model.config.ngroups
        torch.testing.assert_close(logits(loaded), want, atol=0, rtol=0)
    # the official config keeps the tokenizer's size; transformers' has only the padded one, which stays
    assert load_config(tmp_path / "official")[0].vocab_size == 53
    assert load_config(tmp_path / "back")[0].padded_vocab_size == load_config(tmp_path / "back")[0].vocab_size == 56


@pytest.mark.parametrize("tie", [True, False])
def test_a_checkpoint_transformers_saved_loads_with_the_same_logits(tmp_path, tie):
    torch.manual_seed(0)
    hc = transformers.Mamba2Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                   state_size=8, n_groups=2, chunk_size=4, tie_word_embeddings=tie,
                                   time_step_limit=(0.0, float("inf")))
    hf = transformers.Mamba2ForCausalLM(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    model = MambaLM.from_pretrained(tmp_path)
    c = model.config
    assert (c.layer, c.nheads, c.headdim, c.ngroups, c.d_state, c.chunk_size, c.tie_embeddings) == (
        "Mamba2", 4, 16, 2, 8, 4, tie)
    ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_the_official_defaults_and_transformers_spellings_of_infinity(tmp_path):
    model = perturbed(d_model=64, d_state=128, headdim=64, chunk_size=256)
    model.save_pretrained(tmp_path, layout="official")
    # a released config: ssm_cfg says only the layer, every other mixer field is the official default
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["ssm_cfg"] = {"layer": "Mamba2"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c, layout = load_config(tmp_path)
    assert layout == "official" and (c.d_state, c.headdim, c.nheads, c.chunk_size, c.dt_limit) == (
        128, 64, 2, 256, (0.0, math.inf))
    torch.testing.assert_close(logits(MambaLM.from_pretrained(tmp_path)), logits(model))
    # transformers writes time_step_limit as [0.0, Infinity]; one version wrote {"__float__": "Infinity"}
    model.save_pretrained(tmp_path / "hf")
    assert "Infinity" in (tmp_path / "hf" / "config.json").read_text()
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    raw["time_step_limit"] = [0.0, {"__float__": "Infinity"}]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(raw))
    assert load_config(tmp_path / "hf")[0].dt_limit == (0.0, math.inf)


def test_bfloat16_load_keeps_the_ssm_parameters_in_float32(tmp_path):
    perturbed().save_pretrained(tmp_path)
    model = MambaLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    m = model.backbone.layers[0].mixer
    assert m.in_proj.weight.dtype == torch.bfloat16
    assert m.A_log.dtype == m.D.dtype == m.dt_bias.dtype == torch.float32 and m.A_log._no_weight_decay


@pytest.mark.parametrize("kw, field", [(dict(D_has_hdim=True), "D_has_hdim"), (dict(rmsnorm=False), "rmsnorm"),
                                       (dict(norm_before_gate=True), "norm_before_gate"), (dict(d_ssm=32), "d_ssm")])
def test_what_transformers_cannot_express_is_written_official_only(tmp_path, kw, field):
    model = perturbed(**kw)
    with pytest.raises(CheckpointError, match=field):
        model.save_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "official", layout="official")
    torch.testing.assert_close(logits(MambaLM.from_pretrained(tmp_path / "official")), logits(model))


def _hf_config(**edit):
    base = dict(model_type="mamba2", architectures=["Mamba2ForCausalLM"], vocab_size=56, hidden_size=32,
                num_hidden_layers=2, num_heads=8, head_dim=8, state_size=8, n_groups=1, expand=2)
    base.update(edit)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("config, phrase", [
    (_hf_config(num_heads=6), "num_heads"),
    (_hf_config(hidden_act="gelu"), "hidden_act"),
    (_hf_config(n_groups=3), "ngroups"),
    (_hf_config(n_groups=None, num_heads=4, head_dim=16), "ngroups"),  # transformers' default: 8 groups
    (_hf_config(time_step_limit=[0.5, 0.1]), "dt_limit"),
    (_hf_config(head_dim=5, num_heads=None), "headdim"),
    (_hf_config(architectures=["MambaForCausalLM"]), "architectures"),
    (_hf_config(model_type="mamba", architectures=None), "Mamba-2's fields"),
    (_hf_config(mixer_rms_eps=1e-6), "FalconMamba"),
    ({"d_model": 32, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {"layer": "Mamba2", "dt_rank": 4}}, "dt_rank"),
    ({"d_model": 32, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {"layer": "Mamba2", "activation": "relu"}},
     "activation"),
    ({"d_model": 32, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {"layer": "Mamba2", "headdim": 24}}, "headdim"),
    ({"d_model": 32, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {"layer": "Mamba1", "headdim": 8}}, "headdim"),
])
def test_bad_mamba2_configs_are_refused_naming_the_field(tmp_path, config, phrase):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(CheckpointError, match=phrase):
        MambaLM.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_a_mamba2_config_are_named(tmp_path):
    perturbed(ngroups=2).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["n_groups"] = 1  # the conv and in_proj are 2·G·N wider than this config says
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*mixer\.conv1d\.weight: checkpoint \(96, 1, 4\) "
                                              r"vs model \(80, 1, 4\)"):
        MambaLM.from_pretrained(tmp_path)
