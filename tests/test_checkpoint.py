"""Checkpoints: logit parity with transformers' MambaForCausalLM, both layouts, conversion, atomic saves,
and clear errors for hub ids, bad keys and truncated or corrupted files."""

import json
import os
import shutil
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
def test_hub_id_offline_names_what_is_missing(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"state-spaces/mamba-130m \(revision main\): config.json is not in the cache"):
        MambaLM.from_pretrained("state-spaces/mamba-130m", cache_dir=tmp_path)
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
    (tmp_path / "config.json").write_text('{"model_type": "mamba", "hidden_size": -4}')
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


# ------------------------------------------------------------------------------------ owned weights
@pytest.mark.parametrize("layout, name", [("hf", "model.safetensors"), ("official", "pytorch_model.bin")])
def test_loaded_weights_do_not_alias_the_file(tmp_path, tiny_model, layout, name):
    tiny_model.save_pretrained(tmp_path, layout=layout)
    loaded = MambaLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 61, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = loaded(ids).logits.clone()
    path = tmp_path / name
    with open(path, "r+b") as f:  # overwritten in place, same inode: what a memory map would show
        f.write(os.urandom(path.stat().st_size))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    os.truncate(path, 0)  # a memory-mapped model dies of SIGBUS here
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_pickled_tensors_sharing_one_storage_are_copied_apart(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path, layout="official")
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    flat = torch.cat([v.reshape(-1) for v in sd.values()])
    views, pos = {}, 0
    for k, v in sd.items():
        views[k] = flat[pos:pos + v.numel()].view(v.shape)
        pos += v.numel()
    torch.save(views, tmp_path / "pytorch_model.bin")
    loaded = MambaLM.from_pretrained(tmp_path)
    params = list(loaded.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)  # training one moves no other
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in params)
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


# ------------------------------------------------------------------------ saving over a checkpoint
def _bpe():
    from mambakit.tokenizer import train_bpe

    return train_bpe(["the quick brown fox jumps over the lazy dog. " * 20], vocab_size=262)


def _unrelated(d: Path) -> dict:
    """What a training run keeps beside the model in its directory."""
    (d / "checkpoints" / "step_0000001").mkdir(parents=True, exist_ok=True)
    files = {d / "metrics.jsonl": b'{"step": 1, "loss": 2.5}\n', d / "train_config.json": b"{}\n",
             d / "checkpoints" / "step_0000001" / "model.safetensors": b"a training checkpoint"}
    for p, data in files.items():
        p.write_bytes(data)
    return files


def test_save_over_a_checkpoint_leaves_no_stale_file_and_keeps_other_files(tmp_path, tiny_model):
    d = tmp_path / "run"
    # an earlier sharded transformers save with a BPE tokenizer
    tiny_model.tokenizer = _bpe()
    tiny_model.save_pretrained(d, layout="hf")
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[:5], keys[5:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, d / name)
        weight_map.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert MambaLM.from_pretrained(d).tokenizer is not None
    unrelated = _unrelated(d)

    torch.manual_seed(1)
    other = MambaLM(tiny_model.config)  # no tokenizer
    other.save_pretrained(d, layout="official")
    assert sorted(os.listdir(d)) == ["checkpoints", "config.json", "metrics.jsonl", "pytorch_model.bin",
                                     "train_config.json"]
    loaded = MambaLM.from_pretrained(d)
    assert loaded.tokenizer is None  # the old BPE is not attached to a model saved without one
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in other.state_dict().items())

    from mambakit.tokenizer import ByteTokenizer

    other.tokenizer = ByteTokenizer()
    other.save_pretrained(d, layout="hf")
    assert sorted(os.listdir(d)) == ["checkpoints", "config.json", "mambakit_tokenizer.json", "metrics.jsonl",
                                     "model.safetensors", "train_config.json"]
    assert isinstance(MambaLM.from_pretrained(d).tokenizer, ByteTokenizer)
    assert all(p.read_bytes() == data for p, data in unrelated.items())
    with pytest.raises(NotADirectoryError, match="not a directory"):
        other.save_pretrained(d / "metrics.jsonl")


