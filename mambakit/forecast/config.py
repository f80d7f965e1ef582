"""ForecastConfig: the Mamba forecaster's sizes and training settings in one typed, validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


BASES = ("none", "last", "seasonal", "auto")


@dataclass
class ForecastConfig:
    # ---- the task
    horizon: int  # H: steps predicted at once (direct multi-horizon head)
    context: int  # L: past steps the encoder reads
    quantiles: tuple[float, ...] = ()  # e.g. (0.1, 0.5, 0.9): must contain 0.5 (the point forecast); () = point only
    calendar: bool = True  # add sin/cos calendar phases of the timestamps as covariates
    # ---- the encoder (small: the series are short and CPU time is scarce)
    d_model: int = 32
    n_layer: int = 2
    d_state: int = 16
    expand: int = 2
    channel_independent: bool = False  # one encoder pass per series (shared weights) instead of all series at once
    linear_skip: bool = True  # add a linear map context → horizon next to the Mamba branch (see model.py)
    # the forecast the network corrects (see model.py): "none" (the context mean), "last" (the last value),
    # "seasonal" (seasonal naive: the value one season earlier), "auto" (seasonal when 1 < season <= context,
    # else last)
    base: str = "auto"
    season: int = 0  # seasonal period in steps for base="seasonal"; 0 = the series' usual one (TimeSeries.season)
    # ---- training: windows of the training part, early stopping on its last val_fraction
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_steps: int = 3000
    eval_every: int = 25
    patience: int = 10  # evaluations without a better validation loss before stopping
    val_fraction: float = 0.2
    refit: bool = False  # after early stopping, retrain on all windows (validation part too) for the best #steps
    time_budget_s: float = 0.0  # stop training after this many seconds (0 = no limit)
    seed: int = 0
    threads: int = 0  # torch threads while fitting / predicting (0 = leave torch's setting)

    def __post_init__(self) -> None:
        for name, lo in (("horizon", 1), ("context", 2), ("d_model", 1), ("n_layer", 1), ("d_state", 1),
                         ("expand", 1), ("batch_size", 1), ("max_steps", 1), ("eval_every", 1), ("patience", 1),
                         ("seed", 0), ("threads", 0), ("season", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"ForecastConfig.{name} must be an int, got {v!r}")
            if v < lo:
                raise ValueError(f"ForecastConfig.{name} must be >= {lo}, got {v}")
        for name in ("lr", "weight_decay", "val_fraction", "time_budget_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"ForecastConfig.{name} must be a finite number >= 0, got {v!r}")
            setattr(self, name, float(v))
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"ForecastConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        q = tuple(float(x) for x in self.quantiles)
        if q:
            if any(not 0 < x < 1 for x in q) or list(q) != sorted(set(q)):
                raise ValueError(f"ForecastConfig.quantiles must be increasing, distinct, in (0, 1), got {q}")
            if 0.5 not in q:
                raise ValueError(f"ForecastConfig.quantiles must contain 0.5 (the point forecast), got {q}")
        self.quantiles = q
        for name in ("calendar", "refit", "linear_skip", "channel_independent"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ForecastConfig.{name} must be a bool")
        if self.base not in BASES:
            raise ValueError(f"ForecastConfig.base must be one of {BASES}, got {self.base!r}")
        if self.base == "seasonal" and self.season:
            _check_season(self.base, self.season, self.context)

    def resolved_base(self, season: int) -> str:
        """The base actually used for a series whose seasonal period is `season` (self.season when set)."""
        m = self.season or season
        if self.base == "auto":
            return "seasonal" if 1 < m <= self.context else "last"
        if self.base == "seasonal":
            _check_season(self.base, m, self.context)
        return self.base


    @property
    def n_outputs(self) -> int:
        """Q: values predicted per step and channel (1 without quantiles)."""
        return max(1, len(self.quantiles))

    def replace(self, **changes: Any) -> "ForecastConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["quantiles"] = list(self.quantiles)
        return d

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ForecastConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ForecastConfig field(s) {unknown}; fields: {sorted(known)}")
        values = dict(values)
        if "quantiles" in values:
            values["quantiles"] = tuple(values["quantiles"])
        return cls(**values)


def _check_season(base: str, m: int, context: int) -> None:
    """base="seasonal" copies the last season of the context: it needs 2 <= season <= context."""
    if m < 2 or m > context:
        raise ValueError(f"base={base!r} needs a seasonal period between 2 and the context ({context}), got {m} "
                         "(set season=..., a longer context, or base='last')")


def default_context(n: int, horizon: int, season: int, val_fraction: float = 0.2) -> int:
    """Three seasons (or four horizons without a season), at least two horizons, shortened so that a series of
    n steps still leaves training and validation windows."""
    want = max(2 * horizon, 3 * season if season > 1 else 4 * horizon)
    room = int(n * (1 - val_fraction)) - 2 * horizon  # leave ≥ H training windows before the validation part
    return max(2, min(want, room))


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings (the CLI's --set) → ForecastConfig field values, each converted to its field's type;
    ValueError naming an unknown field or a value of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(ForecastConfig)}
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields or key in ("horizon", "context", "quantiles"):
            known = sorted(set(fields) - {"horizon", "context", "quantiles"})
            raise ValueError(f"--set: unknown ForecastConfig field {key!r} (horizon, context and quantiles have "
                             f"their own options); fields: {known}")
        default = fields[key].default
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = type(default)(value)
        except ValueError:
            raise ValueError(f"--set {key}: {value!r} is not a {type(default).__name__}") from None
    return out
