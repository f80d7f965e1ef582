"""Tiny versions of the synthetic-task experiments (experiments/selective_copying, experiments/induction_heads):
the whole pipeline (train → test → JSON, PNG, README) in seconds, plus the chunked long-sequence evaluation."""

import json
import math

import pytest
import torch

pytest.importorskip("matplotlib")

from experiments.induction_heads import run as ih  # noqa: E402
from experiments.selective_copying import run as sc  # noqa: E402
from experiments._common import evaluate, scored_loss, split_models, train  # noqa: E402
from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.data.synthetic import induction_heads  # noqa: E402


def test_selective_copying_tiny(tmp_path):
    args = sc.parse_args(["--seq-len", "48", "--steps", "3", "--batch-size", "4", "--eval-every", "2",
                          "--val-size", "8", "--test-size", "8", "--d-model", "16", "--out", str(tmp_path),
                          "--checkpoint-min", "60"])
    results = sc.run(args, log=lambda *a: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["models"]) == {"mamba", "mamba_s4d", "s4d"}
    test_set = sc._batches(8, 48, seed=20_000)  # the run's fixed test set (seed 0)
    for name, r in saved["models"].items():
        assert r["steps"] == 3 and [c["step"] for c in r["curve"]] == [2, 3]
        # the reported accuracy is the saved model's, on the test set, recomputed here
        model = sc.build_model(name, 16, 2, 16)
        model.load_state_dict(torch.load(tmp_path / "checkpoints" / f"{name}.pt", weights_only=False)["model"])
        assert r["test_accuracy"] == round(evaluate(model, test_set, 16), 4)
    assert results["models"]["mamba"]["params"] != results["models"]["s4d"]["params"]
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    readme = (tmp_path / "README.md").read_text()
    assert "99.8" in readme and "| Mamba (S6) |" in readme
    # --report-only rebuilds the README and plot from results.json, without training
    (tmp_path / "README.md").unlink()
    sc.main(["--report-only", "--out", str(tmp_path)])
    assert (tmp_path / "README.md").read_text() == readme


