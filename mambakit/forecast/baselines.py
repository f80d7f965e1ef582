"""Classical forecasting baselines: naive, seasonal naive, ETS and (S)ARIMA (statsmodels, imported lazily).

Every method has the interface the backtest uses:

    method.fit(train)            train: (T, C) array; estimates parameters (per column) from it alone
    method.forecast(history, H)  history: (T', C) array (any length, usually train plus later data) → (H, C)

Both also take a TimeSeries or a pandas long frame (unique_id, ds, y; mambakit.forecast.frames); given a frame,
`forecast` returns one (unique_id, ds, <method name>) with the future timestamps of the frame's frequency.

ETS and ARIMA estimate their parameters once, in `fit`, and `forecast` runs the fitted model over the history
it is given with those parameters fixed (Kalman filter / exponential smoothing recursions: the state is
updated, nothing is re-estimated). That is the same protocol as the Mamba forecaster (trained once, then fed
each history), so all methods see exactly the same data, and nothing after the training part can leak into
any parameter.

Model choice (as auto-ETS / auto-ARIMA do, but by out-of-sample error instead of information criteria, so
models with different differencing compare fairly): each candidate specification is fitted on the first part
of the training data and scored by its MAE on rolling H-step forecasts over the rest (the last `val_fraction`
of the training data, the split the Mamba forecaster validates on); the winner is refitted on all of it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..data.timeseries import TimeSeries
from . import frames
from .forecaster import Forecast

STATSMODELS_INSTALL = "pip install mambakit[forecast]  (or: pip install statsmodels)"


def _statsmodels():
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        raise ImportError(f"the ETS and ARIMA baselines need statsmodels: {STATSMODELS_INSTALL}") from None


def _quiet():
    """statsmodels' warnings off, and one BLAS thread: its matrices are tiny, and OpenBLAS's spinning worker
    threads made the fits ~50x slower in CPU time on a shared 2-core machine (measured: an ARIMA(0,1,1) fit on
    40 points took 3.2 s of CPU with the default threads, 0.06 s with one). threadpoolctl is used when
    installed (it comes with scikit-learn); otherwise set OPENBLAS_NUM_THREADS=1 yourself."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        stack.enter_context(threadpool_limits(1, user_api="blas"))
    return stack


