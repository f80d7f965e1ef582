"""Every option of `mambakit train / eval / forecast` and of the lm-eval adapter either acts or is refused with
an error that names it: a table of bad options (each with the error expected), then the options that used to be
accepted and ignored, shown to act."""

import argparse
import json
import math
import textwrap

import numpy as np
import pytest
import torch

from _models import random_model
from mambakit import ByteTokenizer, cli, generate
from mambakit.cli.eval import add_parser as add_eval
from mambakit.cli.forecast import add_parser as add_forecast
from mambakit.eval import generation_settings, perplexity


@pytest.fixture(scope="module")
def model():
    return random_model(258, tokenizer=ByteTokenizer())


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    """A saved model, a text file, a monthly CSV, and two local lm-eval tasks (multiple choice; rolling)."""
    d = tmp_path_factory.mktemp("bad-options")
    model.save_pretrained(d / "m")
    (d / "t.txt").write_text("To be, or not to be, that is the question.\n" * 3, encoding="utf-8")
    months = np.arange(np.datetime64("2000-01"), np.datetime64("2000-01") + 60)
    (d / "s.csv").write_text("month,y\n" + "".join(f"{m}-01,{10 + math.sin(i / 2):.3f}\n"
                                                   for i, m in enumerate(months)))
    docs = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1)], "answer": 0}
            for a, b in [(1, 2), (3, 4)]]
    (d / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in docs))
    rolling = ["the cat sat on the mat, " * 3 + "the end.", "a b c d e f g h i j k l m n o p"]
    (d / "roll.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in rolling))
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {d / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
        """))
    (tasks / "tiny_roll.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_roll
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {d / 'roll.jsonl'}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: bits_per_byte
        """))
    return d


