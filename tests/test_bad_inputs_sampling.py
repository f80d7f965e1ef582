"""Bad and extreme sampling inputs, table-driven, through the library (`generate`) and the server (HTTP).

Each row says what must happen: refused with an error that names the argument, or (a valid value at the edge of
the float range) the result its limit gives: a tiny temperature or top_p is greedy, a tiny repetition penalty
makes the largest seen positive logit win. Never padding, never a crash or a 500.

`library_outcome` and `http_outcome` classify a row ("refused", "honoured", "crashed", "silent"); the tests
require "refused" or "honoured" as the row says, and the same functions counted the old code's failures."""

import math

import pytest
import torch

from _models import random_model
from mambakit import ByteTokenizer, generate

# the model's vocabulary (300) is larger than the tokenizer's (258): ids in [258, 300) are valid prompt ids
# that are never sampled
VOCAB, TOK_VOCAB = 300, 258
PROMPTS = [[5, 17, 3, 40, 22], [12, 7]]
BASE = dict(prompts=PROMPTS, max_new_tokens=8)


@pytest.fixture(scope="module")
def model():
    return random_model(VOCAB, seed=11, tokenizer=ByteTokenizer())


def _call(model, kw):
    args = {**BASE, **kw}
    return generate(model, args.pop("prompts"), args.pop("max_new_tokens"), **args)


# ------------------------------------------------------------------------------------------ the checks
def _greedy(model, out, kw):
    """The same tokens as temperature 0 (the rows' logits have no ties at their maximum)."""
    ref = {k: v for k, v in kw.items() if k not in ("temperature", "top_p", "min_p", "seed")}
    return out.sequences == _call(model, {**ref, "temperature": 0}).sequences


def _limit_of_penalty(model, out, kw):
    """Teacher forcing: every token is the one the penalty's exact arithmetic (float64, no overflow in the
    reference: a seen positive logit l becomes l / p) picks. With a tiny p, among the tokens seen so far
    with a positive logit the largest wins; with none, the step is checked only when greedy."""
    p, greedy = kw["repetition_penalty"], kw.get("temperature", 1.0) == 0
    prompts, checked = kw.get("prompts", PROMPTS), 0
    for prompt, seq in zip(prompts, out.sequences):
        logits = model(torch.tensor([prompt + seq])).logits[0, len(prompt) - 1:, :TOK_VOCAB].double()
        for t, tok in enumerate(seq):
            row, seen = logits[t], torch.zeros(TOK_VOCAB, dtype=torch.bool)
            seen[[i for i in prompt + seq[:t] if i < TOK_VOCAB]] = True
            pos = seen & (row > 0)
            if p < 1 and pos.any() and not torch.isfinite(row[pos] / p).all():  # beyond float64: the limit
                want = row.masked_fill(~pos, -math.inf)
            elif p < 1 and pos.any() or greedy:
                want = torch.where(seen, torch.where(row > 0, row / p, row * p), row)
            else:
                continue  # a draw among tokens of finite weight: nothing to pin
            if tok != int(want.argmax()):
                return False
            checked += 1
    return checked >= len(out.sequences)


def _same_as(**other):
    def check(model, out, kw):
        return out.sequences == _call(model, {**kw, **other}).sequences
    return check


def _uniform(model, out, kw):
    """An enormous temperature flattens the distribution: many different tokens, all decodable."""
    toks = [t for s in out.sequences for t in s]
    return len(set(toks)) >= len(toks) // 2 and all(0 <= t < TOK_VOCAB for t in toks)


def _decodable(model, out, kw):
    """Every row ran to its end (max_new_tokens or eos) with ids the tokenizer decodes."""
    return all(len(s) == BASE["max_new_tokens"] or r == "eos" for s, r in zip(out.sequences, out.finish_reasons)) \
        and all(0 <= t < TOK_VOCAB for s in out.sequences for t in s)


def _pad_beyond_the_tokenizer(model):
    """kwargs where a row that ends (its eos) is fed pad_token_id 290, beyond the ids the sampler covers (258),
    while a repetition penalty records the tokens each row has seen."""
    free = _call(model, dict(temperature=0, repetition_penalty=1.3))
    return dict(temperature=0, repetition_penalty=1.3, pad_token_id=290, eos_token_id=free.sequences[1][1])


