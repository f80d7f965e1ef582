"""mambakit.forecast with pandas long frames (unique_id, ds, y): the DataFrame path gives the array path's
forecasts, output columns and future dates, cross-validation = the leak-free backtest, baselines and backtests
on frames, what is refused, the CLI on long CSV / Parquet, and the error without pandas."""

import argparse
import sys

import numpy as np
import pytest

pd = pytest.importorskip("pandas", reason="the DataFrame API needs pandas (pip install mambakit[pandas])")

from mambakit.cli.forecast import add_parser as add_cli  # noqa: E402
from mambakit.data.timeseries import regularize, require_pandas  # noqa: E402
from mambakit.forecast import ForecastConfig, Forecaster  # noqa: E402
from mambakit.forecast.backtest import MambaMethod, backtest  # noqa: E402
from mambakit.forecast.baselines import Naive, SeasonalNaive  # noqa: E402
from mambakit.forecast.ensemble import EnsembleForecaster  # noqa: E402
from mambakit.forecast.frames import forecast_frame, from_long, quantile_names, to_long  # noqa: E402

TINY = dict(d_model=8, n_layer=1, d_state=4, batch_size=16, max_steps=10, eval_every=5, patience=2, threads=1)


def two_series(n=96):
    """Two monthly series (a trend + season, and its mirror) as a TimeSeries and as a long frame whose rows are
    shuffled (the frame path sorts each series by ds)."""
    t = np.arange(n)
    a = 10 + 0.05 * t + 2 * np.sin(2 * np.pi * t / 12)
    b = 30 - 0.02 * t + np.cos(2 * np.pi * t / 12)
    stamps = np.arange(np.datetime64("2001-01"), np.datetime64("2001-01") + n).astype("datetime64[s]")
    series = regularize(stamps, np.stack([a, b], 1), ["north", "south"])
    df = to_long(series).sample(frac=1.0, random_state=0).reset_index(drop=True)
    return series, df


def as_wide(frame, column, ids):
    """(h, C) of one forecast column of a long frame, series in `ids` order."""
    return frame.pivot(index="ds", columns="unique_id", values=column)[ids].to_numpy()


# --------------------------------------------------------------------------------- frame path = array path
def test_frame_and_array_paths_give_the_same_forecasts_on_a_dataset():
    pytest.importorskip("statsmodels")
    from mambakit.data.timeseries import load_statsmodels

    series = load_statsmodels("elec_equip")  # the experiment's dataset: 257 months
    cfg = ForecastConfig(horizon=12, context=36, quantiles=(0.1, 0.5, 0.9), **TINY)
    df = to_long(series)
    assert list(df.columns) == ["unique_id", "ds", "y"] and len(df) == len(series)
    by_array = Forecaster(cfg).fit(series).predict(series)
    frame = Forecaster(cfg).fit(df).predict(12)
    assert list(frame.columns) == ["unique_id", "ds", "Mamba", "Mamba-lo-80", "Mamba-hi-80"]
    np.testing.assert_array_equal(frame["Mamba"].to_numpy(), by_array.point[:, 0])
    np.testing.assert_array_equal(frame["Mamba-lo-80"].to_numpy(), by_array.quantiles[:, 0, 0])
    np.testing.assert_array_equal(frame["Mamba-hi-80"].to_numpy(), by_array.quantiles[:, 0, 2])
    assert str(series.timestamps[-1])[:10] == "2016-05-01"  # the last month; the forecasts continue monthly
    assert frame["ds"].iloc[0] == pd.Timestamp("2016-06-01") and frame["ds"].iloc[-1] == pd.Timestamp("2017-05-01")
    # the experiment's protocol: cross_validation on the frame = backtest with MambaMethod on the TimeSeries
    cv = Forecaster(cfg).cross_validation(df, h=12, n_windows=2)
    r = backtest(series, {"Mamba": MambaMethod(cfg)}, 12, 2)
    assert list(cv.columns) == ["unique_id", "ds", "cutoff", "y", "Mamba", "Mamba-lo-80", "Mamba-hi-80"]
    np.testing.assert_array_equal(cv["Mamba"].to_numpy(), r.forecasts["Mamba"].reshape(-1))
    np.testing.assert_array_equal(cv["y"].to_numpy(), r.actuals.reshape(-1))
    assert list(pd.unique(cv["cutoff"])) == [pd.Timestamp("2014-05-01"), pd.Timestamp("2015-05-01")]
    frame_r = r.to_frame()
    np.testing.assert_array_equal(frame_r["Mamba"].to_numpy(), cv["Mamba"].to_numpy())
    np.testing.assert_array_equal(frame_r["Mamba-hi-80"].to_numpy(), cv["Mamba-hi-80"].to_numpy())


