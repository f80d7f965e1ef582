"""mambakit.data.timeseries: CSV/Parquet reading (pandas), frequency inference, gaps, irregular timestamps, calendar features."""

import numpy as np
import pytest

from mambakit.data.timeseries import (Frequency, TimeSeries, calendar_features, fill_gaps, infer_frequency,
                                      read_csv)


def _write(tmp_path, text, name="data.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------------ parsing
def test_read_monthly_csv(tmp_path):
    p = _write(tmp_path, "date,a,b\n2020-01-01,1,10\n2020-02-01,2,20\n2020-03-01,3,30\n")
    s = read_csv(p)
    assert s.names == ["a", "b"]
    assert s.freq == Frequency("M", 1)
    np.testing.assert_array_equal(s.values, [[1, 10], [2, 20], [3, 30]])
    assert str(s.future_timestamps(2)[1])[:10] == "2020-05-01"
    assert s.season == 12


def test_select_columns_and_time_col(tmp_path):
    p = _write(tmp_path, "x,when,y\n5,2021-01-04,7\n6,2021-01-11,8\n7,2021-01-18,9\n")
    s = read_csv(p, time_col="when", value_cols=["y"])
    assert s.names == ["y"] and s.freq.name == "weekly" and s.season == 52
    np.testing.assert_array_equal(s.values[:, 0], [7, 8, 9])


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("date,a\n", "no data rows"),
    ("date\n2020-01-01\n2020-02-01\n", "no value columns"),
    ("date,a\n2020-01-01,1\n2020-02-01,abc\n", r"line 3: value 'abc' in column 'a' is not a number"),
    ("date,a\nyesterday,1\n2020-02-01,2\n", "cannot read timestamp 'yesterday'"),
    ("date,a\n2020-01-01,1\n2020-01-01,2\n", "duplicate timestamp"),
    ("date,a\n2020-01-01,1\n2020-02-01,2,3\n", "malformed CSV.*Expected 2 fields in line 3, saw 3"),
    ("date,a\n2020-01-01,1\n2020-02-01\n", "last value of column 'a' is missing"),  # a short row: missing cells
    ("date,a\n2020-01-01,1\n2020-02-01,inf\n", "infinite"),
    ("date,a,a\n2020-01-01,1,2\n2020-02-01,2,3\n", "duplicate column"),
    ("date,a\n2020-01-01,1\n2020-02-01,\n", "last value of column 'a' is missing"),
])
def test_csv_errors(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_csv(_write(tmp_path, text))


def test_missing_columns_are_named(tmp_path):
    p = _write(tmp_path, "date,a\n2020-01-01,1\n2020-02-01,2\n")
    with pytest.raises(ValueError, match=r"no value column\(s\) \['b'\]"):
        read_csv(p, value_cols=["b"])
    with pytest.raises(ValueError, match="no timestamp column 'time'"):
        read_csv(p, time_col="time")
    with pytest.raises(FileNotFoundError):
        read_csv(tmp_path / "absent.csv")


# ------------------------------------------------------------------------------------- gaps, irregularity
def test_missing_rows_and_values_are_interpolated(tmp_path):
    # 2020-03 absent (a missing row) and 2020-05 empty (a missing value): one-step gaps, filled linearly
    p = _write(tmp_path, "date,a\n2020-01-01,1\n2020-02-01,2\n2020-04-01,4\n2020-05-01,NA\n2020-06-01,6\n")
    s = read_csv(p, max_gap=1)
    np.testing.assert_allclose(s.values[:, 0], [1, 2, 3, 4, 5, 6])
    assert s.meta["gaps"] == {"a": 2}
    with pytest.raises(ValueError, match="gap of 1 missing steps.*max_gap=0"):
        read_csv(p, max_gap=0)


def test_leading_missing_values_are_trimmed(tmp_path):
    p = _write(tmp_path, "t,a,b\n0,,1\n1,2,2\n2,3,3\n3,4,4\n")
    s = read_csv(p)
    assert len(s) == 3 and s.timestamps[0] == 1


def test_irregular_timestamps_error_unless_resampled(tmp_path):
    text = "time,a\n2020-01-01 00:00,1\n2020-01-01 01:00,2\n2020-01-01 02:30,3\n2020-01-01 03:00,5\n" \
           "2020-01-01 04:10,7\n"
    p = _write(tmp_path, text)
    with pytest.raises(ValueError, match="irregular timestamps.*--resample"):
        read_csv(p)
    s = read_csv(p, resample=True)
    assert s.freq == Frequency("s", 3600)
    # hourly bins: [0h] 1, [1h] 2, [2h] 3 (02:30), [3h] 5, [4h] 7
    np.testing.assert_allclose(s.values[:, 0], [1, 2, 3, 5, 7])


def test_year_and_compact_date_timestamps(tmp_path):
    s = read_csv(_write(tmp_path, "year,a\n1700,5\n1701,11\n1702,16\n"))
    assert s.freq == Frequency("M", 12) and str(s.future_timestamps(1)[0])[:4] == "1703"
    s = read_csv(_write(tmp_path, "d,a\n20240301,1\n20240302,2\n20240303,3\n", "c.csv"))
    assert s.freq == Frequency("s", 86400) and s.season == 7


def test_unsorted_rows_are_sorted(tmp_path):
    s = read_csv(_write(tmp_path, "t,a\n3,30\n1,10\n2,20\n"))
    np.testing.assert_array_equal(s.values[:, 0], [10, 20, 30])


def test_fill_gaps_long_gap_names_column():
    v = np.array([[1.0], [np.nan], [np.nan], [np.nan], [5.0]])
    with pytest.raises(ValueError, match="'x' has a gap of 3"):
        fill_gaps(v, ["x"], max_gap=2)
    out, notes = fill_gaps(v, ["x"], max_gap=3)
    np.testing.assert_allclose(out[:, 0], [1, 2, 3, 4, 5])


# ----------------------------------------------------------------------------------------------- frequency
@pytest.mark.parametrize("stamps, freq", [
    (["2001", "2002", "2004"], Frequency("M", 12)),  # yearly, one year missing
    (["2001-01-01", "2001-04-01", "2001-07-01"], Frequency("M", 3)),
    (["2001-01-31", "2001-02-28", "2001-03-31", "2001-04-30"], Frequency("M", 1, month_end=True)),
    (["2001-01-01T00:00", "2001-01-01T00:15", "2001-01-01T00:45"], Frequency("s", 900)),
    (["2001-01-01", "2001-01-02", "2001-01-05"], Frequency("s", 86400)),
])
def test_infer_frequency(stamps, freq):
    got, why = infer_frequency(np.array(stamps, dtype="datetime64[s]"))
    assert got == freq, why


def test_month_end_future_and_integer_index():
    f = Frequency("M", 1, month_end=True)
    out = f.advance(np.datetime64("2001-01-31", "s"), np.arange(1, 4))
    assert [str(t)[:10] for t in out] == ["2001-02-28", "2001-03-31", "2001-04-30"]
    got, _ = infer_frequency(np.array([10, 12, 16], dtype=np.int64))
    assert got == Frequency("index", 2)
    bad, why = infer_frequency(np.array([10, 12, 15], dtype=np.int64))
    assert bad is None and "not a multiple" in why


def test_calendar_features():
    monthly = np.array(["2020-01-01", "2020-07-01"], dtype="datetime64[s]")
    f = calendar_features(monthly, Frequency("M", 1))
    assert f.shape == (2, 2)
    np.testing.assert_allclose(f[:, 1], [1.0, -1.0], atol=1e-6)  # cos of month phase: January vs July
    hourly = np.arange(np.datetime64("2020-01-01T00", "s"), np.datetime64("2020-01-02T00", "s"), 3600)
    assert calendar_features(hourly, Frequency("s", 3600)).shape == (24, 6)  # hour, weekday, day of year
    assert calendar_features(np.arange(5), Frequency("index", 1)).shape == (5, 0)


def test_timeseries_slice_is_a_copy():
    s = TimeSeries.from_array(np.arange(10.0))
    p = s.slice(0, 5)
    p.values[:] = -1
    assert s.values[0, 0] == 0 and len(p) == 5


# ------------------------------------------------------------------------------------------ pandas formats
def test_parquet_and_time_zones(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    df = pd.DataFrame({"when": pd.date_range("2024-03-01", periods=4, freq="D"), "a": [1.0, 2.0, 3.0, 4.0]})
    df.to_parquet(tmp_path / "d.parquet", index=False)
    s = read_csv(tmp_path / "d.parquet")
    assert s.freq == Frequency("s", 86400) and s.names == ["a"]
    np.testing.assert_array_equal(s.values[:, 0], [1, 2, 3, 4])
    # offsets are converted to UTC: 01:00+01:00 is 00:00 UTC
    s = read_csv(_write(tmp_path, "t,a\n2024-03-01T01:00+01:00,1\n2024-03-01T02:00+01:00,2\n"))
    assert str(s.timestamps[0]) == "2024-03-01T00:00:00" and s.freq == Frequency("s", 3600)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_csv(tmp_path / "bad.parquet")
