"""Forecasts written out: a CSV of timestamps, point forecasts and quantiles."""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from .._io import atomic_write


def _fmt_time(t) -> str:
    if isinstance(t, (int, np.integer)):
        return str(int(t))
    t = np.datetime64(t, "s")
    return str(t.astype("datetime64[D]")) if t == t.astype("datetime64[D]") else str(t).replace("T", " ")


def write_forecast_csv(path: str | os.PathLike, forecast) -> None:
    """timestamp, then per series: <name> (point), <name>_q<level> for each quantile. Written atomically."""
    path = os.fspath(path)
    header = ["timestamp"]
    for name in forecast.names:
        header.append(name)
        header += [f"{name}_q{lv:g}" for lv in forecast.levels]
    rows = []
    for i, t in enumerate(forecast.timestamps):
        row = [_fmt_time(t)]
        for j in range(len(forecast.names)):
            row.append(f"{forecast.point[i, j]:.6g}")
            if forecast.quantiles is not None:
                row += [f"{q:.6g}" for q in forecast.quantiles[i, j]]
        rows.append(row)
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    atomic_write(path, text.getvalue())
