"""The MQAR experiment (experiments/mqar): the generator checked against an independent reading of its layout, the
models' sizes, and the tiny run (train → test → results.json, plot, README) in seconds."""

import json

import pytest
import torch

pytest.importorskip("matplotlib")

from experiments.mqar import run as mq  # noqa: E402
from experiments.mqar.task import mqar  # noqa: E402
from experiments._common import evaluate  # noqa: E402
from mambakit.data.synthetic import IGNORE_INDEX  # noqa: E402


@pytest.mark.parametrize("b, l, n, V", [(5, 64, 16, 64), (3, 40, 10, 24), (4, 256, 64, 512), (2, 8, 2, 6)])
def test_generator_layout_checked_row_by_row(b, l, n, V):
    inputs, targets = mqar(b, l, n, V, generator=torch.Generator().manual_seed(b + l))
    assert inputs.shape == targets.shape == (b, l) and inputs.dtype == targets.dtype == torch.long
    assert 0 <= int(inputs.min()) and int(inputs.max()) < V
    for x, y in zip(inputs.tolist(), targets.tolist()):
        keys, values = x[0:2 * n:2], x[1:2 * n:2]
        assert len(set(keys)) == n and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == n and all(V // 2 <= v < V for v in values)
        lookup = dict(zip(keys, values))
        scored = [t for t in range(l) if y[t] != IGNORE_INDEX]
        # every key is queried exactly once, after the pairs, at the first token of a two-token slot
        assert sorted(x[t] for t in scored) == sorted(keys)
        assert all(t >= 2 * n and (t - 2 * n) % 2 == 0 for t in scored)
        assert all(y[t] == lookup[x[t]] for t in scored)
        # no key of the row appears after the pairs except as a query (fillers never repeat one)
        assert all(t in scored for t in range(2 * n, l) if x[t] in lookup)


def test_generator_is_seeded_and_its_gaps_follow_the_power_law():
    a = mqar(4, 64, 8, 64, generator=torch.Generator().manual_seed(3))
    b = mqar(4, 64, 8, 64, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))

    def mean_slot(power_a):  # the mean query slot over many rows: a < 1 favours short gaps
        _, y = mqar(400, 256, 8, 64, power_a=power_a, generator=torch.Generator().manual_seed(0))
        pos = (y != IGNORE_INDEX).nonzero()[:, 1].double()
        return float(((pos - 16) / 2).mean())

    uniform = mean_slot(1.0)  # slots 0 … 119 equally likely (8 distinct per row): mean ≈ 59.5
    assert abs(uniform - 59.5) < 3
    assert mean_slot(0.01) < uniform - 10


def test_generator_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="seq_len"):
        mqar(2, 60, 16, 64)  # 16 pairs need length 64
    with pytest.raises(ValueError, match="n_pairs"):
        mqar(2, 256, 40, 64)  # 31 distinct keys at most
    with pytest.raises(ValueError, match="power_a"):
        mqar(2, 64, 4, 64, power_a=0.0)


class _Lookup(torch.nn.Module):
    """Answers every query from the pairs it has read: the accuracy of a perfect recall is 1."""

    def __init__(self, n, V):
        super().__init__()
        self.n, self.V = n, V

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.V)
        for i, row in enumerate(ids.tolist()):
            lookup = dict(zip(row[0:2 * self.n:2], row[1:2 * self.n:2]))
            for t in range(2 * self.n, len(row)):
                if row[t] in lookup:
                    logits[i, t, lookup[row[t]]] = 1.0
        return type("Out", (), {"logits": logits})()


def test_test_sets_are_scored_over_every_query():
    args = mq.parse_args(["--quick"])
    batches = mq.test_set(args, 4)
    assert sum(int((y != IGNORE_INDEX).sum()) for _, y in batches) == 4 * args.test_size
    assert evaluate(_Lookup(4, args.vocab), batches, args.vocab) == 1.0
    zeros = type("Z", (torch.nn.Module,), {"forward": lambda self, ids: _Lookup(4, args.vocab)(ids * 0)})()
    assert evaluate(zeros, batches, args.vocab) == 0.0  # reads no pairs: answers nothing


def test_equal_width_and_attention_matched_to_mamba_in_parameters():
    args = mq.parse_args([])
    params = {m: sum(p.numel() for p in mq.build_model(m, args).parameters()) for m in mq.MODELS}
    assert abs(params["attention"] / params["mamba"] - 1) < 0.02, params
    assert params["mamba"] < params["mamba2_n64"] < params["mamba2_n128"]  # B and C grow with N
    assert mq.state_size("mamba", args) == 2 * 64 * 16 and mq.state_size("mamba2_n128", args) == 2 * 64 * 128
    with pytest.raises(SystemExit):
        mq.parse_args(["--test-pairs", "33"])  # 33 pairs do not fit in length 128


def test_quick_run_writes_results_plot_and_readme(tmp_path):
    assert mq.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    args = mq.parse_args(["--quick"])
    assert list(results["models"]) == ["mamba", "mamba2_n64", "mamba2_n128", "attention"]
    for name, r in results["models"].items():
        assert r["steps"] == 4 and [c["step"] for c in r["curve"]] == [2, 4]
        assert r["params"] == sum(p.numel() for p in mq.build_model(name, args).parameters())
        for n in args.test_pairs:  # accuracies are counts of correct queries out of n · test_size
            queries = r["test_queries"][str(n)]
            assert queries == n * args.test_size
            assert abs(r["accuracy"][str(n)] * queries - round(r["accuracy"][str(n)] * queries)) < 0.01 * n
        assert r["conditions"]["cpus"] >= 1 and "end" in r["conditions"]
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    readme = (tmp_path / "README.md").read_text()
    acc = results["models"]["mamba2_n128"]["accuracy"]
    assert f"| Mamba-2 (N=128) | {results['models']['mamba2_n128']['params']:,} | 4,096 | " \
           + " | ".join(f"{100 * acc[str(n)]:.1f}" for n in args.test_pairs) + " |" in readme
    assert "python -m experiments.mqar --quick" in readme and "At 8 pairs" in readme
    (tmp_path / "README.md").unlink()  # --report-only: the same README from results.json, no training
    assert mq.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == readme


def test_verdict_compares_the_largest_pair_count():
    models = {k: {"label": mq.MODELS[k][0], "accuracy": {"8": a8, "64": a64}}
              for k, a8, a64 in (("mamba", 1.0, 0.2), ("mamba2_n64", 1.0, 0.5), ("mamba2_n128", 1.0, 0.9))}
    text = mq.verdict({"models": models, "settings": {"vocab": 512}})
    assert "At 64 pairs, Mamba-2 (N=128) reaches 90.0% against Mamba-1 (N=16)'s 20.0%" in text
    assert "wins here (+70.0 points)" in text and "N=128 − N=64 at 64 pairs: +40.0 points" in text
    assert "chance" not in text
    for r in models.values():  # near chance (1/256): said so
        r["accuracy"]["64"] = 0.01
    text = mq.verdict({"models": models, "settings": {"vocab": 512}})
    assert "does not win here (+0.0 points)" in text and "neither has learned" in text
