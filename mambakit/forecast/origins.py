"""Where a rolling-origin evaluation forecasts from: the backtests (backtest.py) and the DataFrame
cross-validation (frames.py) both take their windows from here."""

from __future__ import annotations

import numpy as np


def rolling_origins(n: int, horizon: int, n_windows: int, step: int | None = None) -> np.ndarray:
    """n_windows ascending origins (index of each window's first forecast step), `step` apart (default H: the
    test windows tile the end of the series without overlapping); the last window ends at the last value."""
    step = horizon if step is None else step
    if horizon < 1 or n_windows < 1 or step < 1:
        raise ValueError(f"horizon, n_windows and step must be >= 1, got {horizon}, {n_windows}, {step}")
    origins = n - horizon - step * np.arange(n_windows)[::-1]
    if origins[0] < 2:
        raise ValueError(f"a series of {n} steps has no room for {n_windows} windows of {horizon} steps")
    return origins
