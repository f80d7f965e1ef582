"""Evaluation (mambakit.eval): continuation scores equal the model's own log-softmax sums (shared contexts,
chunking, padding, long inputs), perplexity (stateful and sliding windows), the CLI, and the
lm-evaluation-harness adapter on hand-made requests and on a tiny local task (no network)."""

import argparse
import json
import math
import textwrap

import pytest
import torch

from _models import random_model as _random_model
from mambakit import ByteTokenizer, MambaLM
from mambakit.cli.eval import add_parser as add_cli
from mambakit.eval import perplexity, score


def random_model(vocab_size=258, seed=0) -> MambaLM:
    return _random_model(vocab_size, seed=seed, tokenizer=ByteTokenizer())


@pytest.fixture(scope="module")
def model():
    return random_model()


def direct(model, ctx, cont):
    """The model's own answer: one forward over context + continuation, log-softmax, sum over the continuation."""
    ids = torch.tensor([list(ctx) + list(cont)])
    with torch.no_grad():
        logits = model(ids).logits[0, :, : model.config.vocab_size].double()  # (l, V)
    lp = torch.log_softmax(logits, -1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    tgt = torch.tensor(list(cont))
    return lp[pos, tgt].sum().item(), bool((logits[pos].argmax(-1) == tgt).all())


def test_scores_equal_log_softmax_sums(model):
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 258, (n,), generator=g).tolist()  # noqa: E731
    shared = rand(9)
    reqs = [(shared, rand(1)), (shared, rand(4)), (shared, rand(7)),  # one context, three continuations
            (rand(1), rand(3)), (rand(30), rand(2)), (rand(9), rand(12)), (rand(5), rand(1))]
    for batch_size, chunk in ((16, 2048), (2, 3)):  # batching, padding and chunking change nothing
        got = score(model, reqs, batch_size=batch_size, chunk_tokens=chunk)
        for (ctx, cont), (lp, greedy) in zip(reqs, got):
            want, want_greedy = direct(model, ctx, cont)
            assert lp == pytest.approx(want, abs=1e-3, rel=1e-4)
            assert greedy == want_greedy


def test_is_greedy_on_the_greedy_continuation(model):
    ctx = list(b"Hello")
    from mambakit import generate

    cont = generate(model, [ctx], 6, temperature=0).sequences[0]
    (lp, greedy), (lp2, greedy2) = score(model, [(ctx, cont), (ctx, cont[:-1] + [(cont[-1] + 1) % 258])])
    assert greedy and not greedy2 and lp > lp2


def test_bad_requests(model):
    with pytest.raises(ValueError, match="non-empty"):
        score(model, [([], [1])])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        score(model, [([1], [300])])


def test_perplexity_stateful_and_windows(model):
    ids = torch.randint(0, 258, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    full = perplexity(model, ids, prefix_token_id=256, chunk_tokens=64)
    want = -direct(model, [256], ids)[0] / 300
    assert full["tokens"] == 300 and full["nats_per_token"] == pytest.approx(want, rel=1e-4)
    assert full["perplexity"] == pytest.approx(math.exp(want), rel=1e-4)
    # windows as long as the text: the same as stateful; short windows: each token sees at most W − 1 before
    same = perplexity(model, ids, prefix_token_id=256, window=400, stride=100)
    assert same["nll"] == pytest.approx(full["nll"], rel=1e-5)
    win = perplexity(model, ids, prefix_token_id=256, window=40, stride=10, num_bytes=300)
    expect = -direct(model, [256], ids[:39])[0]
    for end in range(40, 301, 10):  # scored: ids[end-1 : end+9] (positions in the prefixed sequence)
        seq = ([256] + ids)[end - 30: end + 10]
        expect -= direct(model, seq[:30], seq[30:])[0]
    assert win["nll"] == pytest.approx(expect, rel=1e-5)
    assert win["bits_per_byte"] == pytest.approx(win["nll"] / 300 / math.log(2))


def test_cli_ppl(tmp_path, model, capsys):
    model.save_pretrained(tmp_path / "m")
    text = "To be, or not to be, that is the question.\n" * 5
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", str(tmp_path / "m"), "--ppl", str(tmp_path / "t.txt"),
                              "--output", str(tmp_path / "r.json"), "--chunk-tokens", "50"])
    assert args.func(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    want = perplexity(model, list(text.encode()), prefix_token_id=256)
    assert result["tokens"] == len(text) and result["nll"] == pytest.approx(want["nll"], rel=1e-4)
    assert "bits/byte" in capsys.readouterr().out
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    args = parser.parse_args(["eval", "--model", str(tmp_path / "m"), "--ppl", str(tmp_path / "bad.txt")])
    with pytest.raises(ValueError, match="not UTF-8"):
        args.func(args)


# ----------------------------------------------------------------------------------- lm-eval adapter
class _Req:
    def __init__(self, *args):
        self.args = args


def test_adapter_loglikelihoods_equal_the_models_sums(model):
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'mambakit[eval]')")
    from mambakit.eval import register

    lm = register()(model=model, batch_size=3)
    reqs = [("The cat sat on the", " mat"), ("The cat sat on the", " hat"), ("The cat sat on the ", "dog"),
            ("", "Hello world"), ("Q: 2+2?\nA:", " 4")]
    got = lm.loglikelihood([_Req(*r) for r in reqs])
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        if ctx.endswith(" "):  # the trailing space moves to the continuation (as lm_eval's HF adapter)
            ctx, cont = ctx[:-1], " " + cont
        c = list(ctx.encode()) or [256]  # empty context: the EOS token
        want, want_greedy = direct(model, c, list(cont.encode()))
        assert lp == pytest.approx(want, abs=1e-3, rel=1e-4) and greedy == want_greedy
    text = "rolling text " * 20
    (rolled,) = lm.loglikelihood_rolling([_Req(text)])
    assert rolled == pytest.approx(direct(model, [256], list(text.encode()))[0], rel=1e-4)
    (gen,) = lm.generate_until([_Req("Once", {"until": ["\n"], "max_gen_toks": 8})])
    from mambakit import generate

    assert gen == generate(model, ["Once"], 8, temperature=0, stop=["\n"]).texts[0]


def test_adapter_runs_a_local_task_end_to_end(model, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'mambakit[eval]')")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    docs = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "answer": 0}
            for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3)]]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / 'data.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
        """))
    model.save_pretrained(tmp_path / "m")
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["eval", "--model", str(tmp_path / "m"), "--tasks", "tiny_mc", "--include-path",
                              str(tmp_path), "--only-included", "--batch-size", "4", "--output",
                              str(tmp_path / "r.json")])
    assert args.func(args) == 0
    acc = json.loads((tmp_path / "r.json").read_text())["tasks"]["tiny_mc"]["acc,none"]
    # the same accuracy from the model's own log-softmax sums
    want = 0
    for d in docs:
        ll = [direct(model, list(d["question"].encode()), list((" " + c).encode()))[0] for c in d["choices"]]
        want += int(max(range(3), key=ll.__getitem__) == d["answer"])
    assert acc == pytest.approx(want / len(docs))
