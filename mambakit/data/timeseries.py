"""Real-valued time series for forecasting: CSV/Parquet (read by pandas) → regular grid → gaps filled → calendar
features.

    read_csv(path, time_col, value_cols)   a CSV or Parquet file, a timestamp column and value columns → TimeSeries
    from_wide_frame(df, time_col, ...)     the same from a pandas DataFrame (long frames: mambakit.forecast.frames)
    infer_frequency(timestamps)            the regular step (fixed seconds, calendar months, or an index step)
    TimeSeries                             timestamps + values (T, C) + names + frequency; slicing, future dates
    calendar_features(timestamps, freq)    sin/cos phases known in advance (hour, weekday, day/month of year)
    load_statsmodels(name)                 the datasets bundled with statsmodels (co2, elec_equip, sunspots, ...)

Handling of imperfect data (documented in the README; every refusal is a ValueError naming the problem):
- timestamps: ISO 8601 (`2024`, `2024-03`, `2024-03-01`, `2024-03-01 12:00[:00]`, `T` or space; with a time
  zone: converted to UTC), pandas datetimes, or plain integers (a step index; 4 digits a year, 8 digits
  YYYYMMDD). Rows out of order are sorted; duplicates are refused.
- frequency: a fixed step (seconds, minutes, hours, days, weeks), a step of k calendar months (monthly,
  quarterly, yearly dates on the same day of the month, or all on month ends), or an integer step. Timestamps
  on that grid with some steps absent are *missing values* (rows inserted as NaN). Timestamps off the grid are
  *irregular*: refused, unless `resample=True`, which averages the observations in each step-long bin of the
  grid of the most common step (empty bins become missing values).
- missing values (empty cell, NA, NaN, nan, null, none, n/a; a short row is missing its last cells): interior gaps of at most `max_gap` consecutive steps are
  linearly interpolated; longer gaps are refused (name the column, where, how long). Leading missing values
  are trimmed (the series starts at the first row where every column is observed); a missing last value is
  refused, since forecasts start after the last timestamp.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# missing-value spellings read as NaN, besides pandas' own (empty, NA, NaN, nan, null, N/A, #N/A, ...)
_MISSING_EXTRA = ["none", "None", "n/a"]
_SECONDS_PER_DAY = 86400


# ------------------------------------------------------------------------------------------------ frequency
@dataclass(frozen=True)
class Frequency:
    """A regular step: `unit` "s" (a fixed number of seconds), "M" (calendar months) or "index" (integers)."""

    unit: str
    step: int
    month_end: bool = False  # unit "M": the dates are month ends (else they share their day of the month)

    def __post_init__(self):
        if self.unit not in ("s", "M", "index") or self.step < 1:
            raise ValueError(f"bad Frequency({self.unit!r}, {self.step})")

    @property
    def name(self) -> str:
        if self.unit == "index":
            return f"index step {self.step}"
        if self.unit == "M":
            return {1: "monthly", 3: "quarterly", 12: "yearly"}.get(self.step, f"{self.step} months")
        named = {60: "minutely", 3600: "hourly", _SECONDS_PER_DAY: "daily", 7 * _SECONDS_PER_DAY: "weekly"}
        return named.get(self.step, f"{self.step} s")

    @property
    def season(self) -> int:
        """The usual seasonal period in steps (1 = none): 12 for monthly, 4 quarterly, 52 weekly, 7 daily,
        24 hourly. Used as the default seasonal-naive lag and MASE scale."""
        if self.unit == "M":
            return 12 // self.step if 12 % self.step == 0 else 1
        if self.unit == "s":
            for period in (_SECONDS_PER_DAY, 7 * _SECONDS_PER_DAY, 52 * 7 * _SECONDS_PER_DAY):
                if period % self.step == 0 and period // self.step > 1:
                    return period // self.step
        return 1

    def advance(self, t, k: int | np.ndarray):
        """The timestamp(s) k steps after t."""
        k = np.asarray(k, dtype=np.int64)
        if self.unit == "index":
            return np.int64(t) + k * self.step
        if self.unit == "s":
            return t + (k * self.step).astype("timedelta64[s]")
        months = _months(t) + k * self.step
        return _from_months(months, t, self.month_end)


def _months(t) -> np.ndarray:
    """Months since 1970-01 of datetime64 value(s)."""
    return np.asarray(t).astype("datetime64[M]").astype(np.int64)


def _from_months(months: np.ndarray, like, month_end: bool) -> np.ndarray:
    """Datetimes in the given months with the day of month and time of day of `like` (or on month ends, at
    like's time of day)."""
    months = np.asarray(months)
    like = np.datetime64(like, "s")
    if month_end:
        time_of_day = like - like.astype("datetime64[D]").astype("datetime64[s]")
        next_start = (months + 1).astype("datetime64[M]").astype("datetime64[D]")
        return (next_start - np.timedelta64(1, "D")).astype("datetime64[s]") + time_of_day
    offset = like - like.astype("datetime64[M]").astype("datetime64[s]")  # day and time within the month
    return months.astype("datetime64[M]").astype("datetime64[s]") + offset


def _is_month_end(t: np.ndarray) -> np.ndarray:
    return (t.astype("datetime64[D]") + np.timedelta64(1, "D")).astype("datetime64[M]") != t.astype("datetime64[M]")


def infer_frequency(timestamps: np.ndarray) -> tuple[Frequency | None, str]:
    """The regular step of sorted, distinct timestamps (datetime64[s] or int64), and a description of the
    problem when there is none (frequency None). Steps that are multiples of the smallest step (missing
    rows) still count as regular."""
    if len(timestamps) < 2:
        return None, "fewer than 2 timestamps"
    if timestamps.dtype.kind in "iu":
        d = np.diff(timestamps)
        step = int(d.min())
        bad = np.nonzero(d % step)[0]
        if len(bad):
            return None, f"step {d[bad[0]]} between rows {bad[0]} and {bad[0] + 1} is not a multiple of {step}"
        return Frequency("index", step), ""
    # calendar months: same day of month and time of day (or all month ends), whole months apart
    months = _months(timestamps)
    in_month = timestamps - timestamps.astype("datetime64[M]").astype("datetime64[s]")
    month_end = bool(_is_month_end(timestamps).all())
    same_day = bool((in_month == in_month[0]).all())
    dm = np.diff(months)
    day_ok = month_end or (same_day and in_month[0] < np.timedelta64(28, "D"))  # days 29-31 are not in every month
    if day_ok and dm.min() >= 1:
        step = int(dm.min())
        if not np.any(dm % step):
            return Frequency("M", step, month_end and not same_day), ""
    # a fixed number of seconds
    d = np.diff(timestamps).astype(np.int64)
    step = int(d.min())
    bad = np.nonzero(d % step)[0]
    if len(bad):
        i = bad[0]
        return None, (f"the step between {timestamps[i]} and {timestamps[i + 1]} ({_fmt_seconds(d[i])}) is not a "
                      f"multiple of the smallest step ({_fmt_seconds(step)})")
    return Frequency("s", step), ""


def _fmt_seconds(s: int) -> str:
    s = int(s)
    for unit, n in (("d", _SECONDS_PER_DAY), ("h", 3600), ("min", 60)):
        if s % n == 0:
            return f"{s // n} {unit}"
    return f"{s} s"


# ---------------------------------------------------------------------------------------------- the series
@dataclass
class TimeSeries:
    """timestamps (T,) datetime64[s] or int64; values (T, C) float64 (NaN = missing); one name per column."""

    timestamps: np.ndarray
    values: np.ndarray
    names: list[str]
    freq: Frequency
    meta: dict = field(default_factory=dict)  # free-form: source, season override, how gaps were handled

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.ndim == 1:
            self.values = self.values[:, None]
        if self.values.ndim != 2 or len(self.timestamps) != len(self.values):
            raise ValueError(f"TimeSeries: values must be (T, C) with T = len(timestamps) = {len(self.timestamps)}, "
                             f"got {self.values.shape}")
        if len(self.names) != self.values.shape[1]:
            raise ValueError(f"TimeSeries: {len(self.names)} names for {self.values.shape[1]} columns")

    @classmethod
    def from_array(cls, values, names: list[str] | None = None, start: int = 0) -> "TimeSeries":
        """A series indexed 0, 1, 2, ... (no calendar)."""
        values = np.asarray(values, dtype=np.float64)
        values = values[:, None] if values.ndim == 1 else values
        names = names or [f"y{i}" if values.shape[1] > 1 else "y" for i in range(values.shape[1])]
        return cls(np.arange(start, start + len(values), dtype=np.int64), values, list(names), Frequency("index", 1))

    def __len__(self) -> int:
        return len(self.values)

    @property
    def n_channels(self) -> int:
        return self.values.shape[1]

    @property
    def season(self) -> int:
        return int(self.meta.get("season", self.freq.season))

    def slice(self, start: int | None = None, stop: int | None = None) -> "TimeSeries":
        """Rows start:stop, as copies (a forecaster given a prefix cannot write into the rest)."""
        return TimeSeries(self.timestamps[start:stop].copy(), self.values[start:stop].copy(), list(self.names),
                          self.freq, dict(self.meta))

    def select(self, names: list[str]) -> "TimeSeries":
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ValueError(f"no column(s) {missing}; columns: {self.names}")
        idx = [self.names.index(n) for n in names]
        return TimeSeries(self.timestamps.copy(), self.values[:, idx].copy(), list(names), self.freq, dict(self.meta))

    def future_timestamps(self, horizon: int) -> np.ndarray:
        """The `horizon` timestamps after the last one."""
        return self.freq.advance(self.timestamps[-1], np.arange(1, horizon + 1))


# ------------------------------------------------------------------------------------------- CSV and Parquet
PANDAS_INSTALL = "pip install mambakit[pandas]  (or: pip install pandas)"


def require_pandas():
    """pandas, imported lazily (an optional extra): reading CSV/Parquet files and the DataFrame API of
    mambakit.forecast need it, the array path does not."""
    try:
        import pandas
    except ImportError:
        raise ImportError(f"reading tables and the DataFrame API need pandas: {PANDAS_INSTALL}") from None
    return pandas


def read_table(path: str | os.PathLike):
    """A CSV (`.csv`, `.csv.gz`, ...) or Parquet (`.parquet`, `.pq`) file → a pandas DataFrame, every column as
    pandas types it; ValueError naming the file when it is empty or malformed."""
    pd = require_pandas()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if path.lower().endswith((".parquet", ".pq")):
        try:
            return pd.read_parquet(path)
        except ImportError as e:  # pandas reads Parquet through pyarrow (or fastparquet)
            raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow ({e})") from None
        except Exception as e:  # noqa: BLE001 -- pyarrow's errors have no common base we can name
            raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
    try:
        # the header alone first, unmangled: pandas renames a repeated column "a" to "a.1" and would hide it
        header = pd.read_csv(path, header=None, nrows=1, dtype=str, encoding="utf-8-sig").iloc[0].tolist()
        df = pd.read_csv(path, encoding="utf-8-sig", skip_blank_lines=True, na_values=_MISSING_EXTRA)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty (expected a header row, then one row per timestamp)") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: malformed CSV: {e}") from None
    dup = [h for h, n in Counter(str(h).strip() for h in header).items() if n > 1]
    if dup:
        raise ValueError(f"{path}: duplicate column name(s) {dup}")
    df.columns = [str(c).strip() for c in df.columns]
    return df


