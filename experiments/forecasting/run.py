"""Mamba forecasting vs the classical methods on the datasets bundled with statsmodels.

    python -m experiments.forecasting                  # all datasets (about 20 min on one core)
    python -m experiments.forecasting --tiny --out /tmp/fc   # seconds: the CI version
    python -m experiments.forecasting --frames          # the same backtests through the pandas DataFrame API

With --frames every dataset goes in as a long frame (unique_id, ds, y): the Mamba ensemble through
`EnsembleForecaster.cross_validation(df, h, n_windows)`, the other methods through `backtest(df, ...)`, and
the metrics are computed from the frames those return. Same seeds, same threads: the same forecasts as the
array path (tests/test_forecast_pandas.py checks it on elec_equip); only the per-variant table and the
seed-0 row, which read the ensemble's internals, are left out.

For each dataset: a rolling-origin backtest (n windows of H steps tiling the end of the series); every method
is fitted once on the data before the first origin, then forecasts H steps from every origin with the history
up to it (mambakit.forecast.backtest). Methods: naive, seasonal naive, ETS and (S)ARIMA (statsmodels, their
specification chosen on a holdout at the end of the training part), and the Mamba forecaster
(mambakit.forecast.EnsembleForecaster): its variant (which base forecast it corrects, linear skip on/off, and
for several series joint or per-series encoding) chosen by validation loss on that same holdout, then the
median of 5 seeds of the chosen variant, each trained with early stopping on the holdout, with quantile
outputs (0.1, 0.5, 0.9; the point forecast is the median). Metrics MAE, RMSE, MASE, sMAPE averaged over the
windows, plus the 80% interval coverage of the Mamba quantiles, plus every variant's test MASE (its seed-0
network) next to its validation loss. Writes results.json, one PNG per dataset and README.md (tables, plots,
the target and whether it was met) into --out.
"""

from __future__ import annotations

import os

# one BLAS thread before numpy loads: the statsmodels fits use tiny matrices, and OpenBLAS's spinning threads
# cost ~50x CPU time on a shared machine (see mambakit.forecast.baselines._quiet)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform
import sys
import time

import numpy as np
import torch

from mambakit._io import atomic_write
from mambakit.data.timeseries import load_statsmodels
from mambakit.forecast import ForecastConfig
from mambakit.forecast.backtest import METRICS, MambaMethod, backtest
from mambakit.forecast.baselines import ARIMA, ETS, Naive, SeasonalNaive
from mambakit.forecast.config import parse_overrides
from mambakit.forecast.ensemble import MULTI_VARIANTS, STANDARD_VARIANTS, EnsembleForecaster
from mambakit.forecast.frames import to_long
from mambakit.forecast.metrics import point_metrics
from mambakit.forecast.plot import plot_backtest

HERE = os.path.dirname(os.path.abspath(__file__))

# horizon H, backtest windows, context L (about 2-4 seasons), and a one-line description
DATASETS = {
    "co2": dict(horizon=52, windows=4, context=104, about="weekly CO2 at Mauna Loa 1958-2001, 2284 weeks, "
                "59 missing values interpolated; season 52 (ETS has to use 52 although a year is 52.18 weeks, so its "
                "seasonal states drift; ARIMA gets Fourier terms of the exact period)"),
    "elec_equip": dict(horizon=12, windows=4, context=36, about="monthly euro-area electrical equipment orders "
                       "1995-2016, 257 months; season 12"),
    "sunspots": dict(horizon=11, windows=5, context=44, about="yearly sunspot activity 1700-2008, 309 years; "
                     "'season' 11 (the solar cycle)"),
    "macrodata": dict(horizon=8, windows=5, context=24, about="quarterly US macro data 1959-2009, 203 quarters; "
                      "5 series modelled jointly: realgdp, realcons, realinv, cpi, unemp (seasonally adjusted); "
                      "MASE lag 4"),
    "elnino": dict(horizon=12, windows=6, context=48, about="monthly Nino 1+2 sea surface temperature "
                   "1950-2010, 732 months; season 12"),
}
MAMBA = dict(d_model=32, n_layer=2, d_state=16, expand=2, lr=3e-3, batch_size=64, max_steps=1500, eval_every=25,
             patience=8, quantiles=(0.1, 0.5, 0.9))
SEEDS = (0, 1, 2, 3, 4)
CLASSICAL = ("ETS", "ARIMA")