def test_jobs_train_the_models_in_processes_and_merge(tmp_path, monkeypatch):
    """--jobs 2 (the default): the models train in two child processes; one results.json, table and README,
    under the user's command; the same accuracies as the same models trained in one process."""
    import os
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the children run `python -m experiments...`
    monkeypatch.setenv("PYTHONPATH", os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["--seq-len", "40", "--steps", "3", "--batch-size", "4", "--eval-every", "3", "--val-size", "8",
              "--test-size", "8", "--d-model", "16"]
    assert split_models(["mamba", "mamba_s4d", "s4d"], 2, sc.COST) == [["mamba_s4d"], ["mamba", "s4d"]]
    assert sc.main([*common, "--out", str(tmp_path / "two")]) == 0
    assert sc.main([*common, "--jobs", "1", "--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert list(two["models"]) == ["mamba", "mamba_s4d", "s4d"]
    assert {k: m["test_accuracy"] for k, m in two["models"].items()} == \
        {k: m["test_accuracy"] for k, m in one["models"].items()}
    assert two["command"] == "python -m experiments.selective_copying " + " ".join(common + ["--out", str(tmp_path / "two")])
    readme = (tmp_path / "two" / "README.md").read_text()
    assert "--jobs 1" not in readme and all(m in readme for m in ("Mamba (S6)", "S4D alone"))


def test_separate_runs_merge_into_one_results_file(tmp_path):
    common = ["--seq-len", "40", "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--val-size", "4",
              "--test-size", "4", "--d-model", "8", "--out", str(tmp_path), "--no-readme"]
    sc.main(common + ["--models", "s4d"])
    sc.main(common + ["--models", "mamba"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["models"]) == ["mamba", "s4d"]  # merged, in the table's order
    assert saved["models"]["s4d"]["command"].endswith("--models s4d")
    sc.main(common[:-1] + ["--models", "mamba", "--steps", "3"])  # other settings: replaced, not merged
    assert list(json.loads((tmp_path / "results.json").read_text())["models"]) == ["mamba"]


def test_selective_copying_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        sc.parse_args(["--seq-len", "20"])
    with pytest.raises(SystemExit):
        sc.parse_args(["--models", "mamba,lstm"])


def test_induction_heads_tiny(tmp_path):
    args = ih.parse_args(["--train-len", "64", "--curriculum", "16,32", "--stage-steps", "2", "--batch-size", "4",
                          "--mamba-steps", "2", "--attn-steps", "2",
                          "--eval-every", "2", "--val-size", "64", "--min-log-len", "5", "--max-log-len", "8",
                          "--attn-max-log-len", "7", "--eval-tokens", "512", "--attn-eval-tokens", "256",
                          "--min-samples", "2", "--chunk", "64", "--mamba-d-model", "16", "--attn-d-model", "32",
                          "--out", str(tmp_path)])
    ih.run(args, log=lambda *a: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    readme = (tmp_path / "README.md").read_text()
    acc = {name: r["accuracy"] for name, r in saved["models"].items()}
    assert all(acc["mamba"][str(L)] is not None for L in (32, 64, 128, 256))  # 128, 256: chunked with state
    assert acc["mha_abs"]["128"] is None and acc["mha_abs"]["64"] is not None  # no positions past 64
    assert acc["mha_rope"]["128"] is not None and acc["mha_rope"]["256"] is None  # --attn-max-log-len 7
    assert saved["models"]["mamba"]["samples"]["256"] == 2
    curve = saved["models"]["mamba"]["curve"]  # 2 steps at each curriculum length, then 2 at the training length
    assert [(pt["length"], pt["step"]) for pt in curve] == [(16, 2), (32, 4), (64, 6)]
    assert saved["models"]["mamba"]["steps"] == 6 and "(by length 16: 2, 32: 2, 64: 2)" in readme
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert "Induction Heads" in readme and "length curriculum, 16 → 32 → 64" in readme


def test_induction_heads_jobs_merge_into_one_results_file(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the children run `python -m experiments...`
    monkeypatch.setenv("PYTHONPATH", os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["--train-len", "32", "--curriculum", "", "--batch-size", "4", "--mamba-steps", "2", "--attn-steps", "2",
            "--eval-every", "2", "--val-size", "64", "--min-log-len", "5", "--max-log-len", "6",
            "--attn-max-log-len", "6", "--eval-tokens", "256", "--attn-eval-tokens", "256", "--min-samples", "2",
            "--chunk", "64", "--mamba-d-model", "16", "--attn-d-model", "32", "--out", str(tmp_path)]
    assert split_models(list(ih.MODELS), 2, ih.COST) == [["mamba"], ["mha_abs", "mha_rope"]]
    assert ih.main(argv) == 0  # --jobs 2 by default
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["models"]) == ["mamba", "mha_abs", "mha_rope"]
    assert {r["command"] for r in saved["models"].values()} == {"python -m experiments.induction_heads " + " ".join(argv)}
    assert "Induction Heads" in (tmp_path / "README.md").read_text()


def test_chunked_evaluation_equals_one_call():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=16)).eval()
    inputs, _ = induction_heads(3, 200, generator=torch.Generator().manual_seed(1))
    whole = ih.final_logits(model, inputs, chunk=1000)
    chunked = ih.final_logits(model, inputs, chunk=64)  # 64 + 64 + 64 + 8 tokens
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)


def test_training_lowers_the_scored_loss():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=16))
    data = induction_heads(16, 32, generator=torch.Generator().manual_seed(0))
    before = scored_loss(model(data[0]).logits, data[1], 16).item()
    res = train(model, lambda step: data, [data], 16, steps=30, lr=1e-2, warmup=1, eval_every=30,
                log=lambda *a: None)
    after = scored_loss(model(data[0]).logits, data[1], 16).item()
    assert after < before - 0.5 and res.steps == 30 and res.curve[-1]["step"] == 30


def test_lr_schedule_warms_up_then_stays_or_decays():
    from experiments._common import lr_factor

    const = [lr_factor(s, warmup=4, steps=20) for s in range(20)]
    assert const[:4] == [0.25, 0.5, 0.75, 1.0] and all(f == 1.0 for f in const[4:])
    cos = [lr_factor(s, warmup=4, steps=20, min_frac=0.1) for s in range(20)]
    assert cos[:4] == const[:4]
    assert all(a > b for a, b in zip(cos[3:], cos[4:]))  # strictly decreasing after the warm-up
    assert cos[-1] == pytest.approx(0.1) and cos[11] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(0, warmup=0, steps=10) == 1.0  # no warm-up: full lr from the first step


def test_regenerated_readme_keeps_the_hand_written_notes(tmp_path):
    from experiments._common import NOTES_MARKER, write_readme_keeping_notes

    path = tmp_path / "README.md"
    write_readme_keeping_notes(path, "# generated 1\n")
    assert path.read_text() == "# generated 1\n"
    path.write_text(path.read_text() + "\n" + NOTES_MARKER + "\n\nAn observation.\n")
    write_readme_keeping_notes(path, "# generated 2\n")
    assert path.read_text() == "# generated 2\n\n" + NOTES_MARKER + "\n\nAn observation.\n"


# ------------------------------------------------------------------------ --budget paper: settings, resume, report
def test_paper_budget_follows_the_paper_and_explicit_options_win():
    a = ih.parse_args(["--budget", "paper"])
    assert (a.batch_size, a.mamba_steps, a.attn_steps, a.rope_steps) == (8, 204_800, 204_800, 409_600)
    assert (a.mamba_lr, a.attn_lr, a.warmup, a.stop_at, a.attn_stop_at) == (1e-3, 2e-4, 0, None, None)
    assert a.count_curriculum and a.checkpoint_min == 5.0 and a.out.name == "paper" and a.jobs == 1
    n = {L: ih.n_samples(L, a.eval_tokens, a.min_samples, a.max_samples) for L in (2**k for k in range(6, 21))}
    assert all(n[L] >= 64 for L in n if L <= 2**16) and all(n[L] >= 16 for L in n)
    assert ih.n_samples(2**14, a.attn_eval_tokens, a.min_samples, a.max_samples) >= 64
    assert ih.parse_args(["--budget", "paper", "--batch-size", "16"]).batch_size == 16
    assert ih.parse_args([]).batch_size == 32 and ih.parse_args([]).checkpoint_min is None  # the default is kept
    s = sc.parse_args(["--budget", "paper"])
    assert (s.seq_len, s.batch_size, s.d_model, s.n_layer, s.follow) == (4096, 64, 64, 2, "mamba")
    assert s.curriculum == [128, 256, 512, 1024, 2048]
    assert [st.steps for st in sc.stages_of("mamba", s)] == [16384, 8192, 4096, 2048, 1024, 2000]
    with pytest.raises(SystemExit):
        ih.parse_args(["--resume"])  # no checkpoints to resume without --checkpoint-min


IH_TINY = ["--budget", "paper", "--models", "mamba", "--train-len", "32", "--curriculum", "16", "--stage-steps", "3",
           "--stage-acc", "0.99", "--batch-size", "3", "--mamba-steps", "8", "--eval-every", "2", "--val-size", "64",
           "--min-log-len", "4", "--max-log-len", "6", "--eval-tokens", "128", "--min-samples", "2",
           "--max-samples", "4", "--chunk", "32", "--mamba-d-model", "16", "--checkpoint-min", "0"]


class Killed(Exception):
    pass


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _without_seconds(curve):
    return [{k: v for k, v in pt.items() if k != "seconds"} for pt in curve]


def test_paper_budget_resumes_bitwise_and_regenerates_its_report(tmp_path, monkeypatch):
    """8 steps straight vs killed after step 5 + --resume: the same weights, bit for bit, the same curve and
    accuracies; the README rebuilt by --report is the one the run wrote."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ih.main(IH_TINY + ["--out", str(straight)])
    done = _state(straight / "checkpoints" / "mamba.pt")
    assert done["phase"] == "done" and "optimizer" not in str(done.keys())

    real, calls = ih.induction_heads, []

    def dies_at_step_6(batch_size, *a, **k):  # the 6th training batch: killed after step 5's checkpoint
        calls.append(batch_size)
        if batch_size == 3 and calls.count(3) == 6:
            raise Killed
        return real(batch_size, *a, **k)

    monkeypatch.setattr(ih, "induction_heads", dies_at_step_6)
    with pytest.raises(Killed):
        ih.main(IH_TINY + ["--out", str(resumed)])
    monkeypatch.setattr(ih, "induction_heads", real)
    mid = _state(resumed / "checkpoints" / "mamba.pt")
    assert mid["phase"] == "train" and mid["total"]["steps"] + mid["loop"]["step"] == 5
    ih.main(["--budget", "paper", "--report", "--out", str(resumed)])  # before any model is done: the progress
    assert f"| mamba | train (stage {mid['stage'] + 1}) | 5 | 8 | 1 |" in (resumed / "README.md").read_text()
    with pytest.raises(SystemExit, match="--resume"):  # never overwritten silently
        ih.main(IH_TINY + ["--out", str(resumed)])
    with pytest.raises(SystemExit, match="mamba_lr"):  # nor continued under other settings
        ih.main(IH_TINY + ["--out", str(resumed), "--resume", "--mamba-lr", "0.01"])
    ih.main(IH_TINY + ["--out", str(resumed), "--resume"])

    after = _state(resumed / "checkpoints" / "mamba.pt")
    assert after["phase"] == "done" and len(after["segments"]) == 2 and len(done["segments"]) == 1
    assert done["model"].keys() == after["model"].keys()
    assert all(torch.equal(done["model"][k], after["model"][k]) for k in done["model"])
    a, b = (json.loads((d / "results.json").read_text())["models"]["mamba"] for d in (straight, resumed))
    assert a["steps"] == b["steps"] == 8 and a["accuracy"] == b["accuracy"] and a["samples"] == b["samples"]
    assert _without_seconds(a["curve"]) == _without_seconds(b["curve"]) and a["horizons"] == b["horizons"]

    readme = (resumed / "README.md").read_text()
    assert "| ↳ test sequences |" in readme and "departure: why" in readme and "2 process(es)" in readme
    (resumed / "README.md").unlink()
    (resumed / "accuracy.png").unlink()
    ih.main(["--budget", "paper", "--report", "--out", str(resumed)])
    assert (resumed / "README.md").read_text() == readme and (resumed / "accuracy.png").stat().st_size > 1000
    ih.main(IH_TINY + ["--out", str(resumed), "--resume"])  # done: kept, not retrained
    kept = _state(resumed / "checkpoints" / "mamba.pt")["model"]
    assert all(torch.equal(after["model"][k], v) for k, v in kept.items())


def test_selective_copying_followers_replay_the_leaders_steps(tmp_path):
    argv = ["--budget", "paper", "--seq-len", "48", "--curriculum", "32", "--stage-tokens", "256", "--steps", "3",
            "--batch-size", "4", "--eval-every", "2", "--val-size", "8", "--test-size", "8", "--d-model", "16",
            "--checkpoint-min", "0", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="train mamba first"):
        sc.main(argv + ["--models", "s4d"])
    sc.main(argv + ["--models", "s4d,mamba"])  # the leader trains first whatever the order
    m = json.loads((tmp_path / "results.json").read_text())["models"]
    assert sc.stage_steps_of(m["s4d"]["curve"]) == sc.stage_steps_of(m["mamba"]["curve"])
    assert m["s4d"]["stopped"] == "steps" and sc.stage_steps_of(m["mamba"]["curve"])[0] == (32, 2)


def test_time_steps_reports_throughput_and_hours(tmp_path, capsys):
    assert ih.main(["--time-steps", "1", "--models", "mamba", "--mamba-d-model", "8", "--batch-size", "2",
                    "--train-len", "16", "--curriculum", "", "--mamba-steps", "7200", "--out", str(tmp_path)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("mamba:")][0]
    rate = float(line.split()[1])
    assert rate > 0 and f"= {7200 / rate / 3600:.1f} h" in line
    assert not (tmp_path / "results.json").exists()  # nothing trained, nothing written