def read_csv(path: str | os.PathLike, time_col: str | None = None, value_cols: list[str] | None = None,
             max_gap: int = 5, resample: bool = False) -> TimeSeries:
    """A CSV or Parquet file (read by pandas: `read_table`) with one timestamp column (`time_col`, default the
    first column) and numeric value columns (`value_cols`, default every other column) → a regular, gap-free
    TimeSeries (see module doc). For the long format (`unique_id, ds, y`) see mambakit.forecast.frames."""
    df = read_table(path)
    series = from_wide_frame(df, time_col, value_cols, max_gap=max_gap, resample=resample, source=os.fspath(path))
    series.meta["source"] = os.fspath(path)
    return series


def from_wide_frame(df, time_col: str | None = None, value_cols: list[str] | None = None, max_gap: int = 5,
                    resample: bool = False, source: str = "frame") -> TimeSeries:
    """A DataFrame with a timestamp column and numeric value columns (one per series) → TimeSeries."""
    header = [str(c) for c in df.columns]
    if len(df) == 0:
        raise ValueError(f"{source} has a header but no data rows")
    time_col = header[0] if time_col is None else time_col
    if time_col not in header:
        raise ValueError(f"{source}: no timestamp column {time_col!r}; columns: {header}")
    if value_cols is None:
        value_cols = [h for h in header if h != time_col]
        if not value_cols:
            raise ValueError(f"{source}: no value columns besides the timestamp column {time_col!r}")
    missing = [c for c in value_cols if c not in header]
    if missing:
        raise ValueError(f"{source}: no value column(s) {missing}; columns: {header}")
    if time_col in value_cols:
        raise ValueError(f"{source}: {time_col!r} is the timestamp column and cannot also be a value column")
    values = np.stack([numeric_column(df[c], c, source) for c in value_cols], axis=1)  # (T, C)
    ts = timestamp_column(df[time_col], time_col, source)
    return regularize(ts, values, list(value_cols), max_gap=max_gap, resample=resample, source=source)


