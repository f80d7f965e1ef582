"""mambakit.forecast: network shapes, quantiles and pinball loss, base forecasts and channel independence,
learning a synthetic series, the validation-chosen seed ensemble, leak-free rolling-origin backtests, baselines,
metrics, save/load, the CLI, and a tiny run of the experiment."""

import argparse
import csv
import json

import numpy as np
import pytest
import torch

from mambakit.data.timeseries import TimeSeries, regularize
from mambakit.cli.forecast import add_parser as add_cli
from mambakit.forecast import ForecastConfig, Forecaster, MambaForecastNet
from mambakit.forecast.backtest import MambaMethod, backtest, rolling_origins
from mambakit.forecast.ensemble import MULTI_VARIANTS, STANDARD_VARIANTS, EnsembleForecaster
from mambakit.forecast.baselines import Naive, SeasonalNaive
from mambakit.forecast.metrics import mae, mase, mase_scale, pinball_loss, rmse, smape

# small and quick: every training here takes seconds on one core
TINY = dict(d_model=16, n_layer=2, d_state=8, batch_size=32, eval_every=20, patience=4, threads=1)


def _monthly(y):
    stamps = np.arange(np.datetime64("2000-01"), np.datetime64("2000-01") + len(y)).astype("datetime64[s]")
    return regularize(stamps, y, ["y"])


def sine_trend(n=300, period=12, noise=0.0, seed=0):
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    return 10 + 0.05 * t + 2 * np.sin(2 * np.pi * t / period) + noise * rng.standard_normal(n)


# ------------------------------------------------------------------------------------------------ config
def test_config_validation():
    with pytest.raises(ValueError, match="must contain 0.5"):
        ForecastConfig(horizon=4, context=8, quantiles=(0.1, 0.9))
    with pytest.raises(ValueError, match="increasing"):
        ForecastConfig(horizon=4, context=8, quantiles=(0.9, 0.5))
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        ForecastConfig(horizon=0, context=8)
    with pytest.raises(TypeError, match="context must be an int"):
        ForecastConfig(horizon=4, context=8.5)
    with pytest.raises(ValueError, match="unknown ForecastConfig field"):
        ForecastConfig.from_dict({"horizon": 4, "context": 8, "hidden": 3})
    c = ForecastConfig(horizon=4, context=8, quantiles=[0.1, 0.5, 0.9])
    assert ForecastConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


# ------------------------------------------------------------------------------------------------ network
@pytest.mark.parametrize("quantiles", [(), (0.05, 0.25, 0.5, 0.75, 0.95)])
def test_net_shapes_and_quantile_order(quantiles):
    torch.manual_seed(0)
    c = ForecastConfig(horizon=5, context=16, quantiles=quantiles, **TINY)
    net = MambaForecastNet(c, n_channels=3, n_covariates=2)
    torch.nn.init.normal_(net.head.weight, std=1.0)  # large random outputs, so crossing would show
    x = torch.randn(4, 16, 3) * 100 + 50
    out, loc, scale = net(x, torch.randn(4, 16, 2))
    Q = max(1, len(quantiles))
    assert out.shape == (4, 5, 3, Q) and loc.shape == scale.shape == (4, 1, 3)
    y = MambaForecastNet.denormalise(out, loc, scale)
    assert y.shape == (4, 5, 3, Q)
    assert (y.diff(dim=-1) >= 0).all()  # non-crossing by construction
    with pytest.raises(ValueError, match="covariates of shape"):
        net(x)
    with pytest.raises(ValueError, match="expected 3 series"):
        net(torch.randn(4, 16, 2), torch.randn(4, 16, 2))


def test_normalisation_makes_the_net_scale_equivariant():
    torch.manual_seed(0)
    net = MambaForecastNet(ForecastConfig(horizon=3, context=12, **TINY), 1, 0)
    x = torch.randn(2, 12, 1)
    y1 = MambaForecastNet.denormalise(*net(x))
    y2 = MambaForecastNet.denormalise(*net(1000 * x + 7))
    torch.testing.assert_close(y2, 1000 * y1 + 7, rtol=1e-4, atol=1e-2)


