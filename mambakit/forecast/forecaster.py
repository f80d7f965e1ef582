"""Forecaster: fit a MambaForecastNet on one series' windows, with early stopping, then predict after any history.

    f = Forecaster(ForecastConfig(horizon=12, context=48)).fit(series)      # series: TimeSeries or (T, C) array
    fc = f.predict(series)        # Forecast: the H steps after series' last timestamp (point + quantiles)

    f = Forecaster(cfg).fit(df)   # df: pandas long frame unique_id, ds, y (statsforecast / neuralforecast)
    f.predict(12)                 # frame unique_id, ds, Mamba, Mamba-lo-80, ...: the 12 steps after df
    f.cross_validation(df, h=12, n_windows=4)   # frame unique_id, ds, cutoff, y, Mamba, ... (frames.py)

Training windows (Section "fit" below): every window whose H target steps lie in the first (1 − val_fraction)
of the series trains; every window whose targets lie in the last val_fraction validates (its context may reach
back into the training part: those values are in the past of its targets). The network with the lowest
validation loss is kept. Nothing after the end of the series given to `fit` is ever read, so fitting on a prefix
and predicting after a longer history is a leak-free rolling-origin backtest.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .._io import atomic_write
from ..data.timeseries import TimeSeries, calendar_features
from . import frames
from .config import ForecastConfig
from .metrics import mase_scale, pinball_loss
from .model import MambaForecastNet


@dataclass
class Forecast:
    """The H steps after a history: timestamps (H,), point (H, C) (the median when quantiles are predicted),
    quantiles (H, C, Q) or None, at levels `levels`; members (S, H, C): each ensemble member's point forecast
    (EnsembleForecaster only)."""

    timestamps: np.ndarray
    point: np.ndarray
    names: list[str]
    quantiles: np.ndarray | None = None
    levels: tuple[float, ...] = ()
    members: np.ndarray | None = None


def as_series(data) -> TimeSeries:
    if frames.is_frame(data):
        raise TypeError("a DataFrame here must go through fit(df) / predict(h, df) / cross_validation(df, ...)")
    if isinstance(data, TimeSeries):
        series = data
    else:
        series = TimeSeries.from_array(np.asarray(data, dtype=np.float64))
    if not np.isfinite(series.values).all():
        raise ValueError("the series has missing or non-finite values: fill them first (see "
                         "mambakit.data.timeseries.fill_gaps, or read_csv's max_gap)")
    return series


def read_json(directory, name: str, what: str) -> dict:
    """directory/name parsed, with errors that say which saved object is missing or corrupt."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {name} (not a saved {what})")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON (a corrupt saved {what}): {e}") from None