def _rows_cut_at_eos(model, out, kw):
    """Rows never interact: each is its own free run cut after its first eos, then padded with the pad id."""
    free = _call(model, dict(temperature=0, repetition_penalty=1.3))
    eos, ok = kw["eos_token_id"], True
    for i, seq in enumerate(free.sequences):
        want = seq[: seq.index(eos) + 1] if eos in seq else seq
        ok &= out.sequences[i] == want and bool(out.tokens[i, len(want):].eq(290).all())
    return ok and len(out.sequences[1]) < BASE["max_new_tokens"]  # row 1 did end early: the pad was fed


# ------------------------------------------------------------------------------------------- the table
NAN, INF = math.nan, math.inf
# (kwargs over BASE, exception type, words the message must hold)
LIBRARY_REFUSED = [
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=1.5), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=True), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=None), ValueError, "max_new_tokens"),
    (dict(max_new_tokens="4"), ValueError, "max_new_tokens"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=-1e-300), ValueError, "temperature"),
    (dict(temperature=NAN), ValueError, "temperature"),
    (dict(temperature=INF), ValueError, "temperature"),
    (dict(temperature=10**400), ValueError, "temperature"),  # an int no float holds
    (dict(temperature="1"), ValueError, "temperature"),
    (dict(temperature=True), ValueError, "temperature"),
    (dict(temperature=None), ValueError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=-3), ValueError, "top_k"),
    (dict(top_k=2.5), ValueError, "top_k"),
    (dict(top_k=True), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=-0.5), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=NAN), ValueError, "top_p"),
    (dict(top_p=True), ValueError, "top_p"),
    (dict(top_p="0.9"), ValueError, "top_p"),
    (dict(min_p=-0.1), ValueError, "min_p"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(min_p=NAN), ValueError, "min_p"),
    (dict(min_p=True), ValueError, "min_p"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=-1.0), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=INF), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=NAN), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=10**400), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=True), ValueError, "repetition_penalty"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(seed=[1]), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(seed=True), ValueError, "seed"),
    (dict(pad_token_id=10**9), ValueError, "pad_token_id"),
    (dict(pad_token_id="0"), ValueError, "pad_token_id"),
    (dict(pad_token_id=-1), ValueError, "pad_token_id"),
    (dict(eos_token_id=-1), ValueError, "eos_token_id"),
    (dict(stop=[None]), ValueError, "stop"),
    (dict(stop=""), ValueError, "stop"),
    (dict(stream="no"), TypeError, "stream"),
    (dict(compile="no"), TypeError, "compile"),
    (dict(fused="yes"), TypeError, "fused"),
    (dict(tokenizer=5), TypeError, "tokenizer"),
    (dict(prompts=[[1, VOCAB]]), ValueError, "outside the model's vocabulary"),
    (dict(prompts=[[]]), ValueError, "prompt 0 is empty"),
    (dict(prompts=[[1.5]]), TypeError, "prompt 0"),
    (dict(prompts=[[True]]), TypeError, "prompt 0"),
]

# (id, kwargs over BASE, check): valid values at the edges, each honoured as its limit
LIBRARY_HONOURED = [
    ("temperature=1e-300", dict(temperature=1e-300, seed=0), _greedy),
    ("temperature=5e-324", dict(temperature=5e-324, seed=0), _greedy),
    ("temperature=1e-40", dict(temperature=1e-40, seed=0), _greedy),  # below float32's normal range
    ("temperature=-0.0", dict(temperature=-0.0), _greedy),
    ("temperature=1e300", dict(temperature=1e300, seed=0, max_new_tokens=16), _uniform),
    ("top_p=1e-300", dict(top_p=1e-300, seed=0), _greedy),
    ("top_p=5e-324", dict(top_p=5e-324, seed=0), _greedy),
    ("top_p=1e-300,temperature=1e-300", dict(top_p=1e-300, temperature=1e-300, seed=0), _greedy),
    ("min_p=1", dict(min_p=1.0, seed=0), _greedy),
    ("min_p=5e-324", dict(min_p=5e-324, seed=3), _same_as(min_p=None)),
    ("top_k=10**30", dict(top_k=10**30, seed=3), _same_as(top_k=None)),
    ("penalty=1e-300,greedy", dict(repetition_penalty=1e-300, temperature=0), _limit_of_penalty),
    ("penalty=5e-324,greedy", dict(repetition_penalty=5e-324, temperature=0), _limit_of_penalty),
    ("penalty=1e-300", dict(repetition_penalty=1e-300, seed=0), _limit_of_penalty),
    ("penalty=5e-324", dict(repetition_penalty=5e-324, seed=0), _limit_of_penalty),
    ("penalty=1e300,greedy", dict(repetition_penalty=1e300, temperature=0), _limit_of_penalty),
    ("prompt ids beyond the tokenizer, penalty", dict(prompts=[[1, 2, 280, 299]], repetition_penalty=1.3, seed=0),
     _decodable),
    ("prompt ids beyond the tokenizer, penalty, greedy",
     dict(prompts=[[1, 2, 280, 299]], repetition_penalty=1.3, temperature=0), _limit_of_penalty),
    ("pad id beyond the tokenizer, penalty", _pad_beyond_the_tokenizer, _rows_cut_at_eos),
]