def test_many_series_in_one_frame_are_the_columns_of_the_array_path():
    series, df = two_series()
    cfg = ForecastConfig(horizon=6, context=24, **TINY)
    a = Forecaster(cfg).fit(series).predict(series)
    # the channel order is the order in which the unique_ids first appear: in the shuffled frame, as listed
    ids = list(pd.unique(df["unique_id"]))
    f = Forecaster(cfg).fit(df)
    assert f.frame_ids == ids
    np.testing.assert_array_equal(as_wide(f.predict(), "Mamba", ids),
                                  Forecaster(cfg).fit(series.select(ids)).predict(series.select(ids)).point)
    out = f.predict(h=4)  # the first 4 of the 6 steps
    assert out.equals(f.predict(4))
    assert list(out.columns) == ["unique_id", "ds", "Mamba"] and len(out) == 8
    assert sorted(out["ds"].unique()) == list(pd.date_range("2009-01-01", periods=4, freq="MS"))
    g = Forecaster(cfg).fit(to_long(series))  # series in the array's column order
    np.testing.assert_array_equal(as_wide(g.predict(), "Mamba", ["north", "south"]), a.point)
    # a new history frame: the steps after it
    later = g.predict(6, df=to_long(series.slice(0, 90)))
    np.testing.assert_array_equal(as_wide(later, "Mamba", ["north", "south"]),
                                  g.predict(series.slice(0, 90)).point)
    with pytest.raises(ValueError, match=r"h must be an int in \[1, 6\]"):
        g.predict(7)
    with pytest.raises(ValueError, match="not both"):
        g.predict(series, h=3)
    with pytest.raises(ValueError, match="fitted on"):
        g.predict(6, df=to_long(series.select(["north"])))


def test_ensemble_takes_frames():
    series, _ = two_series(80)
    cfg = ForecastConfig(horizon=4, context=16, **TINY)
    variants = [{"base": "last"}, {"base": "none"}]
    a = EnsembleForecaster(cfg, variants, seeds=2).fit(series).predict(series)
    b = EnsembleForecaster(cfg, variants, seeds=2).fit(to_long(series)).predict()
    np.testing.assert_array_equal(as_wide(b, "Mamba", ["north", "south"]), a.point)


def test_cross_validation_never_reads_after_a_cutoff():
    series, _ = two_series(90)
    cfg = ForecastConfig(horizon=6, context=18, **TINY)
    df = to_long(series)
    cv = Forecaster(cfg).cross_validation(df, h=6, n_windows=2, step=6)
    first_cutoff = cv["cutoff"].min()
    changed = df.copy()
    changed.loc[changed["ds"] > first_cutoff, "y"] *= -3.0  # every value after the first cutoff
    cv2 = Forecaster(cfg).cross_validation(changed, h=6, n_windows=2, step=6)
    w1 = cv["cutoff"] == first_cutoff
    np.testing.assert_array_equal(cv.loc[w1, "Mamba"].to_numpy(), cv2.loc[w1, "Mamba"].to_numpy())
    assert not np.array_equal(cv.loc[~w1, "Mamba"].to_numpy(), cv2.loc[~w1, "Mamba"].to_numpy())


# ---------------------------------------------------------------------------------- baselines and backtests
def test_baselines_and_backtest_take_frames():
    series, df = two_series()
    sn = SeasonalNaive(12)
    out = sn.forecast(df, 5)
    assert list(out.columns) == ["unique_id", "ds", "seasonal naive"]
    ids = list(pd.unique(df["unique_id"]))
    np.testing.assert_array_equal(as_wide(out, "seasonal naive", ids),
                                  sn.forecast(series.select(ids), 5))
    r = backtest(df, {"naive": Naive(), "seasonal naive": sn}, horizon=6, n_windows=3)
    fr = r.to_frame()
    assert list(fr.columns) == ["unique_id", "ds", "cutoff", "y", "naive", "seasonal naive"]
    assert len(fr) == 3 * 6 * 2 and r.ids == ids
    ra = backtest(series.select(ids), {"naive": Naive(), "seasonal naive": sn}, horizon=6, n_windows=3)
    assert r.metrics == ra.metrics