def run_dataset(name: str, spec: dict, tiny: bool, seeds, verbose: bool, overrides: dict | None = None,
                classical: bool = True) -> tuple[dict, object, object]:
    series = load_statsmodels(name)
    H, W, L = spec["horizon"], spec["windows"], spec["context"]
    m = series.season
    cfg = ForecastConfig(horizon=H, context=L, **{**MAMBA, **(overrides or {})})
    if tiny:
        cfg = cfg.replace(d_model=16, max_steps=30, eval_every=10)
    methods = {"naive": Naive(), "seasonal naive": SeasonalNaive(m)}
    if classical and not tiny:  # the classical fits take minutes on co2; the tiny run checks the plumbing only
        period = 365.25 / 7 if m == 52 else None
        methods["ETS"] = ETS(m, H, cfg.val_fraction)
        methods["ARIMA"] = ARIMA(m, H, cfg.val_fraction, period=period)
    variants = MULTI_VARIANTS if series.n_channels > 1 else STANDARD_VARIANTS
    if tiny:
        variants = variants[:2]
    ens = MambaMethod(cfg, verbose=verbose, variants=variants, seeds=tuple(seeds))
    methods["Mamba"] = ens
    t0, c0 = time.perf_counter(), time.process_time()
    r = backtest(series, methods, H, W, verbose=True)

    def score(forecasts):  # (W, H, C) → per-window metrics and their means
        pw = [point_metrics(r.actuals[i], forecasts[i], series.values[:o], m) for i, o in enumerate(r.origins)]
        return pw, {k: float(np.mean([w[k] for w in pw])) for k in METRICS}

    # seed 0 of the chosen variant alone, from the ensemble's member forecasts
    single = np.stack([f[0] for f in ens.member_forecasts])  # (W, H, C)
    r.forecasts["Mamba (seed 0)"] = single
    r.per_window["Mamba (seed 0)"], r.metrics["Mamba (seed 0)"] = score(single)
    r.fit_seconds["Mamba (seed 0)"] = ens.forecaster.members[0].history["seconds"]
    q = np.stack(ens.quantile_forecasts)  # (W, H, C, 3)
    coverage = float(np.mean((r.actuals >= q[..., 0]) & (r.actuals <= q[..., -1])))
    # every candidate variant (its seed-0 network): validation loss (what chose) and test MASE (what it would score)
    val, loss = ens.forecaster.history["validation_mase"], ens.forecaster.history["validation_loss"]
    variant_rows = {short_label(label): {"val_MASE": val[label], "val_loss": loss[label],
                            "MASE": score(np.stack([vf[label] for vf in ens.variant_forecasts]))[1]["MASE"],
                            "best_step": ens.forecaster.candidates[label].history["best_step"],
                            "chosen": label == ens.forecaster.chosen} for label in val}
    res = {
        "dataset": name, "about": spec["about"], "length": len(series), "freq": series.freq.name,
        "season": m, "horizon": H, "context": L, "windows": W, "origins": [str(series.timestamps[o])[:10]
                                                                           for o in r.origins],
        "train_length": int(r.origins[0]), "metrics": r.metrics, "per_window": r.per_window,
        "fit_seconds": r.fit_seconds, "info": r.info, "mamba_80pct_coverage": coverage, "variants": variant_rows,
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
    }
    return res, series, r