def test_pinball_loss():
    y = torch.tensor([1.0, 2.0, 3.0, 10.0])
    pred = torch.tensor([[2.0], [2.0], [2.0], [2.0]])
    # at q = 0.5 the pinball loss is half the absolute error
    assert pinball_loss(pred, y, torch.tensor([0.5])).item() == pytest.approx(0.5 * (1 + 0 + 1 + 8) / 4)
    # under-prediction costs q per unit, over-prediction 1 − q
    assert pinball_loss(torch.tensor([[0.0]]), torch.tensor([1.0]), torch.tensor([0.9])).item() == pytest.approx(0.9)
    assert pinball_loss(torch.tensor([[2.0]]), torch.tensor([1.0]), torch.tensor([0.9])).item() == pytest.approx(0.1)
    # the constant minimising the mean pinball loss is the q-quantile of the sample
    sample = torch.tensor(np.random.default_rng(0).exponential(size=2001), dtype=torch.float32)
    grid = torch.linspace(0, 5, 2001)
    for q in (0.1, 0.5, 0.9):
        losses = torch.stack([pinball_loss(g.expand(len(sample), 1), sample, torch.tensor([q])) for g in grid])
        best = grid[losses.argmin()].item()
        assert best == pytest.approx(torch.quantile(sample, q).item(), abs=0.01)


def _silence_head(net):
    """Zero the head: the network then outputs exactly its base forecast (the skip starts at zero too)."""
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    return net


def test_untrained_net_forecasts_its_base():
    torch.manual_seed(0)
    x = torch.randn(3, 12, 2) * 5 + 20  # (b, L, C)
    for base, want in (("seasonal", torch.cat([x[:, 8:], x[:, 8:9]], 1)),  # season 4, H 5: last season + 1 step
                       ("last", x[:, -1:].expand(3, 5, 2)),
                       ("none", x.mean(1, keepdim=True).expand(3, 5, 2))):
        c = ForecastConfig(horizon=5, context=12, season=4, base=base, **TINY)
        y = MambaForecastNet.denormalise(*_silence_head(MambaForecastNet(c, 2, 0))(x))[..., 0]  # (b, H, C)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4, msg=base)
    # "auto": seasonal when the season fits the context, else the last value
    assert ForecastConfig(horizon=5, context=12, season=4).resolved_base(0) == "seasonal"
    assert ForecastConfig(horizon=5, context=12).resolved_base(12) == "seasonal"
    assert ForecastConfig(horizon=5, context=12).resolved_base(13) == "last"
    assert ForecastConfig(horizon=5, context=12).resolved_base(1) == "last"
    with pytest.raises(ValueError, match="base must be one of"):
        ForecastConfig(horizon=5, context=12, base="mean")
    with pytest.raises(ValueError, match="seasonal period between 2 and the context"):
        ForecastConfig(horizon=5, context=12, season=13, base="seasonal")
    with pytest.raises(ValueError, match="seasonal period between 2 and the context"):
        ForecastConfig(horizon=5, context=12, base="seasonal").resolved_base(1)


def test_forecaster_resolves_season_and_base_from_the_series():
    y = sine_trend(120)
    months = _monthly(y)
    cfg = ForecastConfig(horizon=6, context=24, max_steps=2, **{**TINY, "eval_every": 1})
    f = Forecaster(cfg).fit(months)
    assert (f.config.season, f.config.base) == (12, "seasonal")  # monthly → season 12, fits the context of 24
    f = Forecaster(cfg).fit(y)  # a plain array has no season
    assert (f.config.season, f.config.base) == (1, "last")


def test_channel_independent_reads_each_series_alone():
    torch.manual_seed(0)
    c = ForecastConfig(horizon=4, context=10, channel_independent=True, quantiles=(0.1, 0.5, 0.9), **TINY)
    net = MambaForecastNet(c, n_channels=3, n_covariates=2)
    x, cov = torch.randn(2, 10, 3), torch.randn(2, 10, 2)
    out, _, _ = net(x, cov)
    assert out.shape == (2, 4, 3, 3) and net.in_proj.in_features == 1 + 2
    x2 = x.clone()
    x2[..., 1:] = torch.randn(2, 10, 2) * 7  # other series change: series 0's forecast must not
    torch.testing.assert_close(net(x2, cov)[0][:, :, 0], out[:, :, 0])
    # and the same shared encoder forecasts a series identically whichever column it is in
    torch.testing.assert_close(net(x[..., [1, 0, 2]], cov)[0][:, :, 1], out[:, :, 0])


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_by_hand():
    y, f = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 5.0])
    assert mae(y, f) == pytest.approx(1.0)
    assert rmse(y, f) == pytest.approx(np.sqrt(5 / 3))
    assert smape(y, f) == pytest.approx(np.mean([200 / 3, 0, 200 * 2 / 8]))
    assert smape([0.0], [0.0]) == 0.0
    history = np.array([0.0, 1.0, 0.0, 3.0])  # lag-2 seasonal differences: 0, 2 → scale 1
    assert mase_scale(history, 2)[0] == pytest.approx(1.0)
    assert mase(y, f, history, 2) == pytest.approx(1.0)
    # two columns on different scales weigh the same in MASE
    h2 = np.stack([history, 100 * history], 1)
    assert mase(np.stack([y, 100 * y], 1), np.stack([f, 100 * f], 1), h2, 2) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- forecaster
