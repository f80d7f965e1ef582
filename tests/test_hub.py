"""Hub ids through huggingface_hub, against a local stand-in for the Hub's HTTP API (tests/hub_standin.py): download
of only the files a checkpoint needs, cache hits offline (the stand-in stopped), revisions, sharded weights,
clear errors for what is missing, the command line, and push_to_hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("huggingface_hub")

from _models import random_model  # noqa: E402
from hub_standin import StandInHub  # noqa: E402
from mambakit import MambaLM  # noqa: E402
from mambakit.checkpoint import CheckpointError  # noqa: E402
from mambakit.hub import HubError, from_pretrained, is_hub_id, push_to_hub, resolve  # noqa: E402
from mambakit.tokenizer import ByteTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def standin():
    hub = StandInHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf-cache"


def _same_weights(a: MambaLM, b: MambaLM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _saved(tmp_path, name, seed=0, **kw) -> tuple[MambaLM, Path]:
    model = random_model(seed=seed, tokenizer=ByteTokenizer(), vocab_size=260, **kw)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _downloads(hub: StandInHub) -> list[str]:
    """The files the stand-in sent (GET of /{repo}/resolve/{rev}/{file})."""
    return sorted(p.split("/", 5)[-1] for m, p in hub.requests if m == "GET" and "/resolve/" in p)


def test_download_only_what_the_checkpoint_needs_then_offline_from_the_cache(standin, cache, tmp_path, monkeypatch):
    model, d = _saved(tmp_path, "tiny")
    (d / "README.md").write_text("a model card\n")
    torch.save({}, d / "training_args.bin")  # files a checkpoint does not need are never fetched
    standin.publish("org/tiny", d)
    snapshot = resolve("org/tiny", cache_dir=cache, endpoint=standin.url)
    assert snapshot == cache / "models--org--tiny" / "snapshots" / standin.repos["org/tiny"]["branches"]["main"]
    assert _downloads(standin) == ["config.json", "mambakit_tokenizer.json", "model.safetensors"]
    loaded = MambaLM.from_pretrained(snapshot)
    assert _same_weights(model, loaded) and isinstance(loaded.tokenizer, ByteTokenizer)

    # the stand-in stopped: the cached snapshot of main, explicitly offline or because the Hub cannot be reached
    standin.stop()
    assert resolve("org/tiny", cache_dir=cache, endpoint=standin.url, local_files_only=True) == snapshot
    with pytest.warns(UserWarning, match="cannot be reached"):
        assert resolve("org/tiny", cache_dir=cache, endpoint=standin.url) == snapshot
    with pytest.warns(UserWarning), pytest.raises(HubError, match=r"org/gone \(revision main\): config.json is not in "
                                                                   r"the cache .* and the Hub at http.* cannot be reached"):
        resolve("org/gone", cache_dir=cache, endpoint=standin.url)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert _same_weights(model, from_pretrained(MambaLM, "org/tiny", cache_dir=cache))
    assert _same_weights(model, MambaLM.from_pretrained("org/tiny", cache_dir=cache))  # the model's own entry point
    with pytest.raises(HubError, match=r"org/other \(revision main\): config.json is not in the cache .*offline"):
        resolve("org/other", cache_dir=cache)


def test_revisions_give_their_own_models(standin, cache, tmp_path):
    a, da = _saved(tmp_path, "a", seed=1)
    b, db = _saved(tmp_path, "b", seed=2)
    first = standin.publish("org/tiny", da, branch="v1")
    standin.publish("org/tiny", db, branch="main")
    got_main = MambaLM.from_pretrained(resolve("org/tiny", cache_dir=cache, endpoint=standin.url))
    got_v1 = MambaLM.from_pretrained(resolve("org/tiny", revision="v1", cache_dir=cache, endpoint=standin.url))
    assert _same_weights(got_main, b) and _same_weights(got_v1, a) and not _same_weights(a, b)
    by_commit = resolve("org/tiny", revision=first, cache_dir=cache, endpoint=standin.url)
    assert by_commit.name == first and _same_weights(MambaLM.from_pretrained(by_commit), a)
    # main moves on: the next resolve follows it; offline, each branch name still finds its own snapshot
    c, dc = _saved(tmp_path, "c", seed=3)
    newer = standin.publish("org/tiny", dc, branch="main")
    assert resolve("org/tiny", cache_dir=cache, endpoint=standin.url).name == newer
    standin.stop()
    assert resolve("org/tiny", revision="v1", cache_dir=cache, local_files_only=True).name == first
    assert resolve("org/tiny", cache_dir=cache, local_files_only=True).name == newer


def test_sharded_weights_download_the_shards_their_index_lists(standin, cache, tmp_path):
    from safetensors.torch import load_file, save_file

    model, d = _saved(tmp_path, "tiny")
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, d / shard)
        weight_map.update({k: shard for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.save(sd, d / "pytorch_model.bin")  # a second format the repository also has: not fetched
    standin.publish("org/sharded", d)
    snapshot = resolve("org/sharded", cache_dir=cache, endpoint=standin.url)
    assert _downloads(standin) == ["config.json", "mambakit_tokenizer.json", "model-00001-of-00002.safetensors",
                                   "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert _same_weights(model, MambaLM.from_pretrained(snapshot))

    # an index naming a shard the repository lacks: the error names the repository, revision and file
    files = dict(standin.files("org/sharded"))
    files.pop("model-00002-of-00002.safetensors")
    standin.commit("org/broken", files)
    with pytest.raises(HubError, match=r"org/broken \(revision main\) has no file model-00002-of-00002.safetensors"):
        resolve("org/broken", cache_dir=cache, endpoint=standin.url)


def test_missing_things_are_named(standin, cache, tmp_path):
    _, d = _saved(tmp_path, "tiny")
    standin.commit("org/noweights", {"config.json": (d / "config.json").read_bytes()})
    with pytest.raises(HubError, match=r"org/noweights \(revision main\) has no weights on http.*model.safetensors"):
        resolve("org/noweights", cache_dir=cache, endpoint=standin.url)
    standin.commit("org/noconfig", {"model.safetensors": (d / "model.safetensors").read_bytes()})
    with pytest.raises(HubError, match=r"org/noconfig \(revision main\) has no file config.json"):
        resolve("org/noconfig", cache_dir=cache, endpoint=standin.url)
    with pytest.raises(HubError, match="not a local path.*no repository org/nothing on http"):
        resolve("org/nothing", cache_dir=cache, endpoint=standin.url)
    standin.publish("org/tiny", d)
    with pytest.raises(HubError, match="org/tiny on http.* has no revision 'v9'"):
        resolve("org/tiny", revision="v9", cache_dir=cache, endpoint=standin.url)
    # a family mambakit does not read is refused from config.json, before any weight is requested
    config = json.loads((d / "config.json").read_text())
    standin.commit("org/other", {"config.json": json.dumps({**config, "model_type": "not_a_mamba"}).encode(),
                                 "model.safetensors": (d / "model.safetensors").read_bytes()})
    standin.requests.clear()
    with pytest.raises(CheckpointError, match=r"org/other \(revision main\):.*unknown model_type 'not_a_mamba'"):
        resolve("org/other", cache_dir=cache, endpoint=standin.url)
    assert _downloads(standin) == ["config.json"]


def test_local_paths_win_and_other_strings_are_refused(tmp_path, monkeypatch):
    model, _ = _saved(tmp_path, "org/name")  # a local directory that has the form of a Hub id
    monkeypatch.chdir(tmp_path)
    assert resolve("org/name") == Path("org/name")  # no network: huggingface_hub is not even asked
    assert _same_weights(model, from_pretrained(MambaLM, "org/name"))
    with pytest.raises(ValueError, match="revision='v1' applies to Hub ids; 'org/name' is a local path"):
        resolve("org/name", revision="v1")
    for bad in ("a/b/c", "-org/name", "org/na..me", "./missing"):
        with pytest.raises(FileNotFoundError, match=r"does not exist \(nor is it a Hugging Face Hub id, org/name\)"):
            resolve(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(Path("org/missing"))  # a Path is always meant as a path
    assert is_hub_id("state-spaces/mamba-130m") and not is_hub_id("state-spaces") and not is_hub_id("a--b/c")


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'mambakit\[hub\]'"):
        resolve("org/name")


def test_push_to_hub_then_load_it_back(standin, cache, tmp_path):
    model, d = _saved(tmp_path, "run")
    (d / "metrics.jsonl").write_text('{"step": 1}\n')  # a training run's own files stay local
    info = push_to_hub(d, "me/tiny", token="hf_test", endpoint=standin.url)
    assert sorted(standin.files("me/tiny")) == ["config.json", "mambakit_tokenizer.json", "model.safetensors"]
    assert info.oid == standin.repos["me/tiny"]["branches"]["main"]
    assert {a for a in standin.auth if a} == {"Bearer hf_test"}
    assert _same_weights(model, MambaLM.from_pretrained(resolve("me/tiny", cache_dir=cache, endpoint=standin.url)))
    # a model object (saved, then uploaded) to a new branch, which starts as main: the tokenizer it lacks is
    # deleted there, so that the revision loads as exactly this model
    other = random_model(seed=5, vocab_size=260)
    push_to_hub(other, "me/tiny", revision="dev", endpoint=standin.url)
    assert sorted(standin.files("me/tiny", "dev")) == ["config.json", "model.safetensors"]
    got = MambaLM.from_pretrained(resolve("me/tiny", revision="dev", cache_dir=cache, endpoint=standin.url))
    assert _same_weights(other, got) and got.tokenizer is None
    assert len(standin.files("me/tiny", "main")) == 3  # main as it was
    with pytest.raises(ValueError, match="org/name"):
        push_to_hub(d, "not an id", endpoint=standin.url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        push_to_hub(tmp_path / "empty", "me/x", endpoint=standin.url)


def test_cli_takes_hub_ids_and_runs_offline_from_the_cache(standin, tmp_path, monkeypatch, capsys):
    """Online in a process of its own (huggingface_hub reads HF_ENDPOINT at import); offline in this one, with
    huggingface_hub's offline switch and cache as HF_HUB_OFFLINE=1 and HF_HUB_CACHE set them."""
    import huggingface_hub.constants

    from mambakit import cli

    model, d = _saved(tmp_path, "tiny")
    standin.publish("org/tiny", d)
    cache = tmp_path / "hf-cache"
    args = ["generate", "--model", "org/tiny", "--prompt", "ab", "--max-new-tokens", "4", "--temperature", "0",
            "--no-huge-pages"]
    env = {**os.environ, "HF_ENDPOINT": standin.url, "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    online = subprocess.run([sys.executable, "-m", "mambakit", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert online.returncode == 0, online.stderr[-2000:]
    assert online.stdout.startswith("ab") and "%|" not in online.stderr  # download bars: not on a pipe
    standin.stop()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    capsys.readouterr()
    assert cli.main(args) == 0
    assert capsys.readouterr().out == online.stdout
    assert cli.main(["convert", "org/tiny", str(tmp_path / "official"), "--layout", "official"]) == 0
    assert _same_weights(model, MambaLM.from_pretrained(tmp_path / "official"))
    assert cli.main(["convert", "org/absent", str(tmp_path / "x")]) == 1
    assert "org/absent (revision main): config.json is not in the cache" in capsys.readouterr().err
    assert cli.main(["convert", str(d), str(tmp_path / "y"), "--revision", "v1"]) == 1
    assert "revision='v1' applies to Hub ids" in capsys.readouterr().err
    assert cli.main(["generate", "--model", "a/b/c", "--prompt", "x"]) == 1
    assert "does not exist (nor is it a Hugging Face Hub id, org/name)" in capsys.readouterr().err