def run_dataset_frames(name: str, spec: dict, tiny: bool, seeds, verbose: bool, overrides: dict | None = None,
                       classical: bool = True) -> tuple[dict, object, object]:
    """run_dataset through the DataFrame API (module doc): the dataset as a long frame in, frames out."""
    series = load_statsmodels(name)
    df = to_long(series)  # unique_id = the column names, in the array's column order
    H, W, L = spec["horizon"], spec["windows"], spec["context"]
    m = series.season
    # a frame carries timestamps, not the dataset's seasonal period: sunspots' 11-year cycle is not its
    # frequency's (yearly: none), so it is given here, as the array path reads it off the TimeSeries
    cfg = ForecastConfig(horizon=H, context=L, **{**MAMBA, **(overrides or {})}).replace(season=m)
    if tiny:
        cfg = cfg.replace(d_model=16, max_steps=30, eval_every=10)
    methods = {"naive": Naive(), "seasonal naive": SeasonalNaive(m)}
    if classical and not tiny:
        methods["ETS"] = ETS(m, H, cfg.val_fraction)
        methods["ARIMA"] = ARIMA(m, H, cfg.val_fraction, period=365.25 / 7 if m == 52 else None)
    variants = MULTI_VARIANTS if series.n_channels > 1 else STANDARD_VARIANTS
    if tiny:
        variants = variants[:2]
    t0, c0 = time.perf_counter(), time.process_time()
    r = backtest(df, methods, H, W, season=m, verbose=True)
    ens = EnsembleForecaster(cfg, variants, seeds=tuple(seeds), verbose=verbose)
    t1 = time.perf_counter()
    cv = ens.cross_validation(df, h=H, n_windows=W)  # unique_id, ds, cutoff, y, Mamba, Mamba-lo-80, Mamba-hi-80
    C = series.n_channels

    def windows(column: str) -> np.ndarray:  # cv rows: window, then series, then step → (W, H, C)
        return cv[column].to_numpy().reshape(W, C, H).transpose(0, 2, 1)

    r.forecasts["Mamba"] = windows("Mamba")
    r.per_window["Mamba"] = [point_metrics(r.actuals[i], r.forecasts["Mamba"][i], series.values[:o], m)
                             for i, o in enumerate(r.origins)]
    r.metrics["Mamba"] = {k: float(np.mean([w[k] for w in r.per_window["Mamba"]])) for k in METRICS}
    r.fit_seconds["Mamba"] = time.perf_counter() - t1
    r.info["Mamba"] = {k: v for k, v in ens.history.items() if k in ("chosen", "members")}
    lo, hi = windows("Mamba-lo-80"), windows("Mamba-hi-80")
    coverage = float(np.mean((r.actuals >= lo) & (r.actuals <= hi)))
    print(f"  {'Mamba':16s} MASE {r.metrics['Mamba']['MASE']:.3f}  fit {r.fit_seconds['Mamba']:.1f}s (frames)",
          file=sys.stderr, flush=True)
    res = {
        "dataset": name, "about": spec["about"], "length": len(series), "freq": series.freq.name,
        "season": m, "horizon": H, "context": L, "windows": W, "origins": [str(series.timestamps[o])[:10]
                                                                           for o in r.origins],
        "train_length": int(r.origins[0]), "metrics": r.metrics, "per_window": r.per_window,
        "fit_seconds": r.fit_seconds, "info": r.info, "mamba_80pct_coverage": coverage, "frames": True,
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
    }
    return res, series, r


def short_label(label: str) -> str:
    """'base=last, channel_independent=False, linear_skip=True' → 'last, skip' (', ci' when one series per pass)."""
    parts = dict(p.split("=", 1) for p in label.split(", "))
    return (parts.get("base", "?") + (", skip" if parts.get("linear_skip") == "True" else ", no skip")
            + (", ci" if parts.get("channel_independent") == "True" else ""))


# -------------------------------------------------------------------------------------------------- report
def verdict(results: list[dict]) -> dict:
    rows = []
    for res in results:
        met = res["metrics"]
        mamba, snaive = met["Mamba"]["MASE"], met["seasonal naive"]["MASE"]
        classical = {k: met[k]["MASE"] for k in CLASSICAL if k in met}
        best_name = min(classical, key=classical.get) if classical else None
        best = classical.get(best_name, float("nan"))
        rows.append({"dataset": res["dataset"], "mamba": mamba, "snaive": snaive, "beats_snaive": mamba < snaive,
                     "best_classical": best_name, "best_classical_mase": best,
                     "within_10pct": bool(classical) and mamba <= 1.1 * best, "ratio": mamba / best if classical
                     else float("nan")})
    n = len(rows)
    a = all(r["beats_snaive"] for r in rows)
    b = sum(r["within_10pct"] for r in rows) >= (n + 1) // 2
    return {"rows": rows, "beats_snaive_everywhere": a, "within_10pct_on_half": b, "met": a and b}


