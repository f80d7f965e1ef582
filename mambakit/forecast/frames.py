"""The long DataFrame format of statsforecast / neuralforecast, in and out of the forecasters (pandas, lazily).

    df: one row per series and timestamp    unique_id | ds | y
    Forecaster(cfg).fit(df).predict(h)      →  unique_id | ds | Mamba [| Mamba-lo-80 | Mamba-hi-80 ...]
    Forecaster(cfg).cross_validation(df, h, n_windows, step)
                                            →  unique_id | ds | cutoff | y | Mamba [| quantile columns]

How a frame maps onto the array path: the frame's series become the columns (channels) of one TimeSeries,
in the order their `unique_id` first appears, on their common timestamps; the network reads them jointly (or
one at a time with shared weights, `channel_independent=True`), exactly as it reads the columns of a (T, C)
array. So fitting on a frame and on the equivalent array gives the same network and the same forecasts
(tests/test_forecast_pandas.py). `ds` is datetimes (any regular frequency `infer_frequency` knows: fixed steps,
calendar months, quarters, years) or integers (a step index); the future `ds` of a forecast continue that
frequency from the last timestamp. The seasonal period is the frequency's usual one (TimeSeries.season);
another one goes in ForecastConfig.season (and backtest's `season`).

Refused with a ValueError that says what to do (never guessed):
- series with different timestamps (different starts, ends or frequencies): one joint network needs one
  timeline. Fit one forecaster per series (`df.groupby("unique_id")`), or cut them to a common span.
- missing rows or values (`y` NaN) inside a series: `max_gap` (default 0) interpolates runs up to that length
  (mambakit.data.timeseries.fill_gaps); a longer gap names the series and where.
- columns besides unique_id, ds, y (exogenous variables): the network reads only the series' own past and the
  calendar phases of `ds` (ForecastConfig.calendar). Past-only, future-known and static exogenous inputs are
  not supported; drop the columns, or pass `exog="drop"` to ignore them knowingly.
- duplicate (unique_id, ds) rows, time-zone mixtures, a `y` that is not numeric.

Quantile columns follow neuralforecast: a pair of levels q and 1 − q is the central interval of
100 · (1 − 2q) %, named `<model>-lo-<level>` and `<model>-hi-<level>` (0.1 and 0.9 → Mamba-lo-80,
Mamba-hi-80); an unpaired level q is `<model>-q<q>`. The point column `<model>` is the median when quantiles
are predicted.
"""

from __future__ import annotations

import numpy as np

from ..data.timeseries import TimeSeries, regularize, require_pandas, timestamp_column
from .origins import rolling_origins

ID, DS, Y = "unique_id", "ds", "y"
MODEL = "Mamba"


def is_frame(data) -> bool:
    """True for a pandas DataFrame (without importing pandas when the caller never did)."""
    import sys

    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(data, pd.DataFrame)