def _line(i: int) -> str:
    return f"line {i + 2}"  # 1-based, after the header (pandas' row i of a file without blank lines)


def numeric_column(col, name: str, source: str) -> np.ndarray:
    """A pandas column → float64 (T,): missing cells NaN; a cell that is not a number or is infinite is a
    ValueError naming its line and column."""
    pd = require_pandas()
    num = pd.to_numeric(col, errors="coerce")
    bad = np.nonzero((num.isna() & col.notna()).to_numpy())[0]
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{source} {_line(i)}: value {str(col.iloc[i]).strip()!r} in column {name!r} is not a "
                         "number")
    out = num.to_numpy(dtype=np.float64, na_value=np.nan)
    inf = np.nonzero(np.isinf(out))[0]
    if len(inf):
        raise ValueError(f"{source} {_line(int(inf[0]))}: value {col.iloc[int(inf[0])]!r} in column {name!r} is "
                         "infinite")
    return out


def timestamp_column(col, name: str, source: str, where=None) -> np.ndarray:
    """A pandas column of timestamps → datetime64[s] (time-zone-aware ones converted to UTC) or int64 (a step
    index). Integers are a step index, except 4 digits (a year, `1700`) and 8 digits (a date, `20240301`);
    strings are ISO 8601 (`2024`, `2024-03`, `2024-03-01`, `2024-03-01 12:00[:00]`). where(i) names row i in
    errors (default: its line in a CSV file)."""
    pd = require_pandas()
    where = where or _line
    missing = np.nonzero(col.isna().to_numpy())[0]
    if len(missing):
        raise ValueError(f"{source} {where(int(missing[0]))}: empty timestamp in column {name!r}")
    if pd.api.types.is_datetime64_any_dtype(col):
        dt = col
    elif pd.api.types.is_integer_dtype(col):
        v = col.to_numpy(np.int64)
        if (v >= 1000).all() and (v <= 9999).all():  # years
            dt = pd.to_datetime(col.astype(str), format="%Y")
        elif (v >= 10000101).all() and (v <= 99991231).all():  # compact dates, YYYYMMDD
            try:
                dt = pd.to_datetime(col.astype(str), format="%Y%m%d")
            except ValueError:
                return v  # 8-digit integers that are not dates: a step index
        else:
            return v
    else:
        text = col.astype(str).str.strip()
        try:
            dt = pd.to_datetime(text, format="ISO8601")
        except (ValueError, TypeError, OverflowError):
            dt = pd.to_datetime(text, format="ISO8601", errors="coerce")
            i = int(np.nonzero(dt.isna().to_numpy())[0][0]) if dt.isna().any() else 0
            raise ValueError(f"{source} {where(i)}: cannot read timestamp {text.iloc[i]!r} in column {name!r} "
                             "(expected ISO 8601 like 2024-03-01 or 2024-03-01 12:00, or an integer)") from None
    if getattr(dt.dt, "tz", None) is not None:
        dt = dt.dt.tz_convert("UTC").dt.tz_localize(None)
    return dt.to_numpy().astype("datetime64[s]")