class Forecaster:
    def __init__(self, config: ForecastConfig):
        if not isinstance(config, ForecastConfig):
            raise TypeError(f"Forecaster needs a ForecastConfig, got {type(config).__name__}")
        self.config = config
        self.net: MambaForecastNet | None = None
        self.names: list[str] = []
        self.history: dict = {}  # training record: steps, best step, losses, time
        # fitted on a DataFrame: the unique_id values (column order) and the series, for predict(h)
        self.frame_ids: list | None = None
        self.frame_history: tuple[TimeSeries, list] | None = None

    # ------------------------------------------------------------------------------------------- inputs
    def _covariates(self, series: TimeSeries) -> np.ndarray:
        if not self.config.calendar:
            return np.zeros((len(series), 0), np.float32)
        return calendar_features(series.timestamps, series.freq)

    @staticmethod
    def _gather(values: torch.Tensor, origins: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """values (T, K), origins (b,) → (b, stop − start, K): rows origin+start .. origin+stop−1."""
        idx = origins[:, None] + torch.arange(start, stop)[None]  # (b, stop − start)
        return values[idx]

    def _split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation origins (index of the first target step) for a series of length n."""
        c = self.config
        n_val = max(c.horizon, int(round(c.val_fraction * n)))
        val_start = n - n_val
        train = np.arange(c.context, val_start - c.horizon + 1)
        val = np.arange(max(val_start, c.context), n - c.horizon + 1)
        if len(train) < 1 or len(val) < 1:
            need = c.context + 2 * c.horizon
            need = max(need, int(math.ceil((c.context + c.horizon) / (1 - c.val_fraction))) + 1)
            raise ValueError(f"a series of {n} steps is too short for context={c.context}, horizon={c.horizon} and "
                             f"val_fraction={c.val_fraction}: it gives {len(train)} training and {len(val)} "
                             f"validation windows (need about {need} steps; shorten the context)")
        return train, val

    # ---------------------------------------------------------------------------------------------- fit
    def fit(self, data, verbose: bool = False, max_gap: int = 0, exog: str = "refuse") -> "Forecaster":
        """Trains on `data`: a TimeSeries, a (T, C) array, or a long DataFrame (unique_id, ds, y: its series
        become the C columns; `max_gap` and `exog` as in mambakit.forecast.frames.from_long)."""
        series = fit_input(self, data, max_gap, exog)
        self.names, self.freq = list(series.names), series.freq
        # fix the season and base for this series (config.season = 0 / base = "auto" depend on it), so that the
        # saved config rebuilds the same network
        m = self.config.season or series.season
        self.config = c = self.config.replace(season=m, base=self.config.resolved_base(m))
        threads = torch.get_num_threads()
        if c.threads:
            torch.set_num_threads(c.threads)
        try:
            self._fit(series, verbose)
        finally:
            torch.set_num_threads(threads)
        return self

    def _fit(self, series: TimeSeries, verbose: bool) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        rng = np.random.default_rng(c.seed)
        values = torch.tensor(series.values, dtype=torch.float32)  # (T, C)
        cov = torch.tensor(self._covariates(series))  # (T, F)
        train, val = self._split(len(series))
        net = MambaForecastNet(c, series.n_channels, cov.shape[1])
        levels = torch.tensor(c.quantiles or (0.5,))

        def loss_on(origins: np.ndarray) -> torch.Tensor:
            o = torch.as_tensor(origins)
            x = self._gather(values, o, -c.context, 0)  # (b, L, C)
            y = self._gather(values, o, 0, c.horizon)  # (b, H, C)
            out, loc, scale = net(x, self._gather(cov, o, -c.context, 0))
            target = (y - loc) / scale  # the loss lives in each window's normalised units
            if c.quantiles:
                return pinball_loss(out, target, levels)
            return (out[..., 0] - target).abs().mean()  # = 2 × pinball at q = 0.5 (the median)

        def evaluate() -> float:
            net.eval()
            with torch.no_grad():
                chunks = np.array_split(val, max(1, len(val) // 512))
                total = sum(loss_on(ch).item() * len(ch) for ch in chunks)
            net.train()
            return total / len(val)

        def run(origins: np.ndarray, steps: int, validate: bool):
            opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
            best, best_step, best_state, bad, record = math.inf, 0, None, 0, []
            t0 = time.perf_counter()
            for step in range(1, steps + 1):
                batch = rng.choice(origins, size=min(c.batch_size, len(origins)), replace=len(origins) < c.batch_size)
                loss = loss_on(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                out_of_time = c.time_budget_s and time.perf_counter() - t0 > c.time_budget_s
                if validate and (step % c.eval_every == 0 or step == steps or out_of_time):
                    v = evaluate()
                    record.append((step, float(loss.item()), v))
                    if v < best - 1e-6:
                        best, best_step, best_state, bad = v, step, copy.deepcopy(net.state_dict()), 0
                    else:
                        bad += 1
                    if verbose:
                        el = time.perf_counter() - t0
                        print(f"  step {step:5d}  train {loss.item():.4f}  val {v:.4f}  best {best:.4f}@{best_step}"
                              f"  {step / el:.1f} steps/s  {el:.0f}s", file=sys.stderr, flush=True)
                    if bad >= c.patience:
                        break
                if out_of_time:
                    break
            return best, best_step, best_state, record, time.perf_counter() - t0

        best, best_step, best_state, record, seconds = run(train, c.max_steps, validate=True)
        if best_state is None:
            raise ValueError(f"training diverged: the validation loss was never finite ({record[-1] if record else ''})"
                             "; lower lr or check the data for extreme values")
        net.load_state_dict(best_state)
        self.history = {"best_val_loss": best, "best_step": best_step, "steps": record[-1][0] if record else 0,
                        "train_windows": int(len(train)), "val_windows": int(len(val)), "seconds": seconds,
                        "val_mase": self._val_mase(net, values, cov, val), "record": record}
        if c.refit:
            # retrain from scratch on every window (validation included) for the number of steps that was best
            torch.manual_seed(c.seed)
            net = MambaForecastNet(c, series.n_channels, cov.shape[1])
            _, _, _, _, s2 = run(np.concatenate([train, val]), best_step, validate=False)
            self.history["refit_seconds"] = s2
        self.net = net.eval()

    @torch.no_grad()
    def _val_mase(self, net: MambaForecastNet, values: torch.Tensor, cov: torch.Tensor, val: np.ndarray) -> float:
        """The point forecasts' MAE on the validation windows in the data's units, per series divided by the
        seasonal-naive in-sample MAE of the part before them (MASE), averaged over series: the criterion ETS and
        ARIMA are chosen by (MAE on the holdout), and the metric the backtests report. The training loss is not
        that: it lives in each window's normalised units (windows with a wide context count less) and includes
        the outer quantiles, so it can rank variants differently."""
        c = self.config
        net.eval()
        err = torch.zeros(values.shape[1], dtype=torch.float64)  # (C,) summed absolute errors
        for ch in np.array_split(val, max(1, len(val) // 512)):
            o = torch.as_tensor(ch)
            out, loc, scale = net(self._gather(values, o, -c.context, 0), self._gather(cov, o, -c.context, 0))
            point = MambaForecastNet.denormalise(out, loc, scale)[..., c.quantiles.index(0.5) if c.quantiles else 0]
            err += (point - self._gather(values, o, 0, c.horizon)).abs().double().sum(dim=(0, 1))  # (b, H, C) → (C,)
        net.train()
        mae = err.numpy() / (len(val) * c.horizon)
        return float(np.mean(mae / mase_scale(values[: int(val[0])].double().numpy(), max(1, c.season))))

    # ------------------------------------------------------------------------------------------ predict
    def predict(self, history=None, df=None, *, h: int | None = None, max_gap: int = 0, exog: str = "refuse"):
        """Two paths:
        - predict(history) → Forecast: the H steps after `history` (a TimeSeries with the columns fitted, or a
          (T, C) array), from its last `context` values;
        - predict(h) or predict(h=h, df=df) → DataFrame (unique_id, ds, Mamba, quantile columns): the first h
          (default H) steps after `df`, a long frame with the series fitted (default: after the frame given to
          fit)."""
        if isinstance(history, (int, np.integer)) and not isinstance(history, bool):
            history, h = None, history  # predict(12): h given positionally
        if history is None:
            return frames.predict_frame(self, h, df, max_gap, exog)
        if h is not None or df is not None:
            raise ValueError("predict takes a history (→ Forecast) or h and df (→ DataFrame), not both")
        return self._predict(as_series(history))

    def cross_validation(self, df, h: int | None = None, n_windows: int = 1, step: int | None = None,
                         max_gap: int = 0, exog: str = "refuse"):
        """Rolling-origin cross-validation on a long frame (mambakit.forecast.frames.cross_validation): fit on
        the part before the first cutoff, forecast h steps after each cutoff → unique_id, ds, cutoff, y, Mamba."""
        return frames.cross_validation(self, df, h, n_windows, step, max_gap, exog)

    @torch.no_grad()
    def _predict(self, series: TimeSeries) -> Forecast:
        if self.net is None:
            raise RuntimeError("Forecaster.predict before fit (or load)")
        c = self.config
        if series.n_channels != self.net.n_channels:
            raise ValueError(f"history has {series.n_channels} columns, the forecaster was fitted on "
                             f"{self.net.n_channels} ({self.names})")
        if len(series) < c.context:
            raise ValueError(f"history of {len(series)} steps is shorter than the context ({c.context})")
        threads = torch.get_num_threads()
        if c.threads:
            torch.set_num_threads(c.threads)
        try:
            x = torch.tensor(series.values[-c.context:], dtype=torch.float32)[None]  # (1, L, C)
            cov = torch.tensor(self._covariates(series)[-c.context:])[None]  # (1, L, F)
            out, loc, scale = self.net(x, cov)
            y = MambaForecastNet.denormalise(out, loc, scale)[0].double().numpy()  # (H, C, Q)
        finally:
            torch.set_num_threads(threads)
        if c.quantiles:
            point = y[..., c.quantiles.index(0.5)]
            return Forecast(series.future_timestamps(c.horizon), point, list(series.names), y, c.quantiles)
        return Forecast(series.future_timestamps(c.horizon), y[..., 0], list(series.names))

    # ------------------------------------------------------------------------------------- save / load
    def save(self, directory: str | os.PathLike) -> None:
        """forecast_config.json (config, column names, sizes) + forecast_model.pt (state dict), written atomically."""
        if self.net is None:
            raise RuntimeError("Forecaster.save before fit")
        os.makedirs(directory, exist_ok=True)
        meta = {"config": self.config.to_dict(), "names": self.names, "n_channels": self.net.n_channels,
                "n_covariates": self.net.n_covariates, "history": {k: v for k, v in self.history.items()
                                                                    if k != "record"}}
        atomic_write(os.path.join(directory, "forecast_config.json"), json.dumps(meta, indent=2))
        atomic_write(os.path.join(directory, "forecast_model.pt"), lambda tmp: torch.save(self.net.state_dict(), tmp))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Forecaster":
        meta = read_json(directory, "forecast_config.json", "Forecaster")
        self = cls(ForecastConfig.from_dict(meta["config"]))
        self.names = meta["names"]
        self.net = MambaForecastNet(self.config, meta["n_channels"], meta["n_covariates"])
        state = torch.load(os.path.join(directory, "forecast_model.pt"), weights_only=True)
        self.net.load_state_dict(state)
        self.net.eval()
        self.history = meta.get("history", {})
        return self


def fit_input(forecaster, data, max_gap: int, exog: str) -> TimeSeries:
    """What fit trains on: data as a TimeSeries; a DataFrame also sets the forecaster's frame_ids and
    frame_history (what predict(h) forecasts after), an array or TimeSeries clears them."""
    if frames.is_frame(data):
        series, ids = frames.from_long(data, max_gap=max_gap, exog=exog)
        forecaster.frame_ids, forecaster.frame_history = ids, (series, ids)
        return series
    forecaster.frame_ids = forecaster.frame_history = None
    return as_series(data)