# ------------------------------------------------------------------------------------------------- frames in
def from_long(df, max_gap: int = 0, exog: str = "refuse", source: str = "df") -> tuple[TimeSeries, list]:
    """A long frame (unique_id, ds, y) → (TimeSeries with one column per series, the unique_id values in column
    order). See the module doc for what is refused."""
    pd = require_pandas()
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{source} must be a pandas DataFrame in the long format ({ID}, {DS}, {Y}), got "
                        f"{type(df).__name__}")
    missing = [c for c in (ID, DS, Y) if c not in df.columns]
    if missing:
        raise ValueError(f"{source} has no column(s) {missing}: the long format is one row per series and "
                         f"timestamp with columns {ID!r}, {DS!r}, {Y!r} (rename yours); columns: {list(df.columns)}")
    extra = [c for c in df.columns if c not in (ID, DS, Y)]
    if extra and exog != "drop":
        if exog != "refuse":
            raise ValueError(f"exog must be 'refuse' or 'drop', got {exog!r}")
        raise ValueError(f"{source} has exogenous column(s) {extra}: the Mamba forecaster reads only each series' "
                         f"own past and the calendar phases of {DS!r}; exogenous inputs (past-only, future-known "
                         "or static) are not supported. Drop them, or pass exog='drop' to ignore them")
    if len(df) == 0:
        raise ValueError(f"{source} has no rows")
    if df[ID].isna().any():
        raise ValueError(f"{source}: {ID!r} has missing values")
    ids = list(pd.unique(df[ID]))  # order of first appearance: the channel order
    y = pd.to_numeric(df[Y], errors="coerce")
    bad = np.nonzero((y.isna() & df[Y].notna()).to_numpy())[0]
    if len(bad):
        raise ValueError(f"{source}: {Y!r} value {df[Y].iloc[int(bad[0])]!r} (row {int(bad[0])}) is not a number")
    y = y.to_numpy(np.float64, na_value=np.nan)
    if np.isinf(y).any():
        raise ValueError(f"{source}: {Y!r} has infinite values")
    ts = timestamp_column(df[DS].reset_index(drop=True), DS, source, where=lambda i: f"row {i}")
    stamps, values = None, []
    codes = pd.Categorical(df[ID], categories=ids).codes  # (rows,) index of each row's series
    for k, uid in enumerate(ids):
        rows = np.nonzero(codes == k)[0]
        order = np.argsort(ts[rows], kind="stable")
        t, v = ts[rows][order], y[rows][order]
        dup = np.nonzero(t[1:] == t[:-1])[0]
        if len(dup):
            raise ValueError(f"{source}: series {uid!r} has two rows for {DS} = {t[dup[0]]}")
        if stamps is None:
            stamps = t
        elif len(t) != len(stamps) or (t != stamps).any():
            raise ValueError(
                f"{source}: series {uid!r} has other timestamps ({len(t)} rows, {t[0]} .. {t[-1]}) than "
                f"{ids[0]!r} ({len(stamps)} rows, {stamps[0]} .. {stamps[-1]}): the series of a frame are the "
                "columns of one multivariate series and need the same timestamps. Fit one forecaster per series "
                "(df.groupby('unique_id')) or cut them to a common span")
        values.append(v)
    series = regularize(stamps, np.stack(values, axis=1), [str(u) for u in ids], max_gap=max_gap, source=source)
    if len(set(series.names)) != len(ids):
        raise ValueError(f"{source}: unique_id values {ids} are not distinct as strings")
    return series, ids


def to_long(series: TimeSeries, ids: list | None = None):
    """TimeSeries → long frame (unique_id, ds, y): series by series, in column order."""
    pd = require_pandas()
    ids = list(series.names) if ids is None else list(ids)
    T, C = series.values.shape
    return pd.DataFrame({ID: np.repeat(np.array(ids, dtype=object), T), DS: np.tile(_ds(series.timestamps), C),
                         Y: series.values.T.reshape(-1)})  # (C, T) → series after series


def _ds(timestamps: np.ndarray):
    """Timestamps as pandas stores them: datetime64 → pandas datetimes; a step index stays int64."""
    if timestamps.dtype.kind == "M":
        return require_pandas().to_datetime(timestamps.astype("datetime64[s]"))
    return timestamps.astype(np.int64)


# ------------------------------------------------------------------------------------------------ frames out
def quantile_names(levels, model: str = MODEL) -> list[str]:
    """Column names of the quantile levels (module doc): (0.1, 0.5, 0.9) → [Mamba-lo-80, Mamba, Mamba-hi-80]."""
    levels = [float(q) for q in levels]
    names = []
    for q in levels:
        if q == 0.5:
            names.append(model)
        elif any(abs(q + p - 1) < 1e-9 for p in levels):
            level = f"{round(100 * abs(1 - 2 * q), 6):g}"
            names.append(f"{model}-{'lo' if q < 0.5 else 'hi'}-{level}")
        else:
            names.append(f"{model}-q{q:g}")
    return names


def forecast_frame(fc, ids: list, h: int | None = None, model: str = MODEL):
    """A Forecast (point (H, C), quantiles (H, C, Q)) → long frame unique_id, ds, model [, quantile columns],
    the first h steps (default all H)."""
    pd = require_pandas()
    H, C = fc.point.shape
    h = H if h is None else h
    cols = {ID: np.repeat(np.array(ids, dtype=object), h), DS: np.tile(_ds(np.asarray(fc.timestamps)[:h]), C),
            model: fc.point[:h].T.reshape(-1)}  # (C, h) → series after series
    if fc.quantiles is not None:
        for k, name in enumerate(quantile_names(fc.levels, model)):
            if name != model:  # the median is the point column
                cols[name] = fc.quantiles[:h, :, k].T.reshape(-1)
    return pd.DataFrame(cols)


