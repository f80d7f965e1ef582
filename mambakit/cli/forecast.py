"""`mambakit forecast` (argparse only; see mambakit.forecast): a CSV or Parquet file in (read by pandas), forecasts out
(+ plot, + backtest).

Two table layouts: wide (a timestamp column + one value column per series; forecasts CSV: timestamp, then per
series <name>, <name>_q<level>) or long (columns unique_id, ds, y, one row per series and timestamp, as
statsforecast / neuralforecast; forecasts: unique_id, ds, Mamba, Mamba-lo-80, ... as Forecaster.predict(h)).
A table with unique_id, ds and y columns is read as long unless --time-col or --columns say otherwise.

    mambakit forecast data.csv --horizon 12 --out forecast.csv --plot forecast.png
    mambakit forecast panel.parquet --horizon 12 --out forecast.parquet  # long format: unique_id, ds, y
    mambakit forecast data.csv --time-col date --columns sales,visits --horizon 24 --quantiles 0.1,0.5,0.9
    mambakit forecast data.csv --horizon 12 --backtest 4 --classical    # score against naive/ETS/ARIMA first
    mambakit forecast data.csv --horizon 12 --set d_model=64 --set max_steps=2000 --save model_dir
    mambakit forecast data.csv --horizon 12 --select --seeds 5   # variant chosen on validation, median of 5 seeds

Data handling (gaps, irregular timestamps) is mambakit.data.timeseries'; every other ForecastConfig field is
set with --set key=value (validated by ForecastConfig).
"""

from __future__ import annotations

import os
import sys

from .._io import atomic_write
from ..data.timeseries import TimeSeries, from_wide_frame, read_table
from ..forecast import frames
from ..forecast.config import ForecastConfig, default_context, parse_overrides
from ..forecast.io import write_forecast_csv


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("forecast", help="forecast the next steps of time series in a CSV with a Mamba model",
                              description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("csv", help="CSV (with a header) or Parquet file: a timestamp column and numeric value columns, "
                                "or the long format unique_id, ds, y")
    p.add_argument("--horizon", type=int, required=True, help="steps to forecast (H)")
    p.add_argument("--time-col", default=None, help="timestamp column (default: the first column)")
    p.add_argument("--columns", default=None, help="comma-separated value columns (default: all others)")
    p.add_argument("--context", type=int, default=None,
                   help="past steps the model reads, >= 2 (default: 3 seasons or 4 horizons, fitted to the length)")
    p.add_argument("--quantiles", default=None, help="comma-separated levels, must include 0.5 (e.g. 0.1,0.5,0.9)")
    p.add_argument("--max-gap", type=int, default=5, help="interpolate interior gaps up to this many steps (5)")
    p.add_argument("--resample", action="store_true",
                   help="average irregular timestamps onto a regular grid (else they are an error)")
    p.add_argument("--drop-exog", action="store_true",
                   help="long format: ignore columns besides unique_id, ds, y (else they are an error: exogenous "
                        "inputs are not supported)")
    p.add_argument("--out", default=None,
                   help="forecasts CSV, or Parquet when it ends in .parquet (default: <input>.forecast.csv)")
    p.add_argument("--plot", default=None, help="also write a PNG of history and forecast")
    p.add_argument("--save", default=None, help="also save the fitted model to this directory")
    p.add_argument("--backtest", type=int, default=0, metavar="N",
                   help="first score the model on N rolling-origin windows at the end of the series")
    p.add_argument("--classical", action="store_true", help="with --backtest: add ETS and ARIMA (statsmodels)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other ForecastConfig field, e.g. --set d_model=64 --set max_steps=2000")
    p.add_argument("--select", action="store_true",
                   help="train one model per variant (base forecast: seasonal / last value / none; linear skip on or "
                        "off; for several series also joint or per-series encoding) and keep the one with the lowest "
                        "validation MASE: the MAE on the validation part over the in-sample seasonal-naive MAE, "
                        "so that series in large units do not decide alone (mambakit.forecast.ensemble)")
    p.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="forecast with the median of K models that differ in their seed (default 1)")
    p.add_argument("--verbose", action="store_true", help="print training progress")
    p.set_defaults(func=_cli)


def _variants(args, n_channels: int):
    """The candidate variants --select asks for (None without it)."""
    if not args.select:
        return None
    from ..forecast.ensemble import MULTI_VARIANTS, STANDARD_VARIANTS

    return MULTI_VARIANTS if n_channels > 1 else STANDARD_VARIANTS


def _make(config: ForecastConfig, args, n_channels: int):
    """A Forecaster, or an EnsembleForecaster when --select or --seeds > 1 asks for one."""
    from ..forecast.ensemble import EnsembleForecaster
    from ..forecast.forecaster import Forecaster

    if not args.select and args.seeds == 1:
        return Forecaster(config)
    return EnsembleForecaster(config, _variants(args, n_channels), seeds=args.seeds)