def test_learns_sine_plus_trend_quickly():
    y = sine_trend(300)
    c = ForecastConfig(horizon=12, context=36, max_steps=400, lr=5e-3, seed=0, **TINY)
    f = Forecaster(c).fit(y[:-12])
    fc = f.predict(y[:-12])
    assert fc.point.shape == (12, 1)
    err = np.abs(fc.point[:, 0] - y[-12:]).mean()
    assert err < 0.1, f"MAE {err:.3f} on a sine of amplitude 2 (seasonal naive would be {0.05 * 12:.2f})"
    assert f.history["best_step"] > 0 and f.history["train_windows"] > 100


def test_validation_mase_is_the_point_forecasts_mase_on_the_holdout():
    s = _monthly(sine_trend(150, noise=0.2))
    f = Forecaster(ForecastConfig(horizon=6, context=24, quantiles=(0.1, 0.5, 0.9), max_steps=20, **TINY)).fit(s)
    n_val = round(0.2 * 150)  # the last val_fraction: windows whose targets start there
    origins = range(150 - n_val, 150 - 6 + 1)
    assert f.history["val_windows"] == len(origins)
    err = np.mean([np.abs(f.predict(s.slice(0, o)).point - s.values[o:o + 6]).mean() for o in origins])
    scale = mase_scale(s.values[:150 - n_val], 12)[0]
    assert f.history["val_mase"] == pytest.approx(err / scale, rel=1e-4)


def test_forecaster_quantiles_and_bad_input():
    y = sine_trend(120, noise=0.3)
    c = ForecastConfig(horizon=6, context=24, quantiles=(0.1, 0.5, 0.9), max_steps=40, **TINY)
    f = Forecaster(c).fit(y)
    fc = f.predict(y)
    assert fc.quantiles.shape == (6, 1, 3) and (np.diff(fc.quantiles, axis=-1) >= 0).all()
    np.testing.assert_array_equal(fc.point, fc.quantiles[..., 1])
    with pytest.raises(ValueError, match="shorter than the context"):
        f.predict(y[:10])
    with pytest.raises(ValueError, match="2 columns"):
        f.predict(np.stack([y, y], 1))
    bad = y.copy()
    bad[50] = np.nan
    with pytest.raises(ValueError, match="missing or non-finite"):
        f.predict(bad)
    with pytest.raises(ValueError, match="too short"):
        Forecaster(ForecastConfig(horizon=6, context=24)).fit(y[:32])


def test_save_load_roundtrip(tmp_path):
    y = sine_trend(100)
    f = Forecaster(ForecastConfig(horizon=4, context=16, max_steps=20, **TINY)).fit(y)
    f.save(tmp_path / "m")
    g = Forecaster.load(tmp_path / "m")
    np.testing.assert_array_equal(f.predict(y).point, g.predict(y).point)
    assert g.config == f.config
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["forecast_config.json", "forecast_model.pt"]
    (tmp_path / "m" / "forecast_config.json").write_text('{"config": ')  # cut short
    with pytest.raises(ValueError, match="not valid JSON .*corrupt saved Forecaster"):
        Forecaster.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a saved Forecaster"):
        Forecaster.load(tmp_path)


