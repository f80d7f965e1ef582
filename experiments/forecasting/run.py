"""Mamba forecasting vs the classical methods on the datasets bundled with statsmodels.

    python -m experiments.forecasting                  # all datasets (≤ 15 min on an idle 2-core machine)
    python -m experiments.forecasting --tiny --out /tmp/fc   # seconds: the CI version

For each dataset: a rolling-origin backtest (n windows of H steps tiling the end of the series); every method
is fitted once on the data before the first origin, then forecasts H steps from every origin with the history
up to it (mambakit.forecast.backtest). Methods: naive, seasonal naive, ETS and (S)ARIMA (statsmodels, their
specification chosen on a holdout at the end of the training part), and the Mamba forecaster (median of a few
seeds; seed 0 alone is reported too), trained with early stopping on that same holdout, with quantile outputs
(0.1, 0.5, 0.9; the point forecast is the median). Metrics MAE, RMSE, MASE, sMAPE averaged over the windows,
plus the 80% interval coverage of the Mamba quantiles. Writes results.json, one PNG per dataset and README.md
(tables, plots, the target and whether it was met) into --out.
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
import tempfile
import time

import numpy as np
import torch

from mambakit.data.timeseries import load_statsmodels
from mambakit.forecast import ForecastConfig
from mambakit.forecast.backtest import METRICS, MambaMethod, backtest
from mambakit.forecast.baselines import ARIMA, ETS, Naive, SeasonalNaive
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
SEEDS = (0, 1, 2)
CLASSICAL = ("ETS", "ARIMA")


class MambaEnsemble:
    """The median of several Mamba forecasters that differ only in their seed (init and batch order)."""

    takes_series = True

    def __init__(self, config: ForecastConfig, seeds, verbose=False):
        self.members = [MambaMethod(config.replace(seed=s), verbose=verbose) for s in seeds]
        self.member_forecasts: list[np.ndarray] = []  # per call: (S, H, C)
        self.quantiles: list[np.ndarray] = []  # per call: (H, C, Q), the members' mean

    def fit(self, train):
        for m in self.members:
            m.fit(train)
        self.member_forecasts, self.quantiles = [], []
        return self

    def forecast(self, history, horizon):
        fs = np.stack([m.forecast(history, horizon) for m in self.members])  # (S, H, C)
        self.member_forecasts.append(fs)
        if self.members[0].quantile_forecasts:
            self.quantiles.append(np.mean([m.quantile_forecasts[-1] for m in self.members], axis=0))
        return np.median(fs, axis=0)

    def info(self):
        return {"members": [m.info() for m in self.members]}


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
    ens = MambaEnsemble(cfg, seeds, verbose=verbose)
    methods["Mamba"] = ens
    t0, c0 = time.perf_counter(), time.process_time()
    r = backtest(series, methods, H, W, verbose=True)
    # seed 0 alone, from the ensemble's member forecasts
    single = np.stack([f[0] for f in ens.member_forecasts])  # (W, H, C)
    per_window = [point_metrics(r.actuals[i], single[i], series.values[:o], m) for i, o in enumerate(r.origins)]
    r.forecasts["Mamba (seed 0)"] = single
    r.per_window["Mamba (seed 0)"] = per_window
    r.metrics["Mamba (seed 0)"] = {k: float(np.mean([w[k] for w in per_window])) for k in METRICS}
    r.fit_seconds["Mamba (seed 0)"] = r.fit_seconds["Mamba"] / len(seeds)
    q = np.stack(ens.quantiles)  # (W, H, C, 3)
    coverage = float(np.mean((r.actuals >= q[..., 0]) & (r.actuals <= q[..., -1])))
    res = {
        "dataset": name, "about": spec["about"], "length": len(series), "freq": series.freq.name,
        "season": m, "horizon": H, "context": L, "windows": W, "origins": [str(series.timestamps[o])[:10]
                                                                           for o in r.origins],
        "train_length": int(r.origins[0]), "metrics": r.metrics, "per_window": r.per_window,
        "fit_seconds": r.fit_seconds, "info": r.info, "mamba_80pct_coverage": coverage,
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
    }
    return res, series, r


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


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_readme(out: str, results: list[dict], v: dict, command: str, total_s: float, tiny: bool,
                 merged: bool = False, compare: dict | None = None) -> None:
    L = ["# Forecasting: Mamba vs naive, seasonal naive, ETS and ARIMA (statsmodels datasets)", ""]
    if tiny:
        L += ["**Tiny run (CI plumbing check): a few training steps, no ETS/ARIMA; the numbers mean nothing.**", ""]
    L += [f"Command: `{command}`. Wall time, summed over the datasets: {total_s / 60:.1f} min on "
          f"{platform.machine()} with {os.cpu_count()} CPUs, one torch thread per process"
          + (" (the datasets ran as parallel processes, `--datasets NAME` each, merged with `--report-only`; the "
             "machine was shared with other jobs, so times are upper bounds)." if merged else "."), "",
          "Protocol (`mambakit.forecast.backtest`): rolling-origin backtest, windows of H steps tiling the end of "
          "each series; every method is fitted **once** on the data before the first origin and then forecasts "
          "H steps from each origin with the history up to it (ETS and ARIMA keep their estimated parameters "
          "and update their state on the new data; Mamba reads the last L values). Nothing at or after an origin "
          "reaches that origin's forecast (tested in `tests/test_forecast.py`). ETS and ARIMA pick their "
          "specification from a small candidate set by MAE on the last 20% of the training part; Mamba early-"
          "stops on the same 20%. MASE divides by the in-sample seasonal-naive MAE (lag = season) of the history "
          "before each origin; all metrics are averaged over the windows (and over series for macrodata).", "",
          f"Mamba: `ForecastConfig({', '.join(f'{k}={v!r}' for k, v in MAMBA.items())})`, context L per dataset, "
          f"calendar features on, linear skip on; the reported 'Mamba' is the median of {len(SEEDS)} seeds, "
          "'Mamba (seed 0)' a single model.", ""]
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
    if compare:
        sets = sorted({" ".join(f"--set {k}={x}" for k, x in o.items()) for o, _, _ in compare.values()})
        missing = [r["dataset"] for r in results if r["dataset"] not in compare]
        L += ["## Ablation", "", f"The same backtests with `python -m experiments.forecasting --no-classical "
              f"{' / '.join(sets)}` (the Mamba MASE; same seeds)"
              + (f"; not run on {', '.join(missing)}" if missing else "") + ":", "",
              "| dataset | Mamba | ablation | Mamba (seed 0) | ablation (seed 0) |", "|---|---|---|---|---|"]
        for res in results:
            if res["dataset"] in compare:
                _, a, a0 = compare[res["dataset"]]
                met = res["metrics"]
                L.append(f"| {res['dataset']} | {met['Mamba']['MASE']:.3f} | {a:.3f} | "
                         f"{met['Mamba (seed 0)']['MASE']:.3f} | {a0:.3f} |")
        L.append("")
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
            if "chosen" in info:
                note = ", ".join(sorted(set(info["chosen"])))
            elif "members" in info:
                note = "best step " + "/".join(str(mm["best_step"]) for mm in info["members"])
            else:
                note = ""
            L.append(f"| {name} | {met['MAE']:.4g} | {met['RMSE']:.4g} | {met['MASE']:.3f} | {met['sMAPE']:.2f} | "
                     f"{res['fit_seconds'][name]:.1f} | {note} |")
        L += ["", f"![{res['dataset']}]({res['dataset']}.png)", ""]
    notes = os.path.join(out, "analysis.md")  # hand-written reading of the numbers, kept across regenerations
    if os.path.exists(notes):
        with open(notes) as f:
            L += [f.read().rstrip(), ""]
    _atomic_write(os.path.join(out, "README.md"), "\n".join(L) + "\n")


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
    p.add_argument("--compare", default=None, metavar="DIR",
                   help="with --report-only: add the Mamba MASE of an ablation run in DIR to the README")
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
    seeds = SEEDS[:1] if args.tiny else SEEDS
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
        return _report(args, results, seeds, command, total, args.tiny or results[0].get("tiny", False),
                       _load_compare(args.compare))
    from mambakit.forecast.cli import _parse_sets

    overrides = _parse_sets(args.set)
    t0 = time.perf_counter()
    results = []
    for i, name in enumerate(names):
        el = time.perf_counter() - t0
        eta = f", ETA {el / i * (len(names) - i) / 60:.1f} min" if i else ""
        print(f"[{i + 1}/{len(names)}] {name} ({el / 60:.1f} min elapsed{eta})", file=sys.stderr, flush=True)
        res, series, r = run_dataset(name, DATASETS[name], args.tiny, seeds, args.verbose, overrides,
                                     classical=not args.no_classical)
        res["tiny"], res["overrides"] = args.tiny, {k: str(v) for k, v in overrides.items()}
        results.append(res)
        _atomic_write(os.path.join(args.out, f"{name}.json"), json.dumps(res, indent=1, default=float))
        show = [k for k in ("seasonal naive", "ETS", "ARIMA", "Mamba") if k in r.forecasts]
        plot_backtest(series, r, os.path.join(args.out, f"{name}.png"), methods=show,
                      title=f"{name} ({series.names[0]}): {r.horizon}-step forecasts from {len(r.origins)} origins")
        print(f"{'method':16s}" + "".join(f"{k:>10s}" for k in METRICS), flush=True)
        for meth, met in r.metrics.items():
            print(f"{meth:16s}" + "".join(f"{met[k]:10.4g}" for k in METRICS), flush=True)
    total = time.perf_counter() - t0
    command = "python -m experiments.forecasting" + (" --tiny" if args.tiny else "") + (
        f" --datasets {args.datasets}" if names != list(DATASETS) else "")
    return _report(args, results, seeds, command, total, args.tiny)


def _load_compare(directory: str | None) -> dict:
    """{dataset: (overrides, Mamba MASE, Mamba (seed 0) MASE)} from an ablation run's <dataset>.json files."""
    out = {}
    if directory:
        for name in DATASETS:
            path = os.path.join(directory, f"{name}.json")
            if os.path.exists(path):
                with open(path) as f:
                    r = json.load(f)
                out[name] = (r.get("overrides", {}), r["metrics"]["Mamba"]["MASE"],
                             r["metrics"]["Mamba (seed 0)"]["MASE"])
    return out


def _report(args, results, seeds, command, total, tiny, compare: dict | None = None) -> int:
    v = verdict(results)
    _atomic_write(os.path.join(args.out, "results.json"), json.dumps(
        {"command": command, "total_seconds": total, "mamba_config": {**MAMBA, "quantiles": list(MAMBA["quantiles"])},
         "seeds": list(seeds), "verdict": v, "datasets": results}, indent=1, default=float))
    write_readme(args.out, results, v, command, total, tiny, merged=args.report_only, compare=compare)
    print(f"target met: {v['met']} (beats seasonal naive everywhere: {v['beats_snaive_everywhere']}; within 10% of "
          f"best statsmodels on half: {v['within_10pct_on_half']}); {total / 60:.1f} min; wrote {args.out}/README.md",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
