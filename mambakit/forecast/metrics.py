"""Forecast accuracy: MAE, RMSE, MASE, sMAPE (point forecasts) and the pinball loss (quantiles).

All take y (H, C) actuals and f (H, C) forecasts (any matching shapes) and average over every element; MASE
and sMAPE are computed per column and then averaged, so series on different scales weigh the same.

MASE (Hyndman & Koehler, 2006) divides the MAE by the in-sample MAE of the seasonal-naive forecast of lag m on
the history the forecast was made from; 1.0 means "as good as seasonal naive one season ahead in sample".
sMAPE is the M4 competition's: 200 · |y − f| / (|y| + |f|), in percent (0 when both are 0).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _2d(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[:, None] if a.ndim == 1 else a


def mae(y, f) -> float:
    return float(np.mean(np.abs(_2d(y) - _2d(f))))


def rmse(y, f) -> float:
    return float(np.sqrt(np.mean((_2d(y) - _2d(f)) ** 2)))


def mase_scale(history, m: int) -> np.ndarray:
    """(C,) in-sample MAE of the seasonal-naive forecast with lag m (lag 1 when the history is too short)."""
    h = _2d(history)
    m = m if len(h) > m else 1
    scale = np.mean(np.abs(h[m:] - h[:-m]), axis=0)
    return np.where(scale > 0, scale, np.finfo(np.float64).eps)


def mase(y, f, history, m: int) -> float:
    return float(np.mean(np.mean(np.abs(_2d(y) - _2d(f)), axis=0) / mase_scale(history, m)))


def smape(y, f) -> float:
    y, f = _2d(y), _2d(f)
    den = np.abs(y) + np.abs(f)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(den > 0, 200.0 * np.abs(y - f) / den, 0.0)
    return float(np.mean(r))


def point_metrics(y, f, history, m: int) -> dict[str, float]:
    return {"MAE": mae(y, f), "RMSE": rmse(y, f), "MASE": mase(y, f, history, m), "sMAPE": smape(y, f)}


def pinball_loss(pred: Tensor, target: Tensor, quantiles: Tensor) -> Tensor:
    """Mean quantile (pinball) loss: pred (..., Q), target (...), quantiles (Q,) in (0, 1).

    For quantile q and error e = y − ŷ the loss is max(q·e, (q − 1)·e): minimised in expectation by the
    q-quantile of y; at q = 0.5 it is half the absolute error."""
    e = target.unsqueeze(-1) - pred  # (..., Q)
    return torch.maximum(quantiles * e, (quantiles - 1) * e).mean()