# ----------------------------------------------------------------------------------------------- ensemble
def _seasonal_series(n=180, period=12, seed=0):
    rng = np.random.default_rng(seed)
    pattern = rng.normal(size=period) * 3
    y = 50 + np.tile(pattern, n // period + 1)[:n] + 0.05 * rng.standard_normal(n)
    return _monthly(y)


def test_ensemble_chooses_the_variant_by_validation_mase():
    s = _seasonal_series()
    # lr = 0: every network stays at its initial forecast ≈ its base, so on a clean seasonal pattern the seasonal
    # base must win validation by far
    cfg = ForecastConfig(horizon=6, context=24, lr=0.0, max_steps=2, **{**TINY, "eval_every": 1})
    f = EnsembleForecaster(cfg, STANDARD_VARIANTS, seeds=(4, 7)).fit(s)
    val = f.history["validation_mase"]
    assert len(val) == 6 and f.chosen == min(val, key=val.get) and "base=seasonal" in f.chosen
    assert val[f.chosen] < 0.5 * min(v for k, v in val.items() if "seasonal" not in k)
    assert [m.config.seed for m in f.members] == [4, 7] and f.members[0] is f.candidates[f.chosen]
    assert all(m.config.replace(seed=0) == f.members[0].config.replace(seed=0) for m in f.members)
    fc = f.predict(s)
    assert fc.members.shape == (2, 6, 1) and fc.quantiles is None
    np.testing.assert_allclose(fc.point, np.median(fc.members, axis=0))
    assert set(f.predict_variants(s)) == set(val)
    # a series without a season: the seasonal variants drop out; one series: channel independence is a no-op
    g = EnsembleForecaster(cfg, MULTI_VARIANTS, seeds=1).fit(s.values[:, 0])
    assert sorted(g.history["validation_mase"]) == sorted(
        f"base={b}, channel_independent=False, linear_skip={k}" for b in ("last", "none") for k in (True, False))


def test_ensemble_quantiles_save_load_and_errors(tmp_path):
    s = _seasonal_series(120)
    cfg = ForecastConfig(horizon=4, context=24, quantiles=(0.1, 0.5, 0.9), max_steps=10, **TINY)
    f = EnsembleForecaster(cfg, [{"base": "last"}, {"base": "seasonal"}], seeds=3).fit(s)
    fc = f.predict(s)
    assert fc.quantiles.shape == (4, 1, 3) and (np.diff(fc.quantiles, axis=-1) >= 0).all()
    assert fc.members.shape == (3, 4, 1)
    f.save(tmp_path / "ens")
    g = EnsembleForecaster.load(tmp_path / "ens")
    np.testing.assert_array_equal(g.predict(s).point, fc.point)
    assert g.chosen == f.chosen
    (tmp_path / "ens" / "ensemble.json").write_text("{")
    with pytest.raises(ValueError, match="corrupt saved EnsembleForecaster"):
        EnsembleForecaster.load(tmp_path / "ens")
    with pytest.raises(ValueError, match="may not change context"):
        EnsembleForecaster(cfg, [{"context": 12}])
    with pytest.raises(ValueError, match="base must be one of"):
        EnsembleForecaster(cfg, [{"base": "drift"}])
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        EnsembleForecaster(cfg, seeds=0)
    with pytest.raises(ValueError, match="no variant applies"):
        EnsembleForecaster(cfg, [{"base": "seasonal"}]).fit(s.values[:, 0])
    with pytest.raises(RuntimeError, match="before fit"):
        EnsembleForecaster(cfg).predict(s)


# ----------------------------------------------------------------------------------------------- backtest
def test_rolling_origins():
    np.testing.assert_array_equal(rolling_origins(100, 10, 3), [70, 80, 90])
    np.testing.assert_array_equal(rolling_origins(100, 10, 3, step=5), [80, 85, 90])
    with pytest.raises(ValueError, match="no room"):
        rolling_origins(20, 10, 3)


class _Spy:
    """Records every array it is given; forecasts the mean of what it saw."""

    name = "spy"

    def __init__(self):
        self.seen = []

    def fit(self, train):
        self.seen.append(("fit", np.array(train)))
        return self

    def forecast(self, history, horizon):
        self.seen.append(("forecast", np.array(history)))
        return np.repeat(np.mean(history, 0, keepdims=True), horizon, 0)


def test_backtest_methods_see_only_the_past():
    y = sine_trend(120)
    s = TimeSeries.from_array(y)
    spy = _Spy()
    r = backtest(s, {"spy": spy}, horizon=6, n_windows=4)
    origins = r.origins.tolist()
    assert origins == [96, 102, 108, 114]
    kinds = [k for k, _ in spy.seen]
    assert kinds == ["fit"] + ["forecast"] * 4
    assert len(spy.seen[0][1]) == origins[0]
    for (_, h), o in zip(spy.seen[1:], origins):
        assert len(h) == o
        np.testing.assert_array_equal(h[:, 0], y[:o])  # exactly the past, nothing at or after the origin
    np.testing.assert_array_equal(r.actuals[:, :, 0], [y[o:o + 6] for o in origins])


def _changed_after(series: TimeSeries, start: int) -> TimeSeries:
    out = series.slice()
    out.values[start:] = out.values[start:] * 3 + 100  # every value from `start` on is different
    return out


def _assert_no_leak(make_methods, series, horizon, n_windows):
    """Forecasts from origin k must not change when every value at or after origin k changes."""
    base = backtest(series, make_methods(), horizon, n_windows)
    origins = base.origins
    for k in (0, n_windows - 1):
        other = backtest(_changed_after(series, int(origins[k])), make_methods(), horizon, n_windows)
        for name in base.forecasts:
            np.testing.assert_array_equal(other.forecasts[name][: k + 1], base.forecasts[name][: k + 1],
                                          err_msg=f"{name}: forecast at an origin <= {origins[k]} changed")
            if k < n_windows - 1:  # sanity: later windows do see the change
                assert not np.array_equal(other.forecasts[name][k + 1:], base.forecasts[name][k + 1:])


def test_backtest_never_leaks_the_future_naive_and_mamba():
    s = TimeSeries.from_array(sine_trend(160, noise=0.1))
    cfg = ForecastConfig(horizon=6, context=24, max_steps=40, seed=3, **TINY)
    _assert_no_leak(lambda: {"naive": Naive(), "snaive": SeasonalNaive(12), "mamba": MambaMethod(cfg)}, s, 6, 3)


def _small(cls, keep):
    """A baseline restricted to a few candidate specifications (selection included), to keep tests quick."""

    class Small(cls):
        def candidates(self, y):
            return [c for c in super().candidates(y) if c.label in keep]

    return Small


def test_backtest_never_leaks_the_future_statsmodels():
    pytest.importorskip("statsmodels")
    from mambakit.forecast.baselines import ARIMA, ETS

    ets = _small(ETS, {"ETS(A,N,A)", "ETS(A,A,A)"})
    arima = _small(ARIMA, {"ARIMA(0, 1, 1)+drift", "SARIMA(0, 1, 1)(0, 1, 1)_4"})
    s = TimeSeries.from_array(sine_trend(56, period=4, noise=0.1))
    _assert_no_leak(lambda: {"ETS": ets(4, 4), "ARIMA": arima(4, 4)}, s, 4, 2)


def test_seasonal_naive_and_classical_baselines_on_a_clean_season():
    pytest.importorskip("statsmodels")
    from mambakit.forecast.baselines import ETS

    y = np.tile([1.0, 5.0, 3.0, 8.0], 20) + 10
    np.testing.assert_array_equal(SeasonalNaive(4).forecast(y[:-6], 6)[:, 0], y[-6:])
    np.testing.assert_array_equal(Naive().forecast(y, 3)[:, 0], [y[-1]] * 3)
    ets = _small(ETS, {"ETS(A,N,N)", "ETS(A,N,A)"})(4, 4).fit(y[:60])
    assert ets.chosen == ["ETS(A,N,A)"]  # the seasonal model wins the holdout
    np.testing.assert_allclose(ets.forecast(y[:72], 4)[:, 0], y[72:76], atol=0.05)


# --------------------------------------------------------------------------------------------------- CLI
def _cli(argv):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["forecast", *argv])
    return args.func(args)


