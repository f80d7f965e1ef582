"""Checkpoints: logit parity with transformers' MambaForCausalLM, both layouts, conversion, atomic saves,
and clear errors for hub ids, bad keys and truncated or corrupted files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mambakit import MambaConfig, MambaLM, checkpoint
from mambakit.checkpoint import CheckpointError
from mambakit.cli import main as cli_main

transformers = pytest.importorskip("transformers")  # the test-only extra

# Small transformers configs: odd vocabularies, d_state ≠ 16, no conv bias, biases, untied head, odd widths.
HF_CONFIGS = {
    "odd-vocab": dict(vocab_size=1001, hidden_size=64, num_hidden_layers=2),
    "d_state-8-no-conv-bias": dict(vocab_size=97, hidden_size=48, num_hidden_layers=3, state_size=8,
                                   use_conv_bias=False, conv_kernel=3, expand=3, time_step_rank=5),
    "d_state-24-bias-untied": dict(vocab_size=259, hidden_size=40, num_hidden_layers=2, state_size=24,
                                   use_bias=True, tie_word_embeddings=False, layer_norm_epsilon=1e-6),
}


def hf_model(**kw):
    """A random transformers MambaForCausalLM; every parameter perturbed so that norms, D, biases are not
    at their trivial init values and parity cannot hold by accident."""
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def tensors(directory) -> dict[str, torch.Tensor]:
    d = Path(directory)
    if (d / "model.safetensors").exists():
        return load_file(d / "model.safetensors")
    return torch.load(d / "pytorch_model.bin", weights_only=True)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    dirs = {}
    for name, kw in HF_CONFIGS.items():
        d = tmp_path_factory.mktemp(name)
        hf_model(**kw).save_pretrained(d)
        dirs[name] = d
    return dirs


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=61, d_state=4))


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", HF_CONFIGS)
def test_logits_match_transformers(hf_dirs, name):
    hf = transformers.MambaForCausalLM.from_pretrained(hf_dirs[name]).eval()
    ours = MambaLM.from_pretrained(hf_dirs[name]).eval()
    assert ours.config.padded_vocab_size == HF_CONFIGS[name]["vocab_size"]
    ids = torch.randint(0, HF_CONFIGS[name]["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids).logits
    diff = (want - got).abs().max().item()
    print(f"{name}: max |logit diff| vs transformers = {diff:.2e}")
    assert diff <= 1e-4


def test_transformers_loads_what_we_save(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path, layout="hf")
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 61, (1, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits - tiny_model(ids).logits).abs().max().item()
    assert diff <= 1e-4


# ----------------------------------------------------------------------------------------------- layouts
@pytest.mark.filterwarnings("ignore:the official layout has no norm epsilon")  # layer_norm_epsilon=1e-6 case
@pytest.mark.parametrize("name", HF_CONFIGS)
def test_hf_to_official_to_hf_is_identical(hf_dirs, tmp_path, name):
    src = hf_dirs[name]
    assert cli_main(["convert", str(src), str(tmp_path / "official"), "--layout", "official"]) == 0
    official = tensors(tmp_path / "official")
    assert "backbone.embedding.weight" in official and "backbone.embeddings.weight" not in official
    cfg = json.loads((tmp_path / "official" / "config.json").read_text())
    assert {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32",
            "pad_vocab_size_multiple", "tie_embeddings"} <= set(cfg)
    checkpoint.convert(MambaLM, tmp_path / "official", tmp_path / "back", layout="hf")
    a, b = tensors(src), tensors(tmp_path / "back")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_official_layout_round_trip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path, layout="official")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
    sd = tensors(tmp_path)
    assert torch.equal(sd["lm_head.weight"], sd["backbone.embedding.weight"])  # stored tied, as official does
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["vocab_size"] == 61 and cfg["pad_vocab_size_multiple"] == 8 and cfg["ssm_cfg"]["d_state"] == 4
    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.config == tiny_model.config
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    for (k, v), (k2, v2) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert loaded.backbone.layers[0].mixer.dt_proj.bias._no_reinit  # flags restored after loading


def test_official_config_v1_with_defaults(tmp_path, tiny_model):
    """Old official config.json files (no ssm_cfg entries, no d_intermediate) load with the defaults."""
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=61))
    model.save_pretrained(tmp_path, layout="official")
    (tmp_path / "config.json").write_text(json.dumps(dict(
        d_model=32, n_layer=2, vocab_size=61, ssm_cfg={}, rms_norm=True, residual_in_fp32=True,
        fused_add_norm=True, pad_vocab_size_multiple=8)))
    assert MambaLM.from_pretrained(tmp_path / "config.json").config == model.config


def test_sharded_and_pickled_transformers_checkpoints(hf_dirs, tmp_path):
    ref = MambaLM.from_pretrained(hf_dirs["odd-vocab"])
    sd = tensors(hf_dirs["odd-vocab"])
    shard_a, shard_b = tmp_path / "sharded", tmp_path / "pickled"
    for d in (shard_a, shard_b):
        d.mkdir()
        (d / "config.json").write_bytes((hf_dirs["odd-vocab"] / "config.json").read_bytes())
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, shard_a / name)
        weight_map.update({k: name for k in part})
    (shard_a / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.save(sd, shard_b / "pytorch_model.bin")
    for d in (shard_a, shard_b):
        loaded = MambaLM.from_pretrained(d)
        for k, v in ref.state_dict().items():
            assert torch.equal(v, loaded.state_dict()[k]), k


def test_load_in_bfloat16_keeps_A_and_D_in_float32(hf_dirs, tmp_path):
    model = MambaLM.from_pretrained(hf_dirs["odd-vocab"], dtype=torch.bfloat16)
    m = model.backbone.layers[0].mixer
    assert m.in_proj.weight.dtype == torch.bfloat16 and m.A_log.dtype == m.D.dtype == torch.float32
    model.save_pretrained(tmp_path, layout="hf")  # bf16 on disk, A_log/D float32 as in the model
    sd = tensors(tmp_path)
    assert sd["backbone.embeddings.weight"].dtype == torch.bfloat16
    assert sd["backbone.layers.0.mixer.A_log"].dtype == torch.float32
    assert checkpoint.convert(MambaLM, tmp_path, tmp_path / "same")[1].backbone.embedding.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ atomic saves
def test_interrupted_save_leaves_nothing_that_loads(tmp_path, tiny_model, monkeypatch):
    real_fsync = os.fsync

    def crash(fd):
        raise KeyboardInterrupt  # killed after the bytes were written, before the rename

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.save_pretrained(tmp_path / "new")
    assert os.listdir(tmp_path / "new") == []  # no half file, no temporary left behind
    with pytest.raises(CheckpointError, match="config.json"):
        MambaLM.from_pretrained(tmp_path / "new")

    # Overwriting an existing checkpoint: an interrupted save leaves the old one intact.
    monkeypatch.setattr(os, "fsync", real_fsync)
    tiny_model.save_pretrained(tmp_path / "old")
    before = tensors(tmp_path / "old")
    torch.manual_seed(1)
    other = MambaLM(tiny_model.config)
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(tmp_path / "old")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(os.listdir(tmp_path / "old")) == ["config.json", "model.safetensors"]
    after = MambaLM.from_pretrained(tmp_path / "old").state_dict()
    assert all(torch.equal(before[k.replace("embedding.", "embeddings.")], v) for k, v in after.items()
               if k != "lm_head.weight")


def test_save_replaces_the_other_layouts_weights(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path, layout="official")
    tiny_model.save_pretrained(tmp_path, layout="hf")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="layout"):
        tiny_model.save_pretrained(tmp_path, layout="gguf")


# ------------------------------------------------------------------------------------------- bad inputs
def test_hub_id_explains_how_to_download():
    with pytest.raises(FileNotFoundError, match="hf download state-spaces/mamba-130m"):
        MambaLM.from_pretrained("state-spaces/mamba-130m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MambaLM.from_pretrained("/nonexistent/dir/x")


def test_key_and_shape_problems_are_named(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("backbone.layers.1.mixer.D")
    sd["backbone.layers.0.mixer.extra"] = torch.zeros(1)
    sd["backbone.layers.0.mixer.x_proj.weight"] = torch.zeros(5, 5)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        MambaLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing keys: backbone.layers.1.mixer.D" in msg
    assert "unexpected keys: backbone.layers.0.mixer.extra" in msg
    assert "backbone.layers.0.mixer.x_proj.weight: checkpoint (5, 5)" in msg


@pytest.mark.parametrize("layout, name", [("hf", "model.safetensors"), ("official", "pytorch_model.bin")])
def test_truncated_weights_say_so(tmp_path, tiny_model, layout, name):
    tiny_model.save_pretrained(tmp_path, layout=layout)
    path = tmp_path / name
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            MambaLM.from_pretrained(tmp_path)


def test_corrupted_files(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="corrupted"):
        MambaLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 32, "num_hidden')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        MambaLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": -4}')
    with pytest.raises(CheckpointError, match="d_model"):
        MambaLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"foo": 1}')
    with pytest.raises(CheckpointError, match="neither"):
        MambaLM.from_pretrained(tmp_path)


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["MAMBAKIT_TEST_MARKER"]),))


def test_pickle_code_is_never_executed(tmp_path, tiny_model, monkeypatch):
    tiny_model.save_pretrained(tmp_path, layout="official")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MAMBAKIT_TEST_MARKER", str(marker))
    torch.save({"backbone.embedding.weight": _Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        MambaLM.from_pretrained(tmp_path)
    assert not marker.exists()


def test_cli_convert(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "src", layout="official")
    out = subprocess.run(
        [sys.executable, "-m", "mambakit", "convert", str(tmp_path / "src"), str(tmp_path / "dst"),
         "--layout", "hf", "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "official layout" in out.stdout and "bfloat16" in out.stdout
    assert tensors(tmp_path / "dst")["backbone.embeddings.weight"].dtype == torch.bfloat16
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
