"""EnsembleForecaster: choose the model variant on the validation split, then forecast with the median of seeds.

    f = EnsembleForecaster(ForecastConfig(horizon=12, context=48), variants=STANDARD_VARIANTS, seeds=5).fit(series)
    fc = f.predict(series)     # Forecast; fc.members (S, H, C): each seed's point forecast

Two things a single Forecaster leaves to chance, done the way the classical baselines do them:

1. Which structure fits this series. ETS and ARIMA choose their specification (trend, season, orders) by MAE
   on a holdout at the end of the training data (mambakit.forecast.baselines); here the candidates are
   variants of the config (by default: which base forecast the network corrects, and whether the linear skip
   is on; see STANDARD_VARIANTS and model.py), one network per variant is trained (seed `config.seed`, early
   stopping on the last `val_fraction` of the series), and the variant whose point forecasts have the lowest
   MAE on that holdout wins (per series divided by its in-sample seasonal-naive MAE, i.e. a validation MASE,
   so that series in large units do not decide alone: Forecaster._val_mase). The choice reads no data after
   the training part, and all variants are scored on the same windows (a variant may not change the context,
   which would change the windows). Not the early-stopping loss: that one is in each window's normalised units
   and includes the outer quantiles, and on elec_equip it preferred variants whose point forecasts had a
   clearly larger validation MAE.
2. Seed noise. With a few hundred training windows two seeds of one config can differ by 10-20% in error.
   The point forecast is the median over `seeds` networks of the chosen variant (the selection's network is
   the first of them); the quantiles are the members' mean quantiles (averaging quantile functions keeps them
   ordered).

The candidates' own forecasts stay available (`predict_variants`), so a backtest can show what each variant
would have scored on the test windows next to the one validation chose.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from .config import ForecastConfig
from .._io import atomic_write
from . import frames
from .forecaster import Forecast, Forecaster, fit_input, read_json

# the structural choices validation makes per series: base forecast × linear skip (seasonal variants are
# dropped for a series whose season does not fit the context; duplicates after resolving are dropped)
STANDARD_VARIANTS: tuple[dict, ...] = tuple({"base": b, "linear_skip": s} for b in ("seasonal", "last", "none")
                                            for s in (True, False))
# for several series: also whether the encoder reads them jointly or one at a time (same for one series)
MULTI_VARIANTS: tuple[dict, ...] = tuple({**v, "channel_independent": ci} for ci in (False, True)
                                         for v in STANDARD_VARIANTS)


def variant_label(variant: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(variant.items())) or "config"


class EnsembleForecaster:
    def __init__(self, config: ForecastConfig, variants=None, seeds: int | tuple[int, ...] = 1,
                 verbose: bool = False):
        if not isinstance(config, ForecastConfig):
            raise TypeError(f"EnsembleForecaster needs a ForecastConfig, got {type(config).__name__}")
        self.config = config
        self.variants = [dict(v) for v in (variants or [{}])]
        for v in self.variants:
            if {"context", "horizon", "quantiles", "seed", "val_fraction"} & set(v):
                raise ValueError(f"a variant may not change context, horizon, quantiles, seed or val_fraction (the "
                                 f"validation losses would not compare), got {v}")
            config.replace(**v)  # validates the field names and values now
        if isinstance(seeds, int):
            if seeds < 1:
                raise ValueError(f"seeds must be >= 1, got {seeds}")
            seeds = tuple(config.seed + i for i in range(seeds))
        self.seeds = tuple(int(s) for s in seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
        self.verbose = verbose
        self.candidates: dict[str, Forecaster] = {}  # variant label → its network (seed self.seeds[0])
        self.members: list[Forecaster] = []  # the chosen variant, one per seed
        self.chosen: str = ""
        self.history: dict = {}
        self.frame_ids: list | None = None  # fitted on a DataFrame: as Forecaster
        self.frame_history = None

    def _log(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def fit(self, data, verbose: bool | None = None, max_gap: int = 0, exog: str = "refuse") -> "EnsembleForecaster":
        """Trains on a TimeSeries, a (T, C) array or a long DataFrame, as Forecaster.fit."""
        if verbose is not None:
            self.verbose = verbose
        series = fit_input(self, data, max_gap, exog)
        season = self.config.season or series.season
        first = self.seeds[0]
        self.candidates, configs = {}, {}
        for v in self.variants:
            try:
                cfg = self.config.replace(**v, seed=first)
                cfg = cfg.replace(season=season, base=cfg.resolved_base(season))
                if series.n_channels == 1:  # one series: reading it jointly or alone is the same network
                    cfg = cfg.replace(channel_independent=False)
            except ValueError:  # base="seasonal" on a series without a season that fits the context
                continue
            label = variant_label(v)
            if any(c == cfg for c in configs.values()):
                continue  # same network as an earlier variant (e.g. "auto" resolved to "last")
            configs[label] = cfg
        if not configs:
            raise ValueError(f"no variant applies to this series (season {season}, context {self.config.context}): "
                             f"{self.variants}")
        for label, cfg in configs.items():
            self.candidates[label] = Forecaster(cfg).fit(series, verbose=False)
            h = self.candidates[label].history
            self._log(f"  variant {label}: validation MASE {h['val_mase']:.4f} (loss {h['best_val_loss']:.4f} at "
                      f"step {h['best_step']})")
        val = {k: f.history["val_mase"] for k, f in self.candidates.items()}
        self.chosen = min(val, key=val.get)
        best = self.candidates[self.chosen]
        self.members = [best]
        for s in self.seeds[1:]:
            self.members.append(Forecaster(best.config.replace(seed=s)).fit(series, verbose=False))
            self._log(f"  {self.chosen} seed {s}: best step {self.members[-1].history['best_step']}")
        self.config = best.config.replace(seed=first)
        self.names = list(series.names)
        self.history = {"chosen": self.chosen, "validation_mase": val,
                        "validation_loss": {k: f.history["best_val_loss"] for k, f in self.candidates.items()},
                        "members": [{k: v for k, v in m.history.items() if k != "record"} for m in self.members]}
        return self

    def predict(self, history=None, df=None, *, h: int | None = None, max_gap: int = 0, exog: str = "refuse"):
        """predict(history) → Forecast; predict(h, df) → DataFrame: the two paths of Forecaster.predict."""
        if isinstance(history, (int, np.integer)) and not isinstance(history, bool):
            history, h = None, history  # predict(12): h given positionally
        if history is None:
            return frames.predict_frame(self, h, df, max_gap, exog)
        if h is not None or df is not None:
            raise ValueError("predict takes a history (→ Forecast) or h and df (→ DataFrame), not both")
        if not self.members:
            raise RuntimeError("EnsembleForecaster.predict before fit (or load)")
        fcs = [m.predict(history) for m in self.members]
        points = np.stack([f.point for f in fcs])  # (S, H, C)
        quantiles = np.mean([f.quantiles for f in fcs], axis=0) if fcs[0].quantiles is not None else None  # (H, C, Q)
        return Forecast(fcs[0].timestamps, np.median(points, axis=0), fcs[0].names, quantiles, fcs[0].levels,
                        members=points)

    def cross_validation(self, df, h: int | None = None, n_windows: int = 1, step: int | None = None,
                         max_gap: int = 0, exog: str = "refuse"):
        """As Forecaster.cross_validation (mambakit.forecast.frames.cross_validation)."""
        return frames.cross_validation(self, df, h, n_windows, step, max_gap, exog)

    def predict_variants(self, history) -> dict[str, np.ndarray]:
        """{variant label: its (seed-0) network's point forecast (H, C)}: what each candidate would forecast."""
        return {k: f.predict(history).point for k, f in self.candidates.items()}

    # ------------------------------------------------------------------------------------- save / load
    def save(self, directory: str | os.PathLike) -> None:
        """ensemble.json (the choice, the validation losses) + one Forecaster directory per member."""
        if not self.members:
            raise RuntimeError("EnsembleForecaster.save before fit")
        os.makedirs(directory, exist_ok=True)
        for i, m in enumerate(self.members):
            m.save(os.path.join(directory, f"member{i}"))
        meta = {"chosen": self.chosen, "seeds": list(self.seeds), "n_members": len(self.members),
                **{k: self.history[k] for k in ("validation_mase", "validation_loss")}}
        atomic_write(os.path.join(directory, "ensemble.json"), json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "EnsembleForecaster":
        meta = read_json(directory, "ensemble.json", "EnsembleForecaster")
        members = [Forecaster.load(os.path.join(directory, f"member{i}")) for i in range(meta["n_members"])]
        self = cls(members[0].config, seeds=tuple(meta["seeds"]))
        self.members, self.chosen, self.names = members, meta["chosen"], members[0].names
        self.history = {"chosen": self.chosen, "validation_mase": meta["validation_mase"],
                        "validation_loss": meta["validation_loss"], "members": [m.history for m in members]}
        return self