def regularize(timestamps: np.ndarray, values: np.ndarray, names: list[str], max_gap: int = 5,
               resample: bool = False, source: str = "series") -> TimeSeries:
    """Sorted, de-duplicated, on a regular grid, gaps filled: the module doc's rules, applied in that order."""
    values = np.asarray(values, dtype=np.float64).reshape(len(timestamps), -1)
    order = np.argsort(timestamps, kind="stable")
    timestamps, values = timestamps[order], values[order]
    dup = np.nonzero(timestamps[1:] == timestamps[:-1])[0]
    if len(dup):
        raise ValueError(f"{source}: duplicate timestamp {timestamps[dup[0]]}")
    freq, why = infer_frequency(timestamps)
    if freq is None:
        if not resample:
            raise ValueError(f"{source}: irregular timestamps: {why}. Pass resample=True (CLI: --resample) to "
                             "average them onto a regular grid of the most common step")
        timestamps, values, freq = _resample(timestamps, values)
    timestamps, values = _to_grid(timestamps, values, freq)
    values, notes = fill_gaps(values, names, max_gap, source=source, timestamps=timestamps)
    start = notes.pop("trimmed", 0)
    return TimeSeries(timestamps[start:], values[start:], names, freq, {"gaps": notes})


def _grid_index(timestamps: np.ndarray, freq: Frequency) -> np.ndarray:
    """Each timestamp's number of steps after the first one (timestamps known to lie on the grid)."""
    if freq.unit == "M":
        return (_months(timestamps) - _months(timestamps[0])) // freq.step
    d = (timestamps - timestamps[0]).astype(np.int64)
    return d // freq.step


