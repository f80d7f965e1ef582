"""The documentation site builds without a warning (`mkdocs build --strict`, as CI would run it), its API
reference is generated from the docstrings, and links to the repository's files land on pages of the site."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _missing() -> list[str]:
    """The packages of the docs extra that are not installed."""
    out = []
    for name in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package of a dotted name is absent
            found = False
        if not found:
            out.append(name)
    return out


MISSING = _missing()

pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the docs build needs {MISSING}: pip install mambakit[docs]")


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                        str(ROOT / "mkdocs.yml"), "--site-dir", str(site)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "WARNING" not in r.stderr, r.stderr[-4000:]
    # the API reference is generated from the docstrings, not written by hand
    api = (site / "api" / "forecast" / "index.html").read_text()
    assert "Forecaster" in api and "cross_validation" in api and "Rolling-origin cross-validation" in api
    # repository files the guides link to are pages of the site, and the links point at them
    assert (site / "repo" / "BENCHMARKS" / "index.html").is_file()
    assert (site / "repo" / "experiments" / "forecasting" / "co2.png").is_file()
    assert 'href="repo/BENCHMARKS/"' in (site / "index.html").read_text()
    for page in ("quickstart", "models", "generation", "training", "serving", "evaluation", "forecasting", "ops",
                 "kernels", "engine", "benchmarks"):
        assert (site / page / "index.html").is_file(), page