# ------------------------------------------------------------------------------------- classification
def library_outcome(model, kw, expect) -> str:
    """"refused" (the expected exception, naming the argument), "honoured" (returned and the check holds),
    "crashed" (another exception, or a message that does not name it), "silent" (returned, and wrongly:
    a bad value accepted, or a check that fails)."""
    exc, words = (expect if isinstance(expect, tuple) else (None, None))
    kw = kw(model) if callable(kw) else kw  # a row whose arguments depend on the model's outputs
    try:
        out = _call(model, kw)
    except Exception as e:  # noqa: BLE001 (classifying is the point)
        return "refused" if exc is not None and isinstance(e, exc) and words in str(e) else "crashed"
    if exc is not None:
        return "silent"
    return "honoured" if expect(model, out, kw) else "silent"


def _name(body) -> str:
    return (body.decode() if isinstance(body, bytes) else ",".join(f"{k}={v!r}" for k, v in body.items()))[:60]


@pytest.mark.parametrize("kw, exc, words", [pytest.param(*row, id=_name(row[0])) for row in LIBRARY_REFUSED])
def test_library_refuses_bad_sampling_inputs_by_name(model, kw, exc, words):
    with pytest.raises(exc, match=words):  # (pytest shows what was raised instead, when it fails)
        _call(model, kw)
    assert library_outcome(model, kw, (exc, words)) == "refused"


@pytest.mark.parametrize("kw, check", [pytest.param(kw, check, id=name) for name, kw, check in LIBRARY_HONOURED])
def test_library_honours_extreme_sampling_values_as_their_limit(model, kw, check):
    assert library_outcome(model, kw, check) == "honoured"


def test_non_finite_logits_are_refused_not_sampled():
    """A model whose logits are NaN (a NaN weight) would otherwise 'sample' the last id, the padding."""
    broken = random_model(VOCAB, seed=12, tokenizer=ByteTokenizer())
    with torch.no_grad():
        broken.lm_head.weight[7, 0] = math.nan
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=0), dict(repetition_penalty=1.3, seed=0)):
        with pytest.raises(ValueError, match="model: its logits for row 0 are not finite"):
            _call(broken, kw)


def test_the_table_covers_every_sampling_argument():
    import inspect

    named = {k for kw, _, _ in LIBRARY_REFUSED for k in kw}
    args = set(inspect.signature(generate).parameters) - {"model"}
    assert args <= named, f"no bad-input row for {sorted(args - named)}"