# ------------------------------------------------------------------------------------------------- refusals
def test_what_frames_refuse():
    series, df = two_series(40)
    cfg = ForecastConfig(horizon=3, context=8, **TINY)
    with pytest.raises(ValueError, match=r"no column\(s\) \['ds'\]"):
        Forecaster(cfg).fit(df.rename(columns={"ds": "date"}))
    with pytest.raises(ValueError, match=r"exogenous column\(s\) \['price'\].*exog='drop'"):
        Forecaster(cfg).fit(df.assign(price=1.0))
    s1, _ = from_long(df.assign(price=1.0), exog="drop")
    np.testing.assert_array_equal(s1.values, from_long(df)[0].values)
    with pytest.raises(ValueError, match="other timestamps.*one forecaster per series"):
        from_long(df[~((df["unique_id"] == "south") & (df["ds"] < pd.Timestamp("2001-06-01")))])
    with pytest.raises(ValueError, match="two rows for ds"):
        from_long(pd.concat([df, df.iloc[:1]]))
    holed = df.copy()
    holed.loc[(holed["unique_id"] == "north") & (holed["ds"] == pd.Timestamp("2002-03-01")), "y"] = np.nan
    with pytest.raises(ValueError, match="'north' has a gap of 1 missing steps.*max_gap=0"):
        from_long(holed)
    assert np.isfinite(from_long(holed, max_gap=1)[0].values).all()
    with pytest.raises(ValueError, match="'y' value 'abc'"):
        from_long(df.astype({"y": object}).assign(y=lambda d: d["y"].where(d.index != 3, "abc")))
    f = Forecaster(cfg).fit(series)  # fitted on an array: predict(h) has no frame to continue
    with pytest.raises(ValueError, match="pass the history"):
        f.predict(3)
    assert len(f.predict(3, df=df)) == 6


def test_quantile_column_names_and_integer_ds():
    assert quantile_names((0.1, 0.5, 0.9)) == ["Mamba-lo-80", "Mamba", "Mamba-hi-80"]
    assert quantile_names((0.05, 0.25, 0.5, 0.75, 0.95)) == ["Mamba-lo-90", "Mamba-lo-50", "Mamba",
                                                            "Mamba-hi-50", "Mamba-hi-90"]
    assert quantile_names((0.2, 0.5)) == ["Mamba-q0.2", "Mamba"]
    df = pd.DataFrame({"unique_id": 7, "ds": np.arange(10, 40, 2), "y": np.arange(15.0)})  # a step index, step 2
    s, ids = from_long(df)
    assert ids == [7] and s.freq.name == "index step 2"
    fc = Forecaster(ForecastConfig(horizon=2, context=4, **TINY)).fit(s).predict(s)
    out = forecast_frame(fc, ids)
    assert out["ds"].tolist() == [40, 42] and out["unique_id"].tolist() == [7, 7]


def test_pandas_missing_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError, match=r"pip install mambakit\[pandas\]"):
        require_pandas()


# ------------------------------------------------------------------------------------------------------ CLI
def _cli(argv):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["forecast", *argv])
    return args.func(args)


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_cli_reads_and_writes_the_long_format(tmp_path, ext):
    if ext == "parquet":
        pytest.importorskip("pyarrow")
    series, df = two_series(72)
    path = tmp_path / f"panel.{ext}"
    df.to_csv(path, index=False) if ext == "csv" else df.to_parquet(path, index=False)
    out = tmp_path / f"fc.{ext}"
    assert _cli([str(path), "--horizon", "3", "--context", "12", "--quantiles", "0.1,0.5,0.9", "--out", str(out),
                 "--set", "max_steps=10", "--set", "d_model=8", "--set", "threads=1"]) == 0
    got = pd.read_csv(out, parse_dates=["ds"]) if ext == "csv" else pd.read_parquet(out)
    assert list(got.columns) == ["unique_id", "ds", "Mamba", "Mamba-lo-80", "Mamba-hi-80"]
    assert set(got["unique_id"]) == {"north", "south"} and len(got) == 6
    assert got["ds"].min() == pd.Timestamp("2007-01-01")
    df.assign(price=1.0).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(ValueError, match="exogenous"):
        _cli([str(tmp_path / "x.csv"), "--horizon", "3"])
    assert _cli([str(tmp_path / "x.csv"), "--horizon", "3", "--context", "12", "--drop-exog", "--out",
                 str(tmp_path / "x_fc.csv"), "--set", "max_steps=5", "--set", "d_model=8", "--set", "threads=1"]) == 0
    assert len(pd.read_csv(tmp_path / "x_fc.csv")) == 6


# ------------------------------------------------------------------------------------------- the experiment
def test_experiment_frames_path_reproduces_the_array_path():
    """experiments.forecasting --frames (long frames, EnsembleForecaster.cross_validation, backtest(df)) gives
    the array path's numbers; sunspots because its season (11) is not its frequency's (yearly)."""
    pytest.importorskip("statsmodels")
    from experiments.forecasting.run import DATASETS, run_dataset, run_dataset_frames

    args = ("sunspots", DATASETS["sunspots"], True, (0,), False, {"max_steps": 10}, False)
    by_array, _, _ = run_dataset(*args)
    by_frames, _, _ = run_dataset_frames(*args)
    for method in ("naive", "seasonal naive", "Mamba"):
        assert by_frames["metrics"][method] == by_array["metrics"][method], method
    assert by_frames["mamba_80pct_coverage"] == by_array["mamba_80pct_coverage"]
    assert by_frames["info"]["Mamba"]["chosen"] == by_array["info"]["Mamba"]["chosen"]
