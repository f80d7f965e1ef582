"""Rolling-origin backtests: fit every method once on the data before the first origin, then at each origin
forecast H steps from the history up to it and score them against what happened.

    origins = rolling_origins(n, horizon=12, n_windows=4)      # e.g. [209, 221, 233, 245] for n = 257
    result = backtest(series, {"mamba": MambaMethod(cfg), "ETS": ETS(12, 12)}, horizon=12, n_windows=4)
    result.to_frame()       # unique_id, ds, cutoff, y, one column per method (+ Mamba's quantile columns)

`series` may also be a pandas long frame (unique_id, ds, y; mambakit.forecast.frames): its series are the
columns, and `to_frame()` names them by their unique_id.

Leakage is ruled out by construction: a method's `fit` gets `series.slice(0, origins[0])` and its `forecast`
gets `series.slice(0, origin)`, both copies, so no method can read (or write) a value at or after the origin
it forecasts from; the MASE scale also uses only the history before the origin. tests/test_forecast.py checks
that changing every value after an origin leaves that origin's forecasts unchanged.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..data.timeseries import TimeSeries
from . import frames
from .config import ForecastConfig
from .ensemble import EnsembleForecaster
from .forecaster import Forecaster
from .metrics import point_metrics
from .origins import rolling_origins  # noqa: F401 -- part of this module's interface

METRICS = ("MAE", "RMSE", "MASE", "sMAPE")


class MambaMethod:
    """The Mamba forecaster in the backtest's interface (fit on a TimeSeries; forecast → (H, C)): one Forecaster,
    or with `variants` / `seeds` > 1 an EnsembleForecaster (variant chosen on validation, median of seeds)."""

    name = "Mamba"
    takes_series = True  # fit/forecast get TimeSeries (timestamps for the calendar features), not arrays

    def __init__(self, config: ForecastConfig, verbose: bool = False, variants=None, seeds: int | tuple = 1):
        self.config, self.verbose, self.variants, self.seeds = config, verbose, variants, seeds
        self.forecaster: Forecaster | EnsembleForecaster | None = None
        # per forecast call: (H, C, Q) quantiles; (S, H, C) member points (ensemble); {variant: (H, C)} (ensemble)
        self.quantile_forecasts: list[np.ndarray] = []
        self.member_forecasts: list[np.ndarray] = []
        self.variant_forecasts: list[dict[str, np.ndarray]] = []

    def fit(self, train: TimeSeries) -> "MambaMethod":
        if self.variants is None and self.seeds == 1:
            self.forecaster = Forecaster(self.config).fit(train, verbose=self.verbose)
        else:
            self.forecaster = EnsembleForecaster(self.config, self.variants, self.seeds).fit(train, self.verbose)
        self.quantile_forecasts, self.member_forecasts, self.variant_forecasts = [], [], []
        return self

    def forecast(self, history: TimeSeries, horizon: int) -> np.ndarray:
        if horizon != self.config.horizon:
            raise ValueError(f"this forecaster predicts {self.config.horizon} steps, asked for {horizon}")
        fc = self.forecaster.predict(history)
        if fc.quantiles is not None:
            self.quantile_forecasts.append(fc.quantiles)
        if fc.members is not None:
            self.member_forecasts.append(fc.members)
        if isinstance(self.forecaster, EnsembleForecaster):
            self.variant_forecasts.append(self.forecaster.predict_variants(history))
        return fc.point

    def info(self) -> dict:
        return {k: v for k, v in self.forecaster.history.items() if k != "record"}


@dataclass
class BacktestResult:
    origins: np.ndarray
    horizon: int
    season: int
    metrics: dict[str, dict[str, float]]  # method → metric → mean over windows
    per_window: dict[str, list[dict[str, float]]]  # method → one metric dict per origin
    forecasts: dict[str, np.ndarray]  # method → (n_windows, H, C)
    actuals: np.ndarray  # (n_windows, H, C)
    fit_seconds: dict[str, float]
    info: dict[str, dict] = field(default_factory=dict)  # method → what it chose / how it trained
    ds: np.ndarray | None = None  # (W, H) the forecast steps' timestamps
    cutoffs: np.ndarray | None = None  # (W,) the last timestamp before each window
    quantiles: dict[str, tuple] = field(default_factory=dict)  # method → ((W, H, C, Q) quantiles, levels)
    ids: list | None = None  # the series' names (a frame's unique_id values)

    def to_frame(self):
        """The long frame of statsforecast's cross_validation: unique_id, ds, cutoff, y, one column per method
        (point forecasts), plus the quantile columns (Mamba-lo-80, ...) of methods that predicted quantiles."""
        return frames.backtest_frame(self, self.ids)


def backtest(series: TimeSeries, methods: dict, horizon: int, n_windows: int, step: int | None = None,
             season: int | None = None, verbose: bool = False, progress: bool | None = None) -> BacktestResult:
    """Fit each method on the part before the first origin, forecast at every origin, score (see module doc).

    Methods get (T, C) arrays, or TimeSeries when they set `takes_series = True` (MambaMethod); a method's
    `info()` (or its `chosen` specifications) goes into the result. `series` may be a long DataFrame.
    progress: a tqdm bar over the methods' fits and forecasts (None: on a terminal only; False: never)."""
    from tqdm.auto import tqdm

    ids = None
    if frames.is_frame(series):
        series, ids = frames.from_long(series)
    origins = rolling_origins(len(series), horizon, n_windows, step)
    m = series.season if season is None else season
    train = series.slice(0, int(origins[0]))
    actuals = np.stack([series.values[o:o + horizon] for o in origins])  # (W, H, C)
    metrics, per_window, forecasts, fit_seconds, info, quantiles = {}, {}, {}, {}, {}, {}
    bar = tqdm(total=len(methods) * (1 + len(origins)), desc="backtest", unit="fit/forecast",
               disable=None if progress is None else not progress)
    for name, method in methods.items():
        wants_series = getattr(method, "takes_series", False)
        bar.set_postfix_str(f"{name}: fit")
        t0 = time.perf_counter()
        method.fit(train if wants_series else train.values)
        fit_seconds[name] = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix_str(f"{name}: forecasts")
        fc = []
        for o in origins:
            history = series.slice(0, int(o))
            f = method.forecast(history if wants_series else history.values, horizon)
            fc.append(np.asarray(f, dtype=np.float64).reshape(horizon, series.n_channels))
            bar.update(1)
        forecasts[name] = np.stack(fc)  # (W, H, C)
        per_window[name] = [point_metrics(actuals[i], forecasts[name][i], series.values[:o], m)
                            for i, o in enumerate(origins)]
        metrics[name] = {k: float(np.mean([w[k] for w in per_window[name]])) for k in METRICS}
        if getattr(method, "quantile_forecasts", None):
            quantiles[name] = (np.stack(method.quantile_forecasts), method.config.quantiles)  # (W, H, C, Q)
        if hasattr(method, "info"):
            info[name] = method.info()
        elif hasattr(method, "chosen"):
            info[name] = {"chosen": list(method.chosen)}
        if verbose:
            print(f"  {name:16s} MASE {metrics[name]['MASE']:.3f}  fit {fit_seconds[name]:.1f}s", file=sys.stderr,
                  flush=True)
    bar.close()
    ds = np.stack([series.timestamps[o:o + horizon] for o in origins])  # (W, H)
    return BacktestResult(origins, horizon, m, metrics, per_window, forecasts, actuals, fit_seconds, info, ds,
                          series.timestamps[origins - 1], quantiles, ids if ids is not None else list(series.names))
