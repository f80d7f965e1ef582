"""The trainer: config validation, optimizer groups, schedule, learning, exact resume after SIGKILL, refusal
of damaged checkpoints, non-finite losses, and 2-process DDP = 1 process."""

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mambakit import cli
from mambakit.train import (CheckpointCorruptError, NonFiniteLossError, TrainConfig, build_model, latest_checkpoint,
                            lr_at, param_groups, parse_overrides, train, verify_checkpoint, warmup_cosine)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three small documents of simple, learnable text (one is held out)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while the cat sat on the mat".split()
    for i in range(3):
        lines = (" ".join(rng.choice(words) for _ in range(8)) for _ in range(300))
        (d / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return d


def tiny(corpus, out_dir, **kw) -> TrainConfig:
    values = dict(data=str(corpus), model="tiny", d_model=32, seq_len=32, batch_size=4, max_steps=12,
                  warmup_steps=2, lr=5e-3, eval_every=1000, eval_windows=4, sample_tokens=0, log_every=1,
                  ckpt_every=1000, progress=False, plot=False, out_dir=str(out_dir),
                  cache_dir=str(Path(out_dir).parent / "token-cache"), threads=1)
    values.update(kw)
    return TrainConfig(**values)


def losses(run_dir) -> dict[int, float]:
    """step → training loss; a resumed run's records replace those the killed run wrote after its checkpoint."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


# ---------------------------------------------------------------------------------------------- config
def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'lrr' \(did you mean 'lr'\?\)"):
        TrainConfig.from_dict({"lrr": 1e-3})
    with pytest.raises(TypeError, match="TrainConfig.lr must be a number, got 'fast'"):
        TrainConfig(lr="fast")
    with pytest.raises(TypeError, match="TrainConfig.max_steps must be an int"):
        TrainConfig(max_steps=1.5)
    with pytest.raises(TypeError, match="TrainConfig.resume must be true or false"):
        TrainConfig(resume="maybe")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        TrainConfig(model="huge")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="must be a multiple of micro_batch_size"):
        TrainConfig(batch_size=6, micro_batch_size=4)
    bad = tmp_path / "bad.toml"
    bad.write_text('lr = 1e-3\nbatchsize = 8\n')
    with pytest.raises(ValueError, match=r"bad.toml: unknown key 'batchsize' \(did you mean 'batch_size'\?\)"):
        TrainConfig.from_file(bad)
    bad.write_text('seq_len = "long"\n')
    with pytest.raises(TypeError, match="TrainConfig.seq_len must be an int, got 'long'"):
        TrainConfig.from_file(bad)


def test_config_file_then_command_line(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('model = "tiny"\nlr = 1e-3\nval_docs = ["a", "b"]\nprecision = "bf16"\n')
    base = TrainConfig.from_file(f)
    assert (base.model, base.lr, base.val_docs, base.precision) == ("tiny", 1e-3, ["a", "b"], "bf16")
    over = parse_overrides(["--lr=2e-3", "--resume", "--val_docs=x,y", "--max-steps=7"])
    cfg = TrainConfig.from_dict({**base.to_dict(), **over})
    assert (cfg.lr, cfg.resume, cfg.val_docs, cfg.max_steps, cfg.model) == (2e-3, True, ["x", "y"], 7, "tiny")
    j = tmp_path / "run.json"
    j.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_file(j) == cfg


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--lrr=1"])
    assert "unrecognized arguments: --lrr=1" in capsys.readouterr().err
    assert cli.main(["train", "--lr=fast"]) == 1
    assert "TrainConfig.lr must be a number, got 'fast'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- optimizer
def test_no_weight_decay_set_is_the_official_one():
    model = build_model(TrainConfig(model="tiny"), vocab_size=258)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)].split(".")[-1] if "layers" in names[id(p)] else names[id(p)]
                      for p in no_decay["params"]}
    assert no_decay_names == {"A_log", "D", "bias", "weight", "backbone.norm_f.weight"}  # weight = norm weight
    assert all(p.dim() >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "backbone.layers.0.mixer.in_proj.weight" in decay_names
    assert not any("A_log" in n or n.endswith(".D") or "norm" in n for n in decay_names)


def test_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1) and lr_at(500, cfg, 110) == pytest.approx(0.1)


def test_warmup_cosine_in_steps_and_in_budget_fractions():
    # steps (t = step + 1): warmup over 4 steps, cosine to 0.1 at step 20; min_ratio=None holds the peak
    assert [warmup_cosine(s + 1, warmup=4, total=20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(12, warmup=4, total=20) == pytest.approx(0.55)
    assert warmup_cosine(25, warmup=4, total=20) == pytest.approx(0.1)
    assert warmup_cosine(12, warmup=4, total=20, min_ratio=None) == 1.0
    # a fraction of a time budget (total=1), with a floor under the warmup's first steps
    assert warmup_cosine(0.0, warmup=0.1, total=1.0, peak=2.0, floor=0.02) == pytest.approx(0.04)
    assert warmup_cosine(0.05, warmup=0.1, total=1.0, peak=2.0, floor=0.02) == pytest.approx(1.0)
    assert warmup_cosine(0.55, warmup=0.1, total=1.0, peak=2.0, min_ratio=0.0) == pytest.approx(1.0)
    # hold: at the peak between the warmup and the decay
    assert warmup_cosine(5, warmup=4, total=20, hold=2) == 1.0 and warmup_cosine(0, warmup=0, total=20) == 1.0


# ----------------------------------------------------------------------------------------- training
def test_loss_goes_down_within_seconds(corpus, tmp_path, capsys):
    final = train(tiny(corpus, tmp_path / "run", max_steps=60, eval_every=30, sample_tokens=20,
                       sample_prompt="the "))
    out = capsys.readouterr().out
    assert final["val_loss"] < 2.0, final  # from ln(258) = 5.55 at init
    curve = losses(tmp_path / "run")
    assert sum(list(curve.values())[-5:]) / 5 < curve[1] - 2.5
    assert "bits/char" in out and "--- sample ---\nthe " in out
    # the run directory is a loadable checkpoint, tokenizer included
    from mambakit import MambaLM

    model = MambaLM.from_pretrained(tmp_path / "run")
    assert model.tokenizer is not None and model.config.padded_vocab_size == 264  # 258 padded (hf layout)


def test_bpe_and_bf16(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "bpe", tokenizer="bpe", bpe_vocab_size=320, precision="bf16", max_steps=4)
    final = train(cfg)
    assert final["val_bpc"] < final["val_loss"] / 0.693  # more than one char per token
    from mambakit.tokenizer import load_tokenizer

    assert 258 < load_tokenizer(tmp_path / "bpe").vocab_size <= 320  # small corpus: fewer merges qualify


RUN = textwrap.dedent("""
    import json, os, signal, sys
    from mambakit.train import TrainConfig, train

    def die(step, model):
        if step == 7:  # between checkpoints (every 3 steps): step 7 is lost and redone on resume
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig.from_file(sys.argv[1]).replace(resume=sys.argv[2] == "resume")
    out = train(cfg, on_step=die if sys.argv[2] == "kill" else None)
    print(json.dumps(out))
""")


def test_sigkill_then_resume_gives_the_same_losses(corpus, tmp_path):
    """Every run is its own process, as a real kill and resume are. With a cold kernel cache the reference run
    compiles the kernels and the later processes load them from the cache: the two agree bitwise
    (tests/test_ops_cache.py), so no warm-up run is needed."""
    kw = dict(max_steps=12, ckpt_every=3, keep_checkpoints=2)

    def run(name, mode, **extra):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(tiny(corpus, tmp_path / name, **{**kw, **extra}).to_dict()))
        return subprocess.run([sys.executable, "-c", RUN, str(path), mode], cwd=ROOT, capture_output=True,
                              text=True, timeout=180)

    ref = run("ref", "plain")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run("killed", "kill")
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_0000006"
    resumed = run("killed", "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")  # exactly, step for step
    final = [json.loads(p.stdout.strip().splitlines()[-1]) for p in (ref, resumed)]
    assert final[0]["val_loss"] == final[1]["val_loss"]
    from safetensors.torch import load_file

    got, want = load_file(tmp_path / "killed" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # bit for bit
    kept = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert kept == ["step_0000009", "step_0000012"]  # keep_checkpoints=2


def test_existing_run_is_not_overwritten_without_resume(corpus, tmp_path):
    train(tiny(corpus, tmp_path / "run", max_steps=2))
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        train(tiny(corpus, tmp_path / "run", max_steps=2))


def test_corrupt_or_partial_checkpoints_are_refused(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_steps=4, ckpt_every=2)
    train(cfg)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a torn write
    with pytest.raises(CheckpointCorruptError, match="model.safetensors has .* bytes, the manifest says"):
        train(cfg.replace(resume=True, max_steps=6))
    weights.write_bytes(good[:-4] + b"\0\0\0\0")  # same size, different bytes
    with pytest.raises(CheckpointCorruptError, match="does not match its sha256"):
        train(cfg.replace(resume=True, max_steps=6))
    weights.write_bytes(good)
    (ckpt / "manifest.json").unlink()  # the save never finished
    with pytest.raises(CheckpointCorruptError, match="incomplete .*interrupted"):
        train(cfg.replace(resume=True, max_steps=6))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny(corpus, tmp_path / "empty", resume=True))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", max_steps=10, ckpt_every=2)

    def poison(step, model):
        if step == 3:  # after step 3 (checkpoint at 2): step 4 computes a NaN loss
            with torch.no_grad():
                model.backbone.layers[0].mixer.in_proj.weight[0, 0] = float("nan")

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 4.*last good checkpoint is \S*step_0000002"):
        train(cfg, on_step=poison)
    good = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert good.name == "step_0000002"
    verify_checkpoint(good)
    resumed = train(cfg.replace(resume=True))  # and the run continues from it
    assert resumed["step"] == 10


# --------------------------------------------------------------------------------------- parallelism
def _weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "model.safetensors")


def _assert_close_weights(a, b, atol=2e-5):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
    kw = dict(batch_size=8, max_steps=6, eval_windows=2)
    train(tiny(corpus, tmp_path / "big", **kw))
    train(tiny(corpus, tmp_path / "accum", micro_batch_size=2, **kw))  # 4 micro-batches per step
    _assert_close_weights(tmp_path / "big", tmp_path / "accum")


def test_two_ddp_processes_match_one(corpus, tmp_path):
    kw = dict(batch_size=8, max_steps=6, eval_windows=2)
    single = train(tiny(corpus, tmp_path / "one", **kw))
    cfg = tiny(corpus, tmp_path / "two", **kw)
    (tmp_path / "two.json").write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "mambakit", "train", f"--config={tmp_path / 'two.json'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    _assert_close_weights(tmp_path / "one", tmp_path / "two")
    ddp_losses, single_losses = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert ddp_losses.keys() == single_losses.keys()
    for step in ddp_losses:
        assert ddp_losses[step] == pytest.approx(single_losses[step], abs=1e-5)
    final = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)  # ranks split the eval windows


@pytest.mark.parametrize("precision, tol", [("bf16", 2e-2), ("fp32", 1e-4)])
def test_fsdp_two_processes_train_and_resume(corpus, tmp_path, precision, tol):
    kw = dict(batch_size=8, max_steps=4, ckpt_every=2, eval_windows=2, precision=precision)
    train(tiny(corpus, tmp_path / "one", **kw))
    train(tiny(corpus, tmp_path / "one", **kw).replace(resume=True, max_steps=6))  # the same two-part schedule
    cfg = tiny(corpus, tmp_path / "fsdp", distributed="fsdp", **kw)
    (tmp_path / "fsdp.json").write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mambakit",
           "train", f"--config={tmp_path / 'fsdp.json'}"]
    for extra in ([], ["--resume", "--max_steps=6"]):  # 4 steps, then resume (gathered checkpoint) to 6
        proc = subprocess.run(cmd + extra, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    fsdp_losses, single_losses = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    assert fsdp_losses.keys() == single_losses.keys()
    for step in fsdp_losses:  # bf16: bf16 parameters (FSDP) vs bf16 autocast (one process), close, not equal
        assert fsdp_losses[step] == pytest.approx(single_losses[step], abs=tol)
    from mambakit import MambaLM

    MambaLM.from_pretrained(tmp_path / "fsdp")  # the gathered checkpoint is a whole model


def test_shipped_configs_parse():
    for f in sorted((ROOT / "configs").glob("*.toml")):
        cfg = TrainConfig.from_file(f)
        assert cfg.model in ("tiny", "mini", "small") and cfg.time_budget_min > 0


# ------------------------------------------------------------------------- resume: what a checkpoint fixes
@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4; tests resume (or damage) copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny(corpus, run, max_steps=4, ckpt_every=2))
    return run


def _copy(run: Path, dst: Path, drop_newest: bool = False) -> Path:
    """A copy of the run directory (without its newest checkpoint: the run then resumes from step 2)."""
    shutil.copytree(run, dst)
    if drop_newest:
        shutil.rmtree(latest_checkpoint(dst / "checkpoints"))
    return dst


def _resume(corpus, run: Path, **kw):
    return train(tiny(corpus, run, **{"max_steps": 4, "ckpt_every": 2, "resume": True, **kw}))


def test_resume_refuses_another_model_size_before_loading(corpus, finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    with pytest.raises(ValueError, match=r"another size .*d_model: 32 → 64.*d_inner: 64 → 128"):
        _resume(corpus, run, d_model=64)
    with pytest.raises(ValueError, match=r"another size .*n_layer: 2 → 3"):
        _resume(corpus, run, n_layer=3)
    with pytest.raises(ValueError, match=r"another size .*d_state: 16 → 8"):
        _resume(corpus, run, d_state=8)


def test_resume_refuses_other_data_and_names_every_difference(corpus, finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    with pytest.raises(ValueError, match=r"cannot change .*seq_len: 32 → 16; seed: 0 → 3\. Pass the checkpoint's"):
        _resume(corpus, run, seq_len=16, seed=3)
    with pytest.raises(ValueError, match=r"cannot change .*val_docs: \[\] → \['doc0.txt'\]"):
        _resume(corpus, run, val_docs=["doc0.txt"])


def test_resume_with_changed_optimizer_settings_acts(corpus, finished, tmp_path, capsys):
    """beta1 / weight_decay changed on resume take effect (the restored optimizer state would keep the old
    ones), and the change is printed."""
    same = _copy(finished, tmp_path / "same", drop_newest=True)
    changed = _copy(finished, tmp_path / "changed", drop_newest=True)
    _resume(corpus, same)
    out = capsys.readouterr().out  # a copy: only where it lies changed
    assert "resuming with changed settings (checkpoint → requested): " in out and "out_dir: " in out
    assert "beta1" not in out
    _resume(corpus, changed, beta1=0.5, weight_decay=0.0)
    out = capsys.readouterr().out
    assert "resuming with changed settings (checkpoint → requested): " in out
    assert "beta1: 0.9 → 0.5" in out and "weight_decay: 0.1 → 0.0" in out
    a, b = _weights(same), _weights(changed)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the new settings acted on steps 3 and 4
    assert _weights(finished).keys() == a.keys() and all(torch.equal(a[k], _weights(finished)[k]) for k in a)


def test_resume_past_max_steps_or_a_spent_budget_is_refused(corpus, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    with pytest.raises(ValueError, match="is at step 4, past max_steps=3: pass --max_steps of at least 4"):
        _resume(corpus, run, max_steps=3)
    final = _resume(corpus, run)  # at max_steps already: says so, and only evaluates
    assert final["step"] == 4 and "nothing left to train" in capsys.readouterr().out
    budget = tmp_path / "budget"
    first = train(tiny(corpus, budget, max_steps=50, time_budget_min=1e-4))  # spent after the first step
    assert first["step"] < 50
    with pytest.raises(ValueError, match=r"time budget of 0\.0001 min is spent .*--time_budget_min"):
        train(tiny(corpus, budget, max_steps=50, time_budget_min=1e-4, resume=True))
    more = train(tiny(corpus, budget, max_steps=first["step"] + 2, resume=True))  # no budget: to max_steps
    assert more["step"] == first["step"] + 2


def _rewrite_state(ckpt: Path, change) -> None:
    """Changes trainer_state.pt (change(state) edits it, or returns bytes to write instead) and updates the
    manifest to match: a malformed state as if the trainer had written it, not a torn or altered file."""
    import hashlib

    path = ckpt / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    new = change(state)
    if isinstance(new, bytes):
        path.write_bytes(new)
    else:
        torch.save(state, path)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = path.read_bytes()
    manifest["files"]["trainer_state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _drop(key):
    return lambda s: s.pop(key)


def _exp_avg_wrong_shape(s):
    first = s["optimizer"]["param_groups"][0]["params"][0]
    s["optimizer"]["state"][first]["exp_avg"] = torch.zeros(3)


@pytest.mark.parametrize("change, message", [
    (_drop("rng"), r"trainer_state.pt has no 'rng'"),
    (_drop("optimizer"), r"trainer_state.pt has no 'optimizer'"),
    (lambda s: s.update(step=10**9), r"trainer_state.pt says step 1000000000, but its manifest says 4"),
    (lambda s: s.update(step="4"), r"trainer_state.pt has 'step' of type str"),
    (lambda s: s.update(elapsed_s=float("nan")), r"trainer_state.pt has elapsed_s nan"),
    (lambda s: s["schedule"].pop("total_steps"), r"trainer_state.pt has no schedule 'total_steps'"),
    (lambda s: s["rng"].update(torch=torch.zeros(5)), r"trainer_state.pt has an rng 'torch' state of dtype"),
    (lambda s: s["optimizer"]["param_groups"].pop(), r"trainer_state.pt: the optimizer state has parameter groups"),
    (lambda s: s["optimizer"].update(param_groups=[{}]), r"trainer_state.pt has optimizer param_groups without"),
    (_exp_avg_wrong_shape, r"trainer_state.pt: optimizer exp_avg of parameter 0 is \(3,\)"),
    (lambda s: b"not a pickle", r"trainer_state.pt does not load"),
])
def test_malformed_trainer_state_is_refused_naming_the_file(corpus, finished, tmp_path, change, message):
    run = _copy(finished, tmp_path / "run")
    _rewrite_state(latest_checkpoint(run / "checkpoints"), change)
    with pytest.raises(CheckpointCorruptError, match=message):
        _resume(corpus, run, max_steps=6)


def test_resume_cuts_a_half_written_metrics_record(corpus, finished, tmp_path):
    run = _copy(finished, tmp_path / "run", drop_newest=True)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a kill in the middle of an append
    _resume(corpus, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["final"] and losses(run).keys() == {1, 2, 3, 4}


def test_config_refuses_what_would_be_ignored_or_crash_in_torch():
    for kw, message in [
        (dict(bpe_vocab_size=999), "bpe_vocab_size only applies to tokenizer='bpe'"),
        (dict(val_fraction=0.3), "val_fraction only applies when no val_docs"),  # data="shakespeare"
        (dict(data="x", val_docs=["a"], val_fraction=0.3), "val_fraction only applies when no val_docs"),
        (dict(sample_tokens=0, sample_prompt="x"), "sample_prompt only applies with sample_tokens > 0"),
        (dict(data="x", val_fraction=0.0), r"val_fraction must be in \(0, 0.5\]"),
        (dict(seed=2**64), "seed must be <= 9223372036854775807"),
        (dict(threads=10**6), "threads must be <= 4096"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kw)
    TrainConfig(tokenizer="bpe", bpe_vocab_size=999)  # where they apply, they are taken
    TrainConfig(data="x", val_fraction=0.3, sample_tokens=5, sample_prompt="x", seed=2**63 - 1)


# ------------------------------------------------------------------------------------------ Python 3.10
NEW_MODULES = {"tomllib", "wsgiref.types"}  # importable from 3.11 on (an import of them must be guarded)
NEW_NAMES = {"ExceptionGroup", "BaseExceptionGroup", "StrEnum", "ReprEnum", "Self", "LiteralString", "Never",
             "assert_never", "reveal_type", "TypeVarTuple", "Unpack", "NotRequired", "Required", "dataclass_transform",
             "TaskGroup", "add_note", "file_digest", "getLevelNamesMapping", "UTC",
             "batched", "override"}  # 3.11's, and 3.12's batched and override


def test_the_package_is_python_310():
    """requires-python >= 3.10: no syntax (except*, ...), module or name that 3.10 lacks, except imports guarded
    by an ImportError handler (tomllib, with tomli behind it)."""
    import ast

    found = []
    for path in sorted((ROOT / "mambakit").rglob("*.py")):
        where = path.relative_to(ROOT)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 10))
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)
                   if any(isinstance(h.type, ast.Name) and h.type.id in ("ModuleNotFoundError", "ImportError")
                          for h in t.handlers)}
        for node in ast.walk(tree):
            if isinstance(node, getattr(ast, "TryStar", ())):  # 3.11+ builds only; 3.10 cannot parse it
                found.append(f"{where}:{node.lineno} except*")
            modules, names = [], []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules, names = [node.module or ""], [a.name for a in node.names]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.Name):
                names = [node.id]
            bad = [m for m in modules if m in NEW_MODULES and id(node) not in guarded]
            found += [f"{where}:{node.lineno} {n}" for n in bad + [n for n in names if n in NEW_NAMES]]
    assert not found, found
    # the check itself sees what it looks for
    probe = ast.parse("import tomllib\nfrom typing import Self\n", feature_version=(3, 10))
    assert [a.name for a in probe.body[0].names] == ["tomllib"] and probe.body[1].names[0].name in NEW_NAMES
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))


def test_toml_configs_read_with_tomli_where_tomllib_is_missing(tmp_path):
    """As on Python 3.10: `import tomllib` fails, and tomli (the package tomllib was copied from; the real
    tomllib stands in for it here) reads the file. A process of its own: the config module is imported fresh."""
    f = tmp_path / "run.toml"
    f.write_text('lr = 1e-3\nval_docs = ["a"]\n')
    script = textwrap.dedent("""
        import sys, tomllib
        sys.modules["tomli"], sys.modules["tomllib"] = tomllib, None
        import mambakit.train.config as config
        assert config.tomllib is sys.modules["tomli"]
        print(config.read_config_file(sys.argv[1]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(f)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "{'lr': 0.001, 'val_docs': ['a']}"