def _2d(a) -> np.ndarray:
    """(T, C) float64 values of an array, a TimeSeries or a long frame."""
    if frames.is_frame(a):
        a = frames.from_long(a)[0]
    if isinstance(a, TimeSeries):
        a = a.values
    a = np.asarray(a, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


class _Method:
    """forecast(history, H) for every input kind; subclasses implement _predict((T, C) values, H) → (H, C)."""

    name = "?"

    def forecast(self, history, horizon: int):
        if frames.is_frame(history):
            series, ids = frames.from_long(history)
            point = self._predict(series.values, horizon)
            return frames.forecast_frame(Forecast(series.future_timestamps(horizon), point, list(series.names)),
                                         ids, model=self.name)
        return self._predict(_2d(history), horizon)


# --------------------------------------------------------------------------------------------- the naives
class Naive(_Method):
    """Every future step = the last value."""

    name = "naive"

    def fit(self, train) -> "Naive":
        return self

    def _predict(self, h: np.ndarray, horizon: int) -> np.ndarray:
        return np.repeat(h[-1:], horizon, axis=0)


class SeasonalNaive(_Method):
    """Step h ahead = the value one season (m steps) before it: y[T − m + ((h − 1) mod m)]."""

    def __init__(self, m: int):
        self.m = max(1, int(m))
        self.name = "seasonal naive" if self.m > 1 else "naive"

    def fit(self, train) -> "SeasonalNaive":
        return self

    def _predict(self, h: np.ndarray, horizon: int) -> np.ndarray:
        if len(h) < self.m:
            raise ValueError(f"seasonal naive needs a history of at least m={self.m} steps, got {len(h)}")
        idx = len(h) - self.m + np.arange(horizon) % self.m
        return h[idx]


# ------------------------------------------------------------------------------------- statsmodels models
@dataclass(frozen=True)
class _Spec:
    """One candidate: for ETS (trend, damped, seasonal); for ARIMA (order, seasonal_order, trend, fourier K)."""

    label: str
    kwargs: tuple


def _holdout_origins(n: int, horizon: int, val_fraction: float) -> tuple[int, np.ndarray]:
    n_val = max(horizon, int(round(val_fraction * n)))
    start = n - n_val
    return start, np.arange(start, n - horizon + 1, max(1, horizon // 2))


class _Statsmodels(_Method):
    """Per column: choose a specification on a holdout, fit it on the training data; forecast with it fixed."""

    name = "?"

    def __init__(self, m: int, horizon: int, val_fraction: float = 0.2, period: float | None = None):
        _statsmodels()
        self.m, self.horizon, self.val_fraction = int(m), int(horizon), float(val_fraction)
        self.period = float(period or m)  # the true seasonal period (52.18 weeks in a year); m is its integer
        self.fitted: list = []  # per column: (spec, params)
        self.chosen: list[str] = []

    # subclasses: candidates(y) → [_Spec]; _fit(y, spec) → params; _forecast(y, spec, params, H) → (H,)
    def fit(self, train) -> "_Statsmodels":
        train = _2d(train)
        self.fitted, self.chosen = [], []
        for j in range(train.shape[1]):
            y = train[:, j]
            spec = self._select(y)
            self.fitted.append((spec, self._fit(y, spec)))
            self.chosen.append(spec.label)
        return self

    def _select(self, y: np.ndarray) -> _Spec:
        cands = self.candidates(y)
        if len(cands) == 1:
            return cands[0]
        start, origins = _holdout_origins(len(y), self.horizon, self.val_fraction)
        best, best_err, errors = None, math.inf, {}
        for spec in cands:
            try:
                params = self._fit(y[:start], spec)
                err = np.mean([np.abs(self._forecast(y[:o], spec, params, self.horizon)[: len(y) - o]
                                      - y[o:o + self.horizon]).mean() for o in origins])
            except (ValueError, np.linalg.LinAlgError, IndexError) as e:  # a candidate that cannot be fitted
                errors[spec.label] = str(e)
                continue
            if np.isfinite(err) and err < best_err:
                best, best_err = spec, err
        if best is None:
            raise ValueError(f"{self.name}: no candidate model could be fitted: {errors}")
        return best

    def _predict(self, h: np.ndarray, horizon: int) -> np.ndarray:
        if not self.fitted:
            raise RuntimeError(f"{self.name}: forecast before fit")
        cols = [self._forecast(h[:, j], spec, params, horizon) for j, (spec, params) in enumerate(self.fitted)]
        return np.stack(cols, axis=1)


class ETS(_Statsmodels):
    """Exponential smoothing state-space models (statsmodels ETSModel): additive errors; trend none, additive or
    damped; seasonality none, additive or multiplicative (positive series) of period m."""

    name = "ETS"

    def candidates(self, y):
        trends = [(None, False), ("add", False), ("add", True)]
        seasonals = [None]
        if 2 <= self.m and len(y) >= 3 * self.m:
            seasonals += ["add"] + (["mul"] if (y > 0).all() else [])
        return [_Spec(f"ETS(A,{'N' if t is None else 'Ad' if d else 'A'},{(s or 'N')[0].upper()})",
                      (("trend", t), ("damped_trend", d), ("seasonal", s)))
                for t, d in trends for s in seasonals]

    def _model(self, y, spec):
        from statsmodels.tsa.exponential_smoothing.ets import ETSModel

        kw = dict(spec.kwargs)
        seasonal = kw["seasonal"] is not None
        # estimating m initial seasonal states is slow and ill-posed for long periods (52 weeks): use the
        # heuristic initialisation there (it needs 10 seasons, so only when the data has them)
        init = "heuristic" if seasonal and self.m > 24 and len(y) >= 10 * self.m else "estimated"
        return ETSModel(y, error="add", seasonal_periods=self.m if seasonal else None, initialization_method=init,
                        **kw)

    def _fit(self, y, spec):
        with _quiet():
            return self._model(y, spec).fit(disp=False).params

    def _forecast(self, y, spec, params, horizon):
        with _quiet():
            return np.asarray(self._model(y, spec).smooth(params).forecast(horizon))


class ARIMA(_Statsmodels):
    """(S)ARIMA (statsmodels ARIMA, exact likelihood): non-seasonal orders with a constant or drift; seasonal
    orders of period m when 2 ≤ m ≤ 24; for longer periods (52 weeks) Fourier terms of the period as
    regressors instead (dynamic harmonic regression: a SARIMA with s = 52 is impractically slow)."""

    name = "ARIMA"
    fourier_k = 4

    def candidates(self, y):
        nonseasonal = [((0, 1, 1), "t"), ((1, 1, 1), "t"), ((2, 1, 2), "n"), ((2, 0, 1), "c"), ((3, 0, 0), "c")]
        out = [_Spec(f"ARIMA{o}{'+drift' if t == 't' else '+c' if t == 'c' else ''}", (o, (0, 0, 0, 0), t, 0))
               for o, t in nonseasonal]
        m = self.m
        if 2 <= m <= 24 and len(y) >= 3 * m:
            seasonal = [((0, 1, 1), (0, 1, 1)), ((1, 1, 1), (0, 1, 1)), ((2, 1, 0), (0, 1, 1)),
                        ((1, 0, 1), (0, 1, 1)), ((1, 1, 1), (1, 0, 0))]
            out += [_Spec(f"SARIMA{o}{so}_{m}", (o, (*so, m), "c" if o[1] + so[1] == 0 else "n", 0))
                    for o, so in seasonal]
        elif m > 24 and len(y) >= 2 * m:
            out = [_Spec(f"ARIMA{o}+drift+Fourier(K={self.fourier_k})", (o, (0, 0, 0, 0), "t", self.fourier_k))
                   for o in ((0, 1, 1), (1, 1, 1), (2, 1, 2))]
        return out

    def _fourier(self, start: int, n: int, k: int) -> np.ndarray | None:
        if k == 0:
            return None
        t = np.arange(start, start + n)[:, None] * np.arange(1, k + 1)[None] * 2 * np.pi / self.period  # (n, K)
        return np.concatenate([np.sin(t), np.cos(t)], axis=1)  # (n, 2K)

    def _model(self, y, spec):
        from statsmodels.tsa.arima.model import ARIMA as SMARIMA

        order, seasonal_order, trend, k = spec.kwargs
        return SMARIMA(y, exog=self._fourier(0, len(y), k), order=order, seasonal_order=seasonal_order, trend=trend)

    def _fit(self, y, spec):
        with _quiet():
            return self._model(y, spec).fit()

    def _forecast(self, y, spec, fitted, horizon):
        k = spec.kwargs[3]
        with _quiet():
            res = fitted.apply(y, exog=self._fourier(0, len(y), k), refit=False)  # same parameters, new data
            return np.asarray(res.forecast(horizon, exog=self._fourier(len(y), horizon, k)))