def _parse(add, argv):
    parser = argparse.ArgumentParser()
    add(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


# --------------------------------------------------------------------------------------- mambakit eval
EVAL_BAD = [  # (options after --model, the error expected)
    (["--ppl", "{t}", "--seed", "5"], "--seed apply to --tasks only, not to --ppl"),
    (["--ppl", "{t}", "--limit", "3"], "--limit apply to --tasks only"),
    (["--ppl", "{t}", "--num-fewshot", "2"], "--num-fewshot apply to --tasks only"),
    (["--ppl", "{t}", "--include-path", "{d}"], "--include-path apply to --tasks only"),
    (["--ppl", "{t}", "--only-included"], "--only-included apply to --tasks only"),
    (["--ppl", "{t}", "--stride", "5"], "--window/--stride: stride=5 needs a window"),
    (["--ppl", "{t}", "--window", "1"], "--window/--stride: window must be an int >= 2"),
    (["--ppl", "{t}", "--window", "8", "--stride", "9"], r"stride must be an int with 1 <= stride <= window \(8\)"),
    (["--ppl", "{t}", "--chunk-tokens", "0"], "--chunk-tokens must be >= 1"),
    (["--tasks", "x", "--limit", "0"], "--limit must be > 0"),
    (["--tasks", "x", "--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
    (["--tasks", "x", "--only-included"], "--only-included needs --include-path"),
]


@pytest.mark.parametrize("argv, message", EVAL_BAD)
def test_eval_refuses(files, argv, message):
    argv = [a.format(t=files / "t.txt", d=files) for a in argv]
    args = _parse(add_eval, ["eval", "--model", str(files / "m"), *argv])
    with pytest.raises(ValueError, match=message):
        args.func(args)


def test_eval_tasks_pass_chunk_tokens_and_refuse_a_window_on_other_tasks(files, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'mambakit[eval]')")
    _offline(monkeypatch, tmp_path)
    import mambakit.eval as ev

    seen, real = [], ev.score
    monkeypatch.setattr(ev, "score", lambda *a, **k: seen.append(a[3] if len(a) > 3 else k["chunk_tokens"])
                        or real(*a, **k))
    base = ["eval", "--model", str(files / "m"), "--include-path", str(files / "tasks"), "--only-included"]
    args = _parse(add_eval, [*base, "--tasks", "tiny_mc", "--chunk-tokens", "3"])
    assert args.func(args) == 0
    assert seen and set(seen) == {3}  # the option reached every scoring call
    args = _parse(add_eval, [*base, "--tasks", "tiny_mc", "--window", "8"])
    with pytest.raises(ValueError, match="window=8 applies to rolling log-likelihood .* loglikelihood requests"):
        args.func(args)


def test_eval_tasks_window_acts_on_rolling_tasks(files, model, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'mambakit[eval]')")
    _offline(monkeypatch, tmp_path)
    texts = [json.loads(line)["text"] for line in (files / "roll.jsonl").read_text().splitlines()]
    base = ["eval", "--model", str(files / "m"), "--include-path", str(files / "tasks"), "--only-included",
            "--tasks", "tiny_roll"]
    got = {}
    for extra in ([], ["--window", "4", "--stride", "2"]):
        args = _parse(add_eval, [*base, *extra, "--output", str(tmp_path / "r.json")])
        assert args.func(args) == 0
        got[bool(extra)] = json.loads((tmp_path / "r.json").read_text())["tasks"]["tiny_roll"]["bits_per_byte,none"]
    for windowed, kw in ((False, {}), (True, dict(window=4, stride=2))):
        nll = sum(perplexity(model, list(t.encode()), prefix_token_id=256, **kw)["nll"] for t in texts)
        want = nll / sum(len(t.encode()) for t in texts) / math.log(2)
        assert got[windowed] == pytest.approx(want, rel=1e-4)  # batched vs one by one: float32 sums
    assert got[True] != pytest.approx(got[False], rel=1e-3)  # windows of 4 tokens lose context: it changed


# ------------------------------------------------------------------------------------------- the adapter
@pytest.fixture(scope="module")
def adapter():
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'mambakit[eval]')")
    from mambakit.eval import register

    return register()


ADAPTER_BAD = [
    (dict(foo=1, bar=2), TypeError, r"unknown argument\(s\) \['bar', 'foo'\]"),
    (dict(dtype="bfloat16"), ValueError, "dtype='bfloat16' applies to pretrained= only"),
    (dict(batch_size="x"), ValueError, "batch_size must be an int >= 1, got 'x'"),
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
    (dict(batch_size=8, max_batch_size=4), ValueError, "max_batch_size=4 only bounds batch_size='auto'"),
    (dict(chunk_tokens="0"), ValueError, "chunk_tokens must be an int >= 1"),
    (dict(max_gen_toks=-3), ValueError, "max_gen_toks must be an int >= 1"),
    (dict(window=1), ValueError, "window must be an int >= 2"),
    (dict(stride=4), ValueError, "stride=4 needs a window"),
    (dict(device="nonsense"), ValueError, "device: 'nonsense' is not a torch device"),
]


@pytest.mark.parametrize("kw, error, message", ADAPTER_BAD)
def test_adapter_refuses(adapter, model, kw, error, message):
    with pytest.raises(error, match=message):
        adapter(model=model, **kw)


def test_adapter_options_act(adapter, model, files):
    assert adapter(model=model, batch_size="auto").batch_size == 16
    assert adapter(model=model, batch_size="auto:4", max_batch_size="5").batch_size == 5
    lm = adapter(model=model, batch_size="3", chunk_tokens="7", max_gen_toks=4.0, device="cpu")
    assert (lm.batch_size, lm.chunk_tokens, lm.max_gen_toks) == (3, 7, 4)
    assert adapter(pretrained=str(files / "m"), dtype="bfloat16").model.lm_head.weight.dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda:0' but CUDA is not available here"):
            adapter(model=model, device="cuda:0")  # lm_eval's own default device


GEN_BAD = [
    ({"num_beams": 4}, r"num_beams=4: mambakit generates without beam search"),
    ({"foo": 1, "typical_p": 0.9}, r"generation kwarg\(s\) \['foo', 'typical_p'\] are not supported"),
    ({"do_sample": False, "top_p": 0.5}, r"top_p=0.5 with do_sample=False: greedy decoding does not sample"),
    ({"do_sample": False, "temperature": 0.7}, r"temperature=0.7 with do_sample=False"),
    ({"do_sample": True, "temperature": 0}, r"do_sample=True with temperature=0"),
    ({"max_gen_toks": 3, "max_new_tokens": 5}, r"generation lengths .* disagree"),
    ({"max_new_tokens": 0}, r"max_new_tokens must be an int >= 1"),
    ({"until": [1]}, r"until must be a string or a list of strings"),
    ({"do_sample": "yes"}, r"do_sample must be true or false"),
    ({"temperature": "hot"}, r"temperature must be a finite number, got 'hot'"),
]


@pytest.mark.parametrize("kw, message", GEN_BAD)
def test_generation_kwargs_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        generation_settings(kw, 256)


def test_generation_kwargs_act(adapter, model):
    class Req:
        def __init__(self, *args):
            self.args = args

    lm = adapter(model=model, max_gen_toks=8)
    cases = [  # the adapter's text must be what generate gives with the honoured settings
        ({"until": ["\n"], "max_new_tokens": 5}, dict(temperature=0)),
        ({"temperature": 0.7}, dict(temperature=0.7, seed=1234)),  # do_sample unset: temperature > 0 samples
        ({"repetition_penalty": 1.5, "max_tokens": 6}, dict(temperature=0, repetition_penalty=1.5)),
        ({"do_sample": True, "min_p": 0.2, "top_k": 5, "seed": 3}, dict(temperature=1.0, min_p=0.2, top_k=5, seed=3)),
        ({"do_sample": False, "temperature": 1.0, "top_p": 1.0, "num_beams": 1}, dict(temperature=0)),  # neutral
    ]
    for gen_kwargs, kw in cases:
        n = next((gen_kwargs[k] for k in ("max_new_tokens", "max_tokens") if k in gen_kwargs), lm.max_gen_toks)
        (text,) = lm.generate_until([Req("Once", gen_kwargs)])
        want = generate(model, ["Once"], n, stop=gen_kwargs.get("until"), **kw).texts[0]
        assert text == want, gen_kwargs
    (a,), (b,) = (lm.generate_until([Req("Once", {"max_gen_toks": 20, **g})])
                  for g in ({}, {"repetition_penalty": 50.0}))
    assert a != b  # the penalty changed the greedy text (it was dropped before)


# ------------------------------------------------------------------------------------- mambakit forecast
FORECAST_BAD = [
    (["--horizon", "0"], "--horizon must be >= 1, got 0"),
    (["--classical"], "--classical adds ETS and ARIMA to the backtest: it needs --backtest N"),
    (["--context", "0"], r"--context must be >= 2 past steps, got 0 \(leave it out for the default\)"),
    (["--context", "1"], "--context must be >= 2 past steps, got 1"),
    (["--backtest", "-1"], "--backtest must be >= 0 windows"),
    (["--max-gap", "-1"], "--max-gap must be >= 0"),
    (["--quantiles", "0.1,half,0.9"], "--quantiles must be comma-separated numbers"),
    (["--seeds", "0"], "--seeds must be >= 1"),
]


@pytest.mark.parametrize("argv, message", FORECAST_BAD)
def test_forecast_refuses(files, argv, message):
    args = _parse(add_forecast, ["forecast", str(files / "s.csv"), "--horizon", "3", *argv])  # the last --horizon wins
    with pytest.raises(ValueError, match=message):
        args.func(args)


def test_forecast_select_help_says_what_it_selects_by():
    parser = argparse.ArgumentParser()
    add_forecast(parser.add_subparsers(dest="command"))
    sub = parser._subparsers._group_actions[0].choices["forecast"]
    (select,) = [a for a in sub._actions if "--select" in a.option_strings]
    assert "validation MASE" in select.help and "validation loss" not in select.help


# ---------------------------------------------------------------------------------------- mambakit train
@pytest.mark.parametrize("argv, message", [
    (["--seed=18446744073709551616"], "TrainConfig.seed must be <= 9223372036854775807"),
    (["--threads=1000000"], "TrainConfig.threads must be <= 4096"),
    (["--bpe_vocab_size=999"], "bpe_vocab_size only applies to tokenizer='bpe'"),
    (["--val_fraction=0.2"], "val_fraction only applies when no val_docs are named"),
    (["--sample_tokens=0", "--sample_prompt=hi"], "sample_prompt only applies with sample_tokens > 0"),
])
def test_train_refuses(argv, message, capsys):
    assert cli.main(["train", *argv]) == 1
    assert message in capsys.readouterr().err