def check_h(h, horizon: int) -> int:
    """h steps of a direct H-step head: 1 <= h <= H (the first h of its H outputs)."""
    if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 1 <= h <= horizon:
        raise ValueError(f"h must be an int in [1, {horizon}] (the forecaster predicts horizon={horizon} steps at "
                         f"once; refit with a longer horizon for more), got {h!r}")
    return int(h)


# --------------------------------------------------------------------- the forecasters' DataFrame entry points
def predict_frame(forecaster, h, df, max_gap: int = 0, exog: str = "refuse"):
    """forecaster.predict(h, df): the h steps after `df` (default: after the frame given to fit) as a frame."""
    h = check_h(forecaster.config.horizon if h is None else h, forecaster.config.horizon)
    if df is None:
        if getattr(forecaster, "frame_history", None) is None:
            raise ValueError("predict(h) forecasts after the frame given to fit; this forecaster was fitted on an "
                             "array or loaded from disk: pass the history, predict(h, df=...)")
        series, ids = forecaster.frame_history
    else:
        series, ids = from_long(df, max_gap=max_gap, exog=exog)
    fitted = getattr(forecaster, "frame_ids", None) or list(forecaster.names)
    if sorted(str(u) for u in ids) != sorted(str(u) for u in fitted):
        raise ValueError(f"df has the series {ids}, the forecaster was fitted on {fitted}")
    series = series.select([str(u) for u in fitted])  # the fitted column order, whatever the rows' order
    return forecast_frame(forecaster.predict(series), fitted, h)


def cross_validation(forecaster, df, h=None, n_windows: int = 1, step: int | None = None, max_gap: int = 0,
                     exog: str = "refuse"):
    """Rolling-origin cross-validation on a frame, as statsforecast's: fit once on the part before the first
    cutoff, then forecast h steps after each of n_windows cutoffs `step` apart (default h) with the history up
    to it, the last window ending at the last timestamp. Returns unique_id, ds, cutoff (the last timestamp
    before the window), y (the actual value), Mamba and its quantile columns. The same origins, fitting and
    forecasts as mambakit.forecast.backtest (leak-free by the same construction); the forecaster is left
    fitted on the part before the first cutoff."""
    pd = require_pandas()
    h = check_h(forecaster.config.horizon if h is None else h, forecaster.config.horizon)
    series, ids = from_long(df, max_gap=max_gap, exog=exog)
    origins = rolling_origins(len(series), h, n_windows, step)
    forecaster.fit(series.slice(0, int(origins[0])))
    forecaster.frame_ids = ids
    forecaster.frame_history = (series.slice(0, int(origins[0])), ids)
    parts = []
    for o in origins:
        part = forecast_frame(forecaster.predict(series.slice(0, int(o))), ids, h)
        part.insert(2, "cutoff", np.repeat(_ds(series.timestamps[o - 1:o]), len(part)))
        part.insert(3, Y, series.values[o:o + h].T.reshape(-1))  # (C, h) actuals, series after series
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def backtest_frame(result, ids: list):
    """A BacktestResult → the cross_validation frame: unique_id, ds, cutoff, y, one column per method (point
    forecasts), plus the quantile columns of methods that predicted quantiles."""
    pd = require_pandas()
    W, H, C = result.actuals.shape
    parts = []
    for i in range(W):
        cols = {ID: np.repeat(np.array(ids, dtype=object), H), DS: np.tile(_ds(result.ds[i]), C),
                "cutoff": np.repeat(_ds(result.cutoffs[i:i + 1]), H * C), Y: result.actuals[i].T.reshape(-1)}
        for name, f in result.forecasts.items():
            cols[name] = f[i].T.reshape(-1)  # (C, H) → series after series
            if name in result.quantiles:
                q, levels = result.quantiles[name]
                for k, qname in enumerate(quantile_names(levels, name)):
                    if qname != name:
                        cols[qname] = q[i, :, :, k].T.reshape(-1)
        parts.append(pd.DataFrame(cols))
    return pd.concat(parts, ignore_index=True)