def test_cli_writes_forecast_csv(tmp_path, capsys):
    y = sine_trend(150)
    stamps = np.arange(np.datetime64("2000-01", "M"), np.datetime64("2000-01", "M") + 150)
    p = tmp_path / "sales.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["month", "sales", "other"])
        for t, v in zip(stamps, y):
            w.writerow([f"{t}-01", f"{v:.4f}", f"{2 * v:.4f}"])
    out = tmp_path / "fc.csv"
    rc = _cli([str(p), "--horizon", "6", "--columns", "sales", "--context", "24", "--quantiles", "0.1,0.5,0.9",
               "--out", str(out), "--save", str(tmp_path / "model"), "--set", "max_steps=30",
               "--set", "d_model=16", "--set", "threads=1", "--backtest", "2", "--plot", str(tmp_path / "fc.png")])
    assert rc == 0
    table = capsys.readouterr().out
    assert "backtest: 2 windows of 6 steps" in table and "seasonal naive" in table and "Mamba" in table
    if __import__("importlib").util.find_spec("matplotlib"):
        assert (tmp_path / "fc.png").stat().st_size > 1000
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["timestamp", "sales", "sales_q0.1", "sales_q0.5", "sales_q0.9"]
    assert [r[0] for r in rows[1:]] == [f"2012-{m:02d}-01" for m in range(7, 13)]
    q = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
    assert (np.diff(q, axis=1) >= 0).all()
    assert (tmp_path / "model" / "forecast_model.pt").exists()


