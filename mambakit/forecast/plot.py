"""Forecast plots (matplotlib, Agg backend, imported lazily; PNGs written atomically)."""

from __future__ import annotations

import os

import numpy as np

from ..data.timeseries import TimeSeries
from .._io import atomic_write

PLOT_INSTALL = "pip install mambakit[plot]  (or: pip install matplotlib)"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"plots need matplotlib: {PLOT_INSTALL}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _x(timestamps: np.ndarray):
    return timestamps.astype("datetime64[s]").astype("O") if timestamps.dtype.kind == "M" else timestamps


def _save(fig, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def plot_forecast(series: TimeSeries, forecast, path: str | os.PathLike, tail: int | None = None) -> None:
    """The last `tail` steps of the history (default 4 horizons), the point forecast and, with quantiles, the
    band between the lowest and highest quantile; one panel per series (at most 6)."""
    plt = _pyplot()
    H = len(forecast.timestamps)
    tail = tail or min(len(series), 4 * H)
    C = min(series.n_channels, 6)
    fig, axes = plt.subplots(C, 1, figsize=(9, 2.6 * C), squeeze=False)
    for j in range(C):
        ax = axes[j, 0]
        ax.plot(_x(series.timestamps[-tail:]), series.values[-tail:, j], color="black", lw=1, label="history")
        ax.plot(_x(forecast.timestamps), forecast.point[:, j], color="tab:red", lw=1.5, label="forecast")
        if forecast.quantiles is not None:
            lv = forecast.levels
            ax.fill_between(_x(forecast.timestamps), forecast.quantiles[:, j, 0], forecast.quantiles[:, j, -1],
                            color="tab:red", alpha=0.2, label=f"{lv[0]:g}–{lv[-1]:g} quantiles")
        ax.set_title(series.names[j], fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_backtest(series: TimeSeries, result, path: str | os.PathLike, title: str = "",
                  methods: list[str] | None = None, column: int = 0) -> None:
    """One series (column) around its backtest windows: the actual values and each method's H-step forecasts
    from every origin (origins marked by dotted lines)."""
    plt = _pyplot()
    methods = methods or list(result.forecasts)
    o0, H = int(result.origins[0]), result.horizon
    start = max(0, o0 - max(3 * H, 2 * result.season))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.plot(_x(series.timestamps[start:]), series.values[start:, column], color="black", lw=1.2, label="actual")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(methods):
        for i, o in enumerate(result.origins):
            ts = series.timestamps[o:o + H]
            ax.plot(_x(ts), result.forecasts[name][i, :, column], color=colors[k % len(colors)], lw=1.3,
                    label=f"{name} (MASE {result.metrics[name]['MASE']:.2f})" if i == 0 else None)
    for o in result.origins:
        ax.axvline(_x(series.timestamps[o:o + 1])[0], color="grey", lw=0.6, ls=":")
    ax.set_title(title or series.names[column], fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