def write_readme(out: str, results: list[dict], v: dict, command: str, total_s: float, tiny: bool,
                 merged: bool = False) -> None:
    mamba_args = ", ".join(f"{k}={x!r}" for k, x in MAMBA.items())
    L = ["# Forecasting: Mamba vs naive, seasonal naive, ETS and ARIMA (statsmodels datasets)", ""]
    if tiny:
        L += ["**Tiny run (CI plumbing check): a few training steps, no ETS/ARIMA; the numbers mean nothing.**", ""]
    L += [f"Command: `{command}`. Wall time, summed over the datasets: {total_s / 60:.1f} min on "
          f"{platform.machine()} with {os.cpu_count()} CPUs, one torch thread per process"
          + (" (this report was rebuilt from the per-dataset JSON files with `--report-only`)." if merged else "."),
          "",
          "Protocol (`mambakit.forecast.backtest`): rolling-origin backtest, windows of H steps tiling the end of "
          "each series; every method is fitted **once** on the data before the first origin and then forecasts "
          "H steps from each origin with the history up to it (ETS and ARIMA keep their estimated parameters "
          "and update their state on the new data; Mamba reads the last L values). Nothing at or after an origin "
          "reaches that origin's forecast (tested in `tests/test_forecast.py`). ETS and ARIMA pick their "
          "specification from a small candidate set by MAE on the last 20% of the training part; Mamba early-"
          "stops on the same 20%. MASE divides by the in-sample seasonal-naive MAE (lag = season) of the history "
          "before each origin; all metrics are averaged over the windows (and over series for macrodata).", "",
          f"Mamba (`mambakit.forecast.EnsembleForecaster`): `ForecastConfig({mamba_args})`, context L per "
          "dataset, calendar features on. The network predicts a correction to a "
          "base forecast read off its context (the last value, the seasonal-naive forecast, or none: the context "
          "mean), optionally plus a linear map context → horizon (the linear skip). Which of these variants (and, "
          "for several series, whether the encoder reads them jointly or one at a time) is chosen per dataset by "
          "the lowest validation loss of one network per variant, on the same last 20% of the training part "
          "(section *Variants*). The reported 'Mamba' is the median of "
          f"{len(SEEDS)} seeds of the chosen variant, 'Mamba (seed 0)' a single network of it.", ""]
    L += ["The Mamba paper (Gu & Dao, 2023) has no forecasting experiments, so there are no paper numbers to put "
          "next to these; the reference points are the classical methods practitioners use, run here in the same "
          "backtests.", ""]
    L += ["## Target", "",
          "Mamba beats seasonal naive (MASE) on every dataset, and is within 10% of the best statsmodels method "
          "(ETS or ARIMA) on MASE on at least half of them.", "",
          "| dataset | Mamba MASE | seasonal naive | beats it | best statsmodels | Mamba / best | within 10% |",
          "|---|---|---|---|---|---|---|"]
    for r in v["rows"]:
        L.append(f"| {r['dataset']} | {r['mamba']:.3f} | {r['snaive']:.3f} | {'yes' if r['beats_snaive'] else 'no'}"
                 f" | {r['best_classical'] or '-'} {r['best_classical_mase']:.3f} | {r['ratio']:.2f} | "
                 f"{'yes' if r['within_10pct'] else 'no'} |")
    L += ["", f"Beats seasonal naive everywhere: **{'yes' if v['beats_snaive_everywhere'] else 'no'}**. "
          f"Within 10% of the best statsmodels method on at least half: "
          f"**{'yes' if v['within_10pct_on_half'] else 'no'}**. Target met: **{'yes' if v['met'] else 'no'}**.", ""]
    if any("variants" in res for res in results):
        labels = list(dict.fromkeys(k for res in results for k in res.get("variants", {})))
        L += ["## Variants", "", "Every candidate variant's network (seed 0), from the same run: its validation "
              "MASE (point forecasts on the last 20% of the training part, the windows early stopping also uses: "
              "what chose the variant, **bold**) and the MASE it would have scored on the test windows (not seen "
              "by the choice). "
              "base: which simple forecast the network corrects (seasonal naive, last value, or the context mean); "
              "skip: the linear map context → horizon; ci: one series per encoder pass (several series only).", "",
              "| variant | " + " | ".join(res["dataset"] for res in results) + " |",
              "|---|" + "---|" * len(results)]
        for label in labels:
            cells = []
            for res in results:
                row = res.get("variants", {}).get(label)
                if row is None:
                    cells.append("-")
                else:
                    val = f"**{row['val_MASE']:.3f}**" if row["chosen"] else f"{row['val_MASE']:.3f}"
                    cells.append(f"{val} / {row['MASE']:.3f}")
            L.append(f"| {label} | " + " | ".join(cells) + " |")
        L += ["", "Cells: validation MASE / test MASE; '-': not a candidate there (a seasonal base needs a season "
              "that fits the context; ci needs several series).", ""]
    for res in results:
        L += [f"## {res['dataset']}", "", f"{res['about']}. H = {res['horizon']}, context L = {res['context']}, "
              f"{res['windows']} windows from {res['origins'][0]} (training part: {res['train_length']} steps). "
              f"Mamba 80% interval coverage (actual values inside its 0.1-0.9 quantile band): "
              f"{100 * res['mamba_80pct_coverage']:.0f}%. Backtest time: {res['seconds'] / 60:.1f} min wall"
              + (f", {res['cpu_seconds'] / 60:.1f} min CPU" if "cpu_seconds" in res else "")
              + " ('fit s' below is wall time).", "",
              "| method | MAE | RMSE | MASE | sMAPE % | fit s | notes |", "|---|---|---|---|---|---|---|"]
        for name, met in res["metrics"].items():
            info = res["info"].get(name, {})
            if "members" in info:  # the Mamba ensemble: its variant, then each seed's early-stopping step
                note = f"{info['chosen']}; best step " + "/".join(str(mm["best_step"]) for mm in info["members"])
            elif "chosen" in info:  # ETS / ARIMA: the specification chosen for each series
                note = ", ".join(sorted(set(info["chosen"])))
            else:
                note = ""
            L.append(f"| {name} | {met['MAE']:.4g} | {met['RMSE']:.4g} | {met['MASE']:.3f} | {met['sMAPE']:.2f} | "
                     f"{res['fit_seconds'][name]:.1f} | {note} |")
        L += ["", f"![{res['dataset']}]({res['dataset']}.png)", ""]
    notes = os.path.join(out, "analysis.md")  # hand-written reading of the numbers, kept across regenerations
    if os.path.exists(notes):
        with open(notes) as f:
            L += [f.read().rstrip(), ""]
    atomic_write(os.path.join(out, "README.md"), "\n".join(L) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.forecasting", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=HERE, help="where results.json, the PNGs and README.md go")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {list(DATASETS)}")
    p.add_argument("--tiny", action="store_true", help="a seconds-long plumbing check (CI)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 while the machine is shared)")
    p.add_argument("--verbose", action="store_true", help="print Mamba training progress")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a Mamba ForecastConfig field (ablations), e.g. --set linear_skip=false")
    p.add_argument("--no-classical", action="store_true", help="skip ETS and ARIMA (ablation runs)")
    p.add_argument("--frames", action="store_true",
                   help="run every backtest through the pandas DataFrame API (long frames in and out)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild results.json and README.md from the per-dataset <name>.json files in --out (after "
                        "running datasets as separate processes: --datasets co2 & --datasets elec_equip & ...)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; known: {list(DATASETS)}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    seeds = SEEDS[:2] if args.tiny else SEEDS
    if args.report_only:
        results = []
        for name in DATASETS:
            path = os.path.join(args.out, f"{name}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
        if not results:
            p.error(f"no <dataset>.json files in {args.out}")
        total = sum(r["seconds"] for r in results)
        command = "python -m experiments.forecasting"
        return _report(args, results, seeds, command, total, args.tiny or results[0].get("tiny", False))
    overrides = parse_overrides(args.set)
    t0 = time.perf_counter()
    results = []
    for i, name in enumerate(names):
        el = time.perf_counter() - t0
        eta = f", ETA {el / i * (len(names) - i) / 60:.1f} min" if i else ""
        print(f"[{i + 1}/{len(names)}] {name} ({el / 60:.1f} min elapsed{eta})", file=sys.stderr, flush=True)
        run = run_dataset_frames if args.frames else run_dataset
        res, series, r = run(name, DATASETS[name], args.tiny, seeds, args.verbose, overrides,
                             classical=not args.no_classical)
        res["tiny"], res["overrides"] = args.tiny, {k: str(v) for k, v in overrides.items()}
        results.append(res)
        atomic_write(os.path.join(args.out, f"{name}.json"), json.dumps(res, indent=1, default=float))
        show = [k for k in ("seasonal naive", "ETS", "ARIMA", "Mamba") if k in r.forecasts]
        plot_backtest(series, r, os.path.join(args.out, f"{name}.png"), methods=show,
                      title=f"{name} ({series.names[0]}): {r.horizon}-step forecasts from {len(r.origins)} origins")
        print(f"{'method':16s}" + "".join(f"{k:>10s}" for k in METRICS), flush=True)
        for meth, met in r.metrics.items():
            print(f"{meth:16s}" + "".join(f"{met[k]:10.4g}" for k in METRICS), flush=True)
    total = time.perf_counter() - t0
    command = "python -m experiments.forecasting" + (" --tiny" if args.tiny else "") + (
        " --frames" if args.frames else "") + (" --no-classical" if args.no_classical else "") + (
        f" --datasets {args.datasets}" if names != list(DATASETS) else "")
    return _report(args, results, seeds, command, total, args.tiny)


def _report(args, results, seeds, command, total, tiny) -> int:
    v = verdict(results)
    atomic_write(os.path.join(args.out, "results.json"), json.dumps(
        {"command": command, "total_seconds": total, "mamba_config": {**MAMBA, "quantiles": list(MAMBA["quantiles"])},
         "seeds": list(seeds), "verdict": v, "datasets": results}, indent=1, default=float))
    write_readme(args.out, results, v, command, total, tiny, merged=args.report_only)
    print(f"target met: {v['met']} (beats seasonal naive everywhere: {v['beats_snaive_everywhere']}; within 10% of "
          f"best statsmodels on half: {v['within_10pct_on_half']}); {total / 60:.1f} min; wrote {args.out}/README.md",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