def test_cli_select_and_seeds(tmp_path, capsys):
    y = sine_trend(120)
    p = tmp_path / "d.csv"
    p.write_text("t,y\n" + "".join(f"{i},{v:.4f}\n" for i, v in enumerate(y)))  # integer steps: no season
    rc = _cli([str(p), "--horizon", "4", "--context", "16", "--select", "--seeds", "2",
               "--out", str(tmp_path / "f.csv"), "--save", str(tmp_path / "m"), "--set", "max_steps=3",
               "--set", "eval_every=1", "--set", "d_model=8", "--set", "threads=1"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "variant chosen on validation" in err and "; 4 candidates)" in err  # last/none × skip on/off
    assert err.count("trained ") == 2
    g = EnsembleForecaster.load(tmp_path / "m")
    assert len(g.members) == 2 and g.predict(y).point.shape == (4, 1)
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        _cli([str(p), "--horizon", "4", "--seeds", "0"])


def test_cli_errors(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("date,a\n2020-01-01,1\n2020-02-01,2\n")
    with pytest.raises(ValueError, match=r"no value column\(s\) \['b'\]"):
        _cli([str(p), "--horizon", "2", "--columns", "b"])
    with pytest.raises(ValueError, match="unknown ForecastConfig field 'dmodel'"):
        _cli([str(p), "--horizon", "2", "--set", "dmodel=3"])
    with pytest.raises(ValueError, match="too short"):
        _cli([str(p), "--horizon", "2"])


# ------------------------------------------------------------------------------------------ the experiment
def test_tiny_experiment(tmp_path):
    pytest.importorskip("statsmodels")
    pytest.importorskip("matplotlib")
    from experiments.forecasting.run import main

    assert main(["--tiny", "--datasets", "macrodata", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    (d,) = res["datasets"]
    assert d["dataset"] == "macrodata" and set(d["metrics"]) >= {"naive", "seasonal naive", "Mamba"}
    assert all(np.isfinite(v) for met in d["metrics"].values() for v in met.values())
    # the coverage is a count of actuals inside the band over all windows × steps × the 5 macrodata series
    # (a mean of booleans is always in [0, 1]: the count and the report are what can be wrong)
    from mambakit.data.timeseries import MACRO_COLUMNS

    n = d["windows"] * d["horizon"] * len(MACRO_COLUMNS)
    inside = d["mamba_80pct_coverage"] * n
    assert inside == pytest.approx(round(inside), abs=1e-9)
    readme = (tmp_path / "README.md").read_text()
    assert f"coverage (actual values inside its 0.1-0.9 quantile band): {100 * d['mamba_80pct_coverage']:.0f}%" \
        in readme
    assert "Tiny run" in readme and "| Mamba |" in readme and "macrodata.png" in readme
    assert (tmp_path / "macrodata.png").stat().st_size > 1000
    # the variant table: every candidate's validation loss and test MASE, the chosen one marked
    variants = d["variants"]
    assert len(variants) == 2 and sum(v["chosen"] for v in variants.values()) == 1
    chosen = min(variants, key=lambda k: variants[k]["val_MASE"])
    assert variants[chosen]["chosen"] and "## Variants" in readme
    assert f"| {chosen} | **{variants[chosen]['val_MASE']:.3f}** / {variants[chosen]['MASE']:.3f} |" in readme
    # merging per-dataset results (separate processes) rebuilds the same report
    (tmp_path / "README.md").unlink()
    assert main(["--report-only", "--out", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "| macrodata |" in readme and "## Variants" in readme