# ---------------------------------------------------------------------------------------------- HTTP
# (body fields over {"prompt": "Hi"}, status, words the error message must hold)
HTTP_REFUSED = [
    (dict(temperature=-1), 400, "temperature"),
    (dict(temperature=2.5), 400, "temperature"),
    (dict(temperature="1"), 400, "temperature"),
    (dict(temperature=True), 400, "temperature"),
    (dict(temperature=None), 400, "temperature"),
    (b'{"prompt": "Hi", "temperature": NaN}', 400, "temperature"),
    (b'{"prompt": "Hi", "temperature": Infinity}', 400, "temperature"),
    (b'{"prompt": "Hi", "temperature": 1e400}', 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(top_p=1.5), 400, "top_p"),
    (dict(top_p=-1), 400, "top_p"),
    (b'{"prompt": "Hi", "top_p": 1e-400}', 400, "top_p"),  # parses as 0.0
    (b'{"prompt": "Hi", "top_p": NaN}', 400, "top_p"),
    (dict(top_k=0), 400, "top_k"),
    (dict(top_k=1.5), 400, "top_k"),
    (dict(min_p=2), 400, "min_p"),
    (dict(min_p=-0.5), 400, "min_p"),
    (dict(repetition_penalty=0), 400, "repetition_penalty"),
    (dict(repetition_penalty=11), 400, "repetition_penalty"),
    (dict(repetition_penalty=-1), 400, "repetition_penalty"),
    (b'{"prompt": "Hi", "repetition_penalty": NaN}', 400, "repetition_penalty"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(max_tokens=10**6), 400, "max_tokens"),
    (dict(seed=-1), 400, "seed"),
    (dict(seed=2**63), 400, "seed"),
    (dict(n=0), 400, "n: "),
    (dict(stop=[""]), 400, "stop"),
    (dict(prompt=""), 400, "prompt"),
    (dict(prompt=[]), 400, "prompt"),
    (dict(prompt=[[]]), 400, "prompt"),
    (dict(prompt=["a", ""]), 400, "prompt"),
    (dict(prompt=[1, VOCAB]), 400, f"token id {VOCAB} is outside"),
    (dict(prompt=[-1]), 400, "token id -1 is outside"),
    (b'{"prompt": ["ok", "a\\ud800"]}', 400, "prompt[1]: cannot be tokenized"),  # a lone surrogate
    (dict(prompt=[72, 280], echo=True), 400, "prompt[0]: token id 280 has no text"),  # valid, but not echoed
    (dict(logit_bias={"1": 2}), 400, "logit_bias"),
]

# (id, body fields over {"prompt": "Hi", "max_tokens": 8, "seed": 0}, the generate kwargs it must equal)
HTTP_HONOURED = [
    ("temperature=1e-300", dict(temperature=1e-300), "greedy"),
    ("temperature=5e-324", dict(temperature=5e-324), "greedy"),
    ("top_p=1e-300", dict(top_p=1e-300), "greedy"),
    ("top_p=5e-324", dict(top_p=5e-324), "greedy"),
    ("penalty=1e-300", dict(repetition_penalty=1e-300), None),
    ("penalty=5e-324", dict(repetition_penalty=5e-324), None),
    ("penalty=1e-300,greedy", dict(repetition_penalty=1e-300, temperature=0), None),
    ("prompt ids beyond the tokenizer, penalty", dict(prompt=[72, 105, 280, 299], repetition_penalty=1.3), None),
]


def http_outcome(client, model, body, expect) -> str:
    """Like library_outcome, for a request: "refused" (the expected 4xx naming the field), "honoured" (200
    and the text generate gives, never empty), "crashed" (a 5xx, or a 4xx not naming the field), "silent"."""
    import json

    raw = body if isinstance(body, bytes) else json.dumps({"prompt": "Hi", "max_tokens": 8, "seed": 0, **body})
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    if isinstance(expect, tuple):
        status, words = expect
        if r.status_code == status and words in r.json()["error"]["message"]:
            return "refused"
        return "silent" if r.status_code == 200 else "crashed"
    if r.status_code != 200:
        return "crashed"
    sent = json.loads(raw)
    kw = dict(temperature=sent.get("temperature", 1.0), top_p=sent.get("top_p"),
              repetition_penalty=sent.get("repetition_penalty", 1.0))
    if expect == "greedy":
        kw = dict(temperature=0)
    prompt = sent["prompt"]
    want = generate(model, [prompt], 8, seed=0, **kw)
    (choice,) = r.json()["choices"]
    # with a tokenizer the text is what counts; the ids of the padding decode to "" (the old failure)
    return "honoured" if choice["text"] == want.texts[0] and choice["text"] != "" else "silent"


@pytest.fixture(scope="module")
def client(model):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from mambakit.serve import Limits, start_server

    with start_server(model, max_batch=4, limits=Limits(max_tokens=64)) as h, \
            httpx.Client(base_url=h.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("body, status, words", [pytest.param(*row, id=_name(row[0])) for row in HTTP_REFUSED])
def test_server_refuses_bad_sampling_inputs_by_name(client, model, body, status, words):
    assert http_outcome(client, model, body, (status, words)) == "refused"


@pytest.mark.parametrize("body, expect", [pytest.param(b, e, id=name) for name, b, e in HTTP_HONOURED])
def test_server_honours_extreme_sampling_values_as_their_limit(client, model, body, expect):
    assert http_outcome(client, model, body, expect) == "honoured"