def _to_grid(timestamps: np.ndarray, values: np.ndarray, freq: Frequency):
    """Insert NaN rows for grid steps that have no row."""
    k = _grid_index(timestamps, freq)
    if k[-1] + 1 == len(k):
        return timestamps, values
    grid = freq.advance(timestamps[0], np.arange(k[-1] + 1))
    full = np.full((k[-1] + 1, values.shape[1]), np.nan)
    full[k] = values
    return np.asarray(grid), full


def _resample(timestamps: np.ndarray, values: np.ndarray):
    """Mean of the observations in each bin [g_k, g_k+1) of the grid of the most common step."""
    if timestamps.dtype.kind in "iu":
        step = Counter(np.diff(timestamps).tolist()).most_common(1)[0][0]
        freq = Frequency("index", int(step))
    else:
        months = np.diff(_months(timestamps))
        d = np.diff(timestamps).astype(np.int64)
        common = Counter(d.tolist()).most_common(1)[0][0]
        # month-like steps (28..31 days, 89..92, 365/366) bin by calendar months
        for m, (lo, hi) in ((1, (28, 31)), (3, (89, 92)), (12, (365, 366))):
            if lo * _SECONDS_PER_DAY <= common <= hi * _SECONDS_PER_DAY and Counter(months.tolist()).most_common(
                    1)[0][0] == m:
                freq = Frequency("M", m)
                break
        else:
            freq = Frequency("s", int(common))
    if freq.unit == "M":
        start = timestamps[0].astype("datetime64[M]").astype("datetime64[s]")
        k = (_months(timestamps) - _months(start)) // freq.step
    elif freq.unit == "s":
        start = timestamps[0]
        k = (timestamps - start).astype(np.int64) // freq.step
    else:
        start = timestamps[0]
        k = (timestamps - start) // freq.step
    n = int(k[-1]) + 1
    sums = np.zeros((n, values.shape[1]))
    counts = np.zeros((n, values.shape[1]))
    ok = ~np.isnan(values)
    np.add.at(sums, k, np.where(ok, values, 0.0))
    np.add.at(counts, k, ok)
    with np.errstate(invalid="ignore"):
        out = sums / counts  # empty bins → NaN (missing)
    return np.asarray(freq.advance(start, np.arange(n))), out, freq