def _check_args(args) -> None:
    """ValueError naming an option whose value cannot act (or that cannot act without another)."""
    if args.horizon < 1:
        raise ValueError(f"--horizon must be >= 1, got {args.horizon}")
    if args.context is not None and args.context < 2:  # None is the default; 0 is not a way to ask for it
        raise ValueError(f"--context must be >= 2 past steps, got {args.context} (leave it out for the default)")
    if args.max_gap < 0:
        raise ValueError(f"--max-gap must be >= 0, got {args.max_gap}")
    if args.backtest < 0:
        raise ValueError(f"--backtest must be >= 0 windows, got {args.backtest}")
    if args.classical and not args.backtest:
        raise ValueError("--classical adds ETS and ARIMA to the backtest: it needs --backtest N")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")


def _read(args) -> tuple[TimeSeries, list | None]:
    """The input table as a TimeSeries, and the unique_id values when it is in the long format (else None)."""
    table = read_table(args.csv)
    long = {frames.ID, frames.DS, frames.Y} <= set(table.columns) and args.time_col is None and args.columns is None
    if not long:
        if args.drop_exog:
            raise ValueError("--drop-exog applies to the long format (unique_id, ds, y) only")
        columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
        series = from_wide_frame(table, args.time_col, columns, max_gap=args.max_gap, resample=args.resample,
                                 source=args.csv)
        return series, None
    if args.resample:
        raise ValueError("--resample applies to the wide format only: a long frame's series must share regular "
                         "timestamps")
    return frames.from_long(table, max_gap=args.max_gap, exog="drop" if args.drop_exog else "refuse",
                            source=args.csv)


def _write(path: str, fc, ids: list | None) -> None:
    """Forecasts in the input's layout: wide CSV (write_forecast_csv) or the long frame (CSV or Parquet)."""
    if ids is None:
        if path.lower().endswith((".parquet", ".pq")):
            raise ValueError("--out: Parquet output is written for the long format (unique_id, ds, y) only")
        write_forecast_csv(path, fc)
        return
    df = frames.forecast_frame(fc, ids)
    if path.lower().endswith((".parquet", ".pq")):
        atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
    else:
        atomic_write(path, df.to_csv(index=False))


def _quantiles(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(q) for q in text.split(","))
    except ValueError:
        raise ValueError(f"--quantiles must be comma-separated numbers like 0.1,0.5,0.9, got {text!r}") from None


def _cli(args) -> int:
    import torch

    _check_args(args)
    series, ids = _read(args)
    gaps = {k: v for k, v in series.meta.get("gaps", {}).items()}
    print(f"{args.csv}: {len(series)} steps ({series.freq.name}), series {series.names}"
          + (f"; interpolated {gaps}" if gaps else ""), file=sys.stderr)
    quantiles = _quantiles(args.quantiles)
    sets = parse_overrides(args.set)
    context = args.context if args.context is not None else default_context(
        len(series), args.horizon, series.season, sets.get("val_fraction", 0.2))
    config = ForecastConfig(horizon=args.horizon, context=context, quantiles=quantiles, **sets)
    if args.backtest:
        _backtest(series, config, args)
    torch.manual_seed(config.seed)
    forecaster = _make(config, args, series.n_channels).fit(series, verbose=args.verbose)
    h = forecaster.history
    for m in h.get("members", [h]):
        print(f"trained {m['steps']} steps in {m['seconds']:.1f} s (best validation loss {m['best_val_loss']:.4f} at "
              f"step {m['best_step']}; {m['train_windows']} training / {m['val_windows']} validation windows)",
              file=sys.stderr)
    if "chosen" in h:
        val = h["validation_mase"]
        print(f"variant chosen on validation: {h['chosen']} (validation MASE {val[h['chosen']]:.3f}; {len(val)} "
              "candidates)", file=sys.stderr)
    fc = forecaster.predict(series)
    out = args.out or os.path.splitext(args.csv)[0] + ".forecast.csv"
    _write(out, fc, ids)
    print(f"wrote {out}", file=sys.stderr)
    if args.plot:
        from ..forecast.plot import plot_forecast

        plot_forecast(series, fc, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.save:
        forecaster.save(args.save)
        print(f"saved the model to {args.save}", file=sys.stderr)
    return 0


def _backtest(series: TimeSeries, config: ForecastConfig, args) -> None:
    from ..forecast.backtest import METRICS, MambaMethod, backtest
    from ..forecast.baselines import ARIMA, ETS, Naive, SeasonalNaive

    m = series.season
    methods = {"naive": Naive(), "seasonal naive": SeasonalNaive(m)}
    if args.classical:
        methods.update({"ETS": ETS(m, config.horizon, config.val_fraction),
                        "ARIMA": ARIMA(m, config.horizon, config.val_fraction)})
    methods["Mamba"] = MambaMethod(config, verbose=args.verbose, variants=_variants(args, series.n_channels),
                                   seeds=args.seeds)
    r = backtest(series, methods, config.horizon, args.backtest, verbose=args.verbose)
    print(f"backtest: {args.backtest} windows of {config.horizon} steps, origins {r.origins.tolist()}, MASE lag {m}")
    print(f"{'method':16s}" + "".join(f"{k:>10s}" for k in METRICS))
    for name, met in r.metrics.items():
        print(f"{name:16s}" + "".join(f"{met[k]:10.4g}" for k in METRICS))