def test_a_model_with_nan_weights_is_not_saved(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    with torch.no_grad():
        tiny_model.backbone.layers[0].mixer.D[3] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.mixer\.D holds NaN"):
        tiny_model.save_pretrained(tmp_path)
    MambaLM.from_pretrained(tmp_path)  # the earlier checkpoint is intact


def _same(a: MambaLM, b: MambaLM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (a.config == b.config and set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
            and type(a.tokenizer) is type(b.tokenizer))


@pytest.mark.parametrize("how", ["exit", "raise"])
@pytest.mark.parametrize("scenario", ["layout and tokenizer change", "same layout, tokenizer dropped"])
def test_save_pretrained_killed_at_every_write_point_loads_old_or_new(tmp_path, tiny_model, monkeypatch, how,
                                                                      scenario):
    """Kill (os._exit in a forked child: no cleanup runs) or raise before each file-system change save_pretrained
    makes; the directory must load as the old model or the new one, whole, keep the run's other files, and take
    the next save cleanly."""
    from test_io import _Killed, _instrument  # the same write-point instrumentation as the _io tests

    from mambakit.tokenizer import ByteTokenizer

    if how == "exit" and not hasattr(os, "fork"):
        pytest.skip("needs fork")
    torch.manual_seed(1)
    new = MambaLM(tiny_model.config)
    if scenario == "layout and tokenizer change":
        tiny_model.tokenizer, old_layout, new.tokenizer, new_layout = _bpe(), "official", ByteTokenizer(), "hf"
    else:
        tiny_model.tokenizer, old_layout, new.tokenizer, new_layout = ByteTokenizer(), "hf", None, "hf"
    template = tmp_path / "template"
    tiny_model.save_pretrained(template, layout=old_layout)
    old_names = sorted(os.listdir(template))
    new.save_pretrained(tmp_path / "new-alone", layout=new_layout)
    new_names = sorted(os.listdir(tmp_path / "new-alone"))
    old_ref, new_ref = MambaLM.from_pretrained(template), MambaLM.from_pretrained(tmp_path / "new-alone")

    with monkeypatch.context() as m:
        calls = _instrument(m, None, how)
        shutil.copytree(template, tmp_path / "count")
        calls.clear()
        new.save_pretrained(tmp_path / "count", layout=new_layout)
    n_points = len(calls)
    assert n_points >= 8
    outcomes = []
    for k in range(1, n_points + 1):
        d = tmp_path / f"k{k}"
        shutil.copytree(template, d)
        unrelated = _unrelated(d)
        if how == "exit":
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                try:
                    torch.set_num_threads(1)
                    _instrument(monkeypatch, k, how)
                    new.save_pretrained(d, layout=new_layout)
                finally:
                    os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 77, (k, status)
        else:
            with monkeypatch.context() as m:
                _instrument(m, k, how)
                with pytest.raises(_Killed):
                    new.save_pretrained(d, layout=new_layout)
        loaded = MambaLM.from_pretrained(d)
        which = "old" if _same(loaded, old_ref) else "new" if _same(loaded, new_ref) else None
        assert which is not None, k
        assert all(p.read_bytes() == data for p, data in unrelated.items()), k
        names = sorted(n for n in os.listdir(d) if n not in ("checkpoints", "metrics.jsonl", "train_config.json")
                       and not n.endswith(".tmp"))
        assert names == (old_names if which == "old" else new_names), (k, names)  # completed for other readers too
        outcomes.append(which)
        new.save_pretrained(d, layout=new_layout)  # the next save works and removes the killed one's temporaries
        assert sorted(set(os.listdir(d)) - {"checkpoints", "metrics.jsonl", "train_config.json"}) == new_names, k
    print(f"save_pretrained ({scenario}), killed by {how}: {n_points} kill points tried, {len(outcomes)} loaded "
          f"whole ({outcomes.count('old')} old, {outcomes.count('new')} new)")
    assert "old" in outcomes and "new" in outcomes