def fill_gaps(values: np.ndarray, names: list[str], max_gap: int, source: str = "series",
              timestamps: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Linear interpolation of interior runs of ≤ max_gap missing values per column; returns the filled copy
    and notes {column: number of values filled, "trimmed": leading rows to drop}."""
    values = values.copy()
    missing = np.isnan(values)
    notes: dict = {}
    if not missing.any():
        return values, notes
    observed_all = np.nonzero(~missing.any(axis=1))[0]
    if len(observed_all) == 0:
        raise ValueError(f"{source}: no row has every column observed")
    for j, name in enumerate(names):
        col = values[:, j]
        m = np.isnan(col)
        if m[-1]:
            raise ValueError(f"{source}: the last value of column {name!r} is missing (forecasts start after the "
                             "last timestamp; drop the trailing rows or fill them)")
        obs = np.nonzero(~m)[0]
        first = obs[0]
        # runs of missing values after the first observation
        inner = m.copy()
        inner[:first] = False
        edges = np.diff(np.concatenate([[0], inner.astype(np.int8), [0]]))
        starts, stops = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
        for a, b in zip(starts, stops):
            if b - a > max_gap:
                where = f" from {timestamps[a]}" if timestamps is not None else f" at row {a}"
                raise ValueError(f"{source}: column {name!r} has a gap of {b - a} missing steps{where}, more than "
                                 f"max_gap={max_gap} (CLI: --max-gap) allows to interpolate")
        if inner.any():
            col[inner] = np.interp(np.nonzero(inner)[0], obs, col[obs])
            notes[name] = int(inner.sum())
    lead = int(np.nonzero(~np.isnan(values).any(axis=1))[0][0])
    if lead:
        notes["trimmed"] = lead
    return values, notes


# ---------------------------------------------------------------------------------------- calendar features
def calendar_features(timestamps: np.ndarray, freq: Frequency) -> np.ndarray:
    """(T, F) float32 sin/cos phases that are known for future timestamps too: position in the day, week and
    year, as far as the step resolves them (a monthly series gets month of year; a yearly one nothing)."""
    if freq.unit == "index":
        return np.zeros((len(timestamps), 0), np.float32)
    phases = []
    if freq.unit == "M":
        if freq.step < 12:
            phases.append((_months(timestamps) % 12) / 12.0)
    else:
        t = timestamps.astype("datetime64[s]").astype(np.int64)
        if freq.step < _SECONDS_PER_DAY:
            phases.append((t % _SECONDS_PER_DAY) / _SECONDS_PER_DAY)
        if freq.step < 7 * _SECONDS_PER_DAY:
            phases.append(((t // _SECONDS_PER_DAY + 3) % 7) / 7.0)  # 1970-01-01 was a Thursday → Monday = 0
        if freq.step < 365 * _SECONDS_PER_DAY:
            year_start = timestamps.astype("datetime64[Y]").astype("datetime64[s]").astype(np.int64)
            phases.append((t - year_start) / (365.25 * _SECONDS_PER_DAY))
    if not phases:
        return np.zeros((len(timestamps), 0), np.float32)
    p = np.stack(phases, axis=1) * 2 * np.pi  # (T, P)
    return np.concatenate([np.sin(p), np.cos(p)], axis=1).astype(np.float32)  # (T, 2P)


# ------------------------------------------------------------------------------------ statsmodels datasets
STATSMODELS_DATASETS = ("co2", "elec_equip", "sunspots", "macrodata", "elnino", "nile")
MACRO_COLUMNS = ["realgdp", "realcons", "realinv", "cpi", "unemp"]


def load_statsmodels(name: str, max_gap: int = 20) -> TimeSeries:
    """A dataset bundled with statsmodels (no download), as a regular TimeSeries:

    co2         weekly CO2 at Mauna Loa, 1958-2001 (2284 weeks; 59 missing values in 22 gaps of up to 18 weeks,
                interpolated, hence the max_gap default of 20)
    elec_equip  monthly euro-area electrical equipment orders index, 1995-2016 (257 months)
    sunspots    yearly sunspot activity, 1700-2008 (309 years; seasonal period set to the 11-year cycle)
    macrodata   quarterly US macro data, 1959-2009 (203 quarters); columns MACRO_COLUMNS (all positive)
    elnino      monthly sea surface temperature (Nino 1+2), 1950-2010 (61 years × 12 months = 732)
    nile        yearly Nile flow at Aswan, 1871-1970 (100 years)
    """
    try:
        import statsmodels.datasets  # noqa: F401
    except ImportError:
        raise ImportError("the statsmodels datasets need statsmodels: pip install mambakit[forecast]") from None
    import importlib

    if name not in STATSMODELS_DATASETS:
        raise ValueError(f"unknown statsmodels dataset {name!r}; known: {STATSMODELS_DATASETS}")
    mod = importlib.import_module(f"statsmodels.datasets.{name}")
    meta: dict = {"source": f"statsmodels.datasets.{name}"}
    if name == "co2":
        df = mod.load_pandas().data
        ts, vals, names = df.index.values.astype("datetime64[s]"), df["co2"].to_numpy(float), ["co2"]
    elif name == "elec_equip":
        df = mod.load().data
        ts, vals, names = df.index.values.astype("datetime64[s]"), df.iloc[:, 0].to_numpy(float), ["elec_equip"]
    elif name in ("sunspots", "nile"):
        df = mod.load_pandas().data
        years = df.iloc[:, 0].to_numpy().astype(int)
        ts = np.array([f"{y:04d}" for y in years], dtype="datetime64[Y]").astype("datetime64[s]")
        vals, names = df.iloc[:, 1].to_numpy(float), [df.columns[1].lower()]
        if name == "sunspots":
            meta["season"] = 11  # the solar cycle, about 11 years
    elif name == "macrodata":
        df = mod.load_pandas().data
        months = (df["year"].to_numpy(int) - 1970) * 12 + (df["quarter"].to_numpy(int) - 1) * 3
        ts = months.astype("datetime64[M]").astype("datetime64[s]")
        vals, names = df[MACRO_COLUMNS].to_numpy(float), list(MACRO_COLUMNS)
    else:  # elnino: one row per year, one column per month
        df = mod.load_pandas().data
        years = df["YEAR"].to_numpy().astype(int)
        vals = df.iloc[:, 1:13].to_numpy(float).reshape(-1)
        months = ((years[:, None] - 1970) * 12 + np.arange(12)[None]).reshape(-1)
        ts, names = months.astype("datetime64[M]").astype("datetime64[s]"), ["sst"]
    series = regularize(ts, vals, names, max_gap=max_gap, source=name)
    series.meta.update(meta)
    return series
