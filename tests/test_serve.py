"""The HTTP server (mambakit.serve): a real uvicorn server on a loopback port with a tiny random model,
spoken to over HTTP with httpx. Completions and streams equal sequential `generate` with the same seed,
also when many requests share the decode batch; disconnects free slots; bad requests get clear 4xx
answers; a full queue answers 429; a failing step fails its requests, not the server; the CLI starts and stops
on Ctrl-C; every sequence gets exactly one final event, also when the engine closes."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _models import random_model as _random_model
from mambakit import ByteTokenizer, MambaLM, generate  # noqa: E402
from mambakit.cli.serve import add_parser as add_cli  # noqa: E402
from mambakit.serve import Limits, start_server  # noqa: E402


def random_model(seed=0) -> MambaLM:
    """Byte-level vocabulary; every parameter perturbed so that sampled text varies."""
    return _random_model(258, seed=seed, tokenizer=ByteTokenizer())


@pytest.fixture(scope="module")
def model():
    return random_model()


# a request the disconnect tests abandon: long enough that the tiny model (≈ 0.2 ms a step with the fused decode
# step) cannot finish it before the client goes, even on an idle machine
LONG = 200_000


@pytest.fixture(scope="module")
def server(model):
    with start_server(model, max_batch=8, max_queue=64, model_name="tiny",
                      limits=Limits(max_tokens=LONG, max_prompt_tokens=64, max_n=4, max_body_bytes=4096)) as h:
        yield h


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def reference(model, prompt, max_tokens, seed, **kw):
    """What generate gives for this prompt alone (text, finish reason in OpenAI's words)."""
    out = generate(model, [prompt], max_tokens, seed=seed, **kw)
    return out.texts[0], {"eos": "stop", "stop": "stop", "length": "length"}[out.finish_reasons[0]]


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    lines = [ln for ln in text.split("\n\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def wait_idle(client, timeout=10.0) -> dict:
    t0 = time.monotonic()
    while True:
        h = client.get("/health").json()
        if h["active"] == 0 and h["queued"] == 0 or time.monotonic() - t0 > timeout:
            return h
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------ completions
def test_completion_equals_generate_with_the_same_seed(model, client):
    kw = dict(temperature=0.9, top_p=0.95, top_k=40)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["Hello", "The cat"], "n": 2,
                                             "max_tokens": 12, "seed": 42, **kw})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for k, c in enumerate(choices):  # choice k = prompt k // n, seed 42 + k
        text, reason = reference(model, ["Hello", "The cat"][k // 2], 12, 42 + k, **kw)
        assert (c["text"], c["finish_reason"]) == (text, reason)
    assert choices[0]["text"] != choices[1]["text"]  # the two choices of a prompt sample differently
    # usage: each prompt counted once, every generated token counted
    gen = [len(generate(model, ["Hello", "The cat"][k // 2], 12, seed=42 + k, **kw).sequences[0]) for k in range(4)]
    assert body["usage"] == {"prompt_tokens": 5 + 7, "completion_tokens": sum(gen), "total_tokens": 12 + sum(gen)}


def test_greedy_stop_strings_echo_and_token_prompts(model, client):
    free, _ = reference(model, "Once", 20, 0, temperature=0)
    stop = free[5:7]
    r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 20, "temperature": 0,
                                             "stop": [stop, "\x00zz"], "echo": True}).json()
    assert r["choices"][0]["text"] == "Once" + free[: free.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    by_ids = client.post("/v1/completions", json={"prompt": list(b"Once"), "max_tokens": 20,
                                                  "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == free


def test_streaming_sends_the_same_text_then_done(model, client):
    req = {"prompt": ["Stream me", "x"], "n": 2, "max_tokens": 15, "seed": 7, "temperature": 1.0}
    whole = client.post("/v1/completions", json=req).json()
    r = client.post("/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    texts, reasons = [""] * 4, [None] * 4
    for ev in events[:-1]:
        (c,) = ev["choices"]
        assert reasons[c["index"]] is None  # nothing after a choice's final chunk
        texts[c["index"]] += c["text"]
        reasons[c["index"]] = c["finish_reason"]
    assert texts == [c["text"] for c in whole["choices"]]
    assert reasons == [c["finish_reason"] for c in whole["choices"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert len(events) > 8  # streamed piece by piece, not in one chunk


def test_concurrent_requests_share_the_batch_and_equal_sequential_generation(model, server, client):
    prompts = [f"req {i}: " + "ab" * (i % 5) for i in range(14)]  # more requests than the 8 slots
    kws = [dict(temperature=0.8 + 0.05 * (i % 3), top_p=0.9 if i % 2 else 1.0,
                repetition_penalty=1.3 if i % 4 == 0 else 1.0) for i in range(14)]
    steps_before = client.get("/health").json()["steps"]

    def one(i):
        req = {"prompt": prompts[i], "max_tokens": 10 + 3 * i, "seed": 1000 + i, "stream": i % 3 == 0, **kws[i]}
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/v1/completions", json=req)
        assert r.status_code == 200, r.text
        if req["stream"]:
            return "".join(ev["choices"][0]["text"] for ev in sse_events(r.text))
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(14) as pool:
        got = list(pool.map(one, range(14)))
    for i in range(14):
        assert got[i] == reference(model, prompts[i], 10 + 3 * i, 1000 + i, **kws[i])[0], i
    h = wait_idle(client)
    tokens = sum(10 + 3 * i for i in range(14))
    assert h["steps"] - steps_before < tokens / 2  # decoded together: far fewer steps than tokens


def test_client_disconnect_mid_stream_frees_the_slot(server, client):
    before = client.get("/health").json()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "go on", "max_tokens": LONG, "stream": True}) as r:
            it = r.iter_lines()
            got = [next(it) for _ in range(6)]
            assert got[0].startswith("data: ")
            assert client.get("/health").json()["active"] == 1
    h = wait_idle(client)
    assert h["active"] == 0 and h["cancelled"] == before["cancelled"] + 1
    assert h["tokens"] - before["tokens"] < LONG  # stopped early
    assert client.post("/v1/completions", json={"prompt": "still up", "max_tokens": 3}).status_code == 200


def test_a_whole_completion_is_cancelled_as_soon_as_its_client_goes(server, client):
    """Nothing is sent back before a non-streaming completion ends, so only the connection tells that the client
    left: the job is cancelled when it closes (polling for it every 0.5 s decoded ~0.5 s for nobody)."""
    wait_idle(client)
    before = client.get("/health").json()
    body = json.dumps({"prompt": "long", "max_tokens": LONG}).encode()
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    t0 = time.monotonic()
    while client.get("/health").json()["tokens"] - before["tokens"] < 20 and time.monotonic() - t0 < 10:
        time.sleep(0.002)  # decoding
    sock.close()
    gone = time.monotonic()
    while client.get("/health").json()["active"] and time.monotonic() - gone < 10:
        time.sleep(0.002)
    assert time.monotonic() - gone < 0.25
    assert client.get("/health").json()["cancelled"] == before["cancelled"] + 1


def test_client_disconnect_while_waiting_for_a_whole_completion_frees_the_slot(server, client):
    before = client.get("/health").json()
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json={"prompt": "long", "max_tokens": LONG}, timeout=0.3)
    h = wait_idle(client)
    assert h["active"] == 0 and h["cancelled"] == before["cancelled"] + 1
    assert h["tokens"] - before["tokens"] < LONG


def test_a_server_without_tokenizer_answers_with_token_ids(model):
    bare = random_model()
    bare.tokenizer = None
    with start_server(bare, max_batch=4) as h, httpx.Client(base_url=h.url, timeout=30) as c:
        r = c.post("/v1/completions", json={"prompt": [[5, 6, 7], [8]], "max_tokens": 6, "seed": 9}).json()
        for k, p in enumerate([[5, 6, 7], [8]]):
            assert r["choices"][k]["token_ids"] == generate(model, [p], 6, seed=9 + k).sequences[0]
            assert r["choices"][k]["text"] == ""
        assert c.post("/v1/completions", json={"prompt": "text"}).json()["error"]["message"] == (
            "prompt: this server has no tokenizer; send token ids")
        with c.stream("POST", "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2000, "stream": True}) as s:
            assert s.status_code == 200
            data = (json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: "))
            first = [next(data) for _ in range(3)]
            assert all(len(ev["choices"][0]["token_ids"]) == 1 for ev in first)
            assert c.get("/health").json()["active"] == 1  # chunks arrive token by token, while decoding


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"prompt": 5}', 400, "prompt: must be a string"),
    (b'{"max_tokens": 3}', 400, "prompt: Field required"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 300000}', 400, "limit of 200000"),
    (b'{"prompt": "x", "n": 5}', 400, "n: 5 exceeds"),
    (b'{"prompt": ["a","b","c"], "n": 4}', 400, "12 sequences exceed"),
    (b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
    (b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens: Input should be a valid integer"),
    (b'{"prompt": "x", "stream": 1}', 400, "stream: Input should be a valid boolean"),
    (b'[1, 2]', 400, "Input should be a valid dictionary"),
    (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "x", "stop": [""]}', 400, "stop"),
    (b'{"prompt": ""}', 400, "empty"),
    (b'{"prompt": [1, 2, 999]}', 400, "token id 999 is outside"),
    (b'{"prompt": "a\\ud800b"}', 400, "prompt[0]: cannot be tokenized"),
    (b'{"prompt": "' + b"y" * 100 + b'"}', 400, "exceed the limit of 64"),
    (b'{"prompt": "x", "logprobs": 2}', 400, "logprobs: not supported"),
    (b'{"prompt": "x", "bogus": 1}', 400, "bogus: Extra inputs"),
    (b'{"prompt": "x", "model": "gpt-9"}', 404, "not found"),
    (b'{"prompt": "' + b"z" * 5000 + b'"}', 413, "exceeds the server's limit of 4096 bytes"),
])
def test_malformed_requests_get_clear_4xx(client, body, status, words):
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_openapi_documents_the_statuses_and_prompts_the_server_takes(client):
    """The schema says what the server does: errors are 400 with OpenAI's body (never FastAPI's 422), and a
    prompt is never empty (no prompt, nor any of a list's prompts)."""
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (path, method)
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "404", "413", "429", "503"} <= set(responses)
    error = responses["400"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(schema["components"]["schemas"][error]["properties"]) == {"error"}
    r = client.post("/v1/completions", json={"prompt": "x", "temperature": "hot"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}

    prompt = schema["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    for branch in prompt["anyOf"]:
        assert branch.get("minLength") == 1 or branch.get("minItems") == 1, branch
        if "items" in branch:  # a list of strings or of id lists: each non-empty too
            inner = branch["items"]
            assert inner.get("type") == "integer" or inner.get("minLength") == 1 or inner.get("minItems") == 1
    for empty in ("", [], [""], ["a", ""], [[]], [[1], []]):  # (any list: the one error says so)
        r = client.post("/v1/completions", json={"prompt": empty})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt: must not be empty"), empty


def test_a_wrong_method_gets_405_with_allow(client):
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.delete("/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_models_health_and_openapi(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").status_code == 200 and client.get("/v1/models/x").status_code == 404
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["slots"] == 8
    schema = client.get("/openapi.json").json()
    assert "/v1/completions" in schema["paths"] and "CompletionRequest" in json.dumps(schema)


# ---------------------------------------------------------------------------------- overload, failures
def test_full_queue_answers_429_and_cancelled_waiters_leave(model):
    with start_server(model, max_batch=1, max_queue=1, limits=Limits(max_tokens=100_000)) as h, \
            httpx.Client(base_url=h.url, timeout=30) as c:
        long = {"prompt": "busy", "max_tokens": 100_000, "stream": True}
        streams, statuses = [], []
        try:
            for _ in range(4):  # 1 decoding + 1 taken for admission + 1 in the queue, then no room
                s = c.stream("POST", "/v1/completions", json=long)
                r = s.__enter__()
                streams.append(s)
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1"
                    r.read()
                    assert "retry later" in r.json()["error"]["message"]
                    break
                time.sleep(0.2)
            assert statuses[-1] == 429 and all(s == 200 for s in statuses[:-1])
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        health = wait_idle(c)
        assert health["active"] == 0 and health["rejected"] == 1
        assert c.post("/v1/completions", json={"prompt": "free again", "max_tokens": 2}).status_code == 200


def test_a_failing_step_fails_its_requests_not_the_server(model):
    fresh = random_model()
    with start_server(fresh, max_batch=4) as h, httpx.Client(base_url=h.url, timeout=30) as c:
        real_step, calls = h.engine.step_fn, []

        def broken(*a, **kw):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real_step(*a, **kw)

        h.engine.step_fn = broken  # the engine's decode step (fused or not) fails once
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 5})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 5, "seed": 3})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == reference(model, "a", 5, 3)[0]
        assert c.get("/health").json()["errors"] == 1


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_serves_a_checkpoint(tmp_path, model):
    model.save_pretrained(tmp_path / "tiny-ckpt")
    import argparse

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(tmp_path), "--port", "0"])
    assert args.max_batch == 32 and args.host == "127.0.0.1"
    code = ("import argparse,sys; from mambakit.cli.serve import add_parser as add_cli; p=argparse.ArgumentParser(); "
            "add_cli(p.add_subparsers()); a=p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(tmp_path / "tiny-ckpt"), "--port",
                             "0", "--max-batch", "4", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        timer = threading.Timer(90, proc.kill)
        timer.start()
        for line in proc.stdout:
            if "http://" in line:
                break
        timer.cancel()
        url = line.split("on ")[1].split()[0]
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == "tiny-ckpt"
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 6, "seed": 5}).json()
        assert r["choices"][0]["text"] == reference(model, "Hi", 6, 5)[0]
        # Ctrl-C stops it as a foreground server should: gracefully, no traceback, the exit code of an interrupt
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, rest
        assert "Traceback" not in rest and "interrupted, shut down" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(20)


# ---------------------------------------------------------------------------------------------- engine
def test_engine_batched_prefill_and_decode_equal_generate_alone(model):
    """Jobs queued before the loop starts are admitted together: equal-length prompts share one prefill
    call, a prompt longer than prefill_chunk is prefilled in chunks between decode steps, and up to 8
    sequences decode in one step; each still equals generate on its prompt alone."""
    from mambakit.generate import check_sampling
    from mambakit.serve import Engine, Job

    engine = Engine(model, model.tokenizer, {256}, max_batch=8, prefill_chunk=8)
    prompts = [[(7 * i + j) % 256 for j in range(6)] for i in range(5)] + [[1, 2, 3], [9] * 11]
    params = check_sampling(9, 1.1, 50, 0.9, None, 1.0)
    out: dict = {}

    def collector(key):
        def emit(events):
            for e in events:
                out.setdefault((key, e.index), []).append(e.token_id)
        return emit

    jobs = [Job([p], 1, 9, params, [], 100 + i, collector(i)) for i, p in enumerate(prompts[:-1])]
    jobs.append(Job([prompts[-1]], 2, 9, params, [], 500, collector("n2")))
    for j in jobs:
        engine.submit(j)
    with engine:
        t0 = time.monotonic()
        while engine.stats()["tokens"] < 9 * 8 and time.monotonic() - t0 < 30:
            time.sleep(0.01)
    # 6 short sequences start at once; the 11-token prompt takes 2 chunks, so its 2 sequences join one
    # step later (the others decode meanwhile): 9 steps in all for 8 × 9 tokens
    assert engine.stats()["steps"] == 9
    for i, p in enumerate(prompts[:-1]):
        assert out[i, 0] == generate(model, [p], 9, seed=100 + i, temperature=1.1, top_k=50, top_p=0.9,
                                  eos_token_id=256).sequences[0]
    for c in range(2):  # n = 2 choices of one prompt: seeds 500, 501
        assert out["n2", c] == generate(model, [prompts[-1]], 9, seed=500 + c, temperature=1.1, top_k=50, top_p=0.9,
                                       eos_token_id=256).sequences[0]


@pytest.mark.parametrize("fused", [None, False])
def test_engine_takes_the_fused_step_on_its_pool_of_slots(model, fused):
    """With 3 of 8 slots busy the engine steps a view of its pool's first rows, which is not contiguous; the fused
    CPU step reads it in place (every step fused, counted in stats), and each sequence still equals generate on its
    prompt alone. fused=False keeps the reference step throughout."""
    from mambakit.generate import check_sampling
    from mambakit.serve import Engine, Job

    engine = Engine(model, model.tokenizer, {256}, max_batch=8, fused=fused)
    params = check_sampling(7, 0.0, None, None, None, 1.0)
    prompts = [[5, 6, 7], [40, 41], [100, 3, 9, 27]]
    out: dict = {}
    jobs = [Job([p], 1, 7, params, [], 0, lambda ev, i=i: [out.setdefault(i, []).append(e.token_id) for e in ev])
            for i, p in enumerate(prompts)]
    for j in jobs:
        engine.submit(j)
    with engine:
        t0 = time.monotonic()
        while engine.stats()["tokens"] < 7 * 3 and time.monotonic() - t0 < 30:
            time.sleep(0.01)
    stats = engine.stats()
    assert stats["steps"] > 0 and stats["fused_steps"] == (stats["steps"] if fused is None else 0)
    for i, p in enumerate(prompts):
        assert out[i] == generate(model, [p], 7, temperature=0, eos_token_id=256).sequences[0]


def test_engine_close_tells_running_and_waiting_jobs(model):
    from mambakit.generate import check_sampling
    from mambakit.serve import Engine, Job

    engine = Engine(model, model.tokenizer, {256}, max_batch=1).start()
    ends = {}
    params = check_sampling(10**6, 1.0, None, None, None, 1.0)
    jobs = [Job([[1, 2]], 1, 10**6, params, [], i, lambda evs, i=i: ends.update(
        {i: e.error for e in evs if e.finish_reason})) for i in range(2)]
    for j in jobs:
        engine.submit(j)
    while engine.stats()["tokens"] < 5:
        time.sleep(0.01)
    engine.close()
    assert ends == {0: "the server is shutting down", 1: "the server is shutting down"}
    with pytest.raises(Exception, match="not running"):
        engine.submit(jobs[0])


def _recorder():
    """An emit callback that records, per (job name, sequence), each event's finish_reason (None: a token)."""
    events, lock = {}, threading.Lock()

    def for_job(name):
        def emit(evs):
            with lock:
                for e in evs:
                    events.setdefault((name, e.index), []).append(e.finish_reason)
        return emit
    return events, for_job


def test_engine_close_during_a_stuck_step_ends_every_sequence_once(model):
    """close() whose join times out (the loop is inside a step) must not drain the queues beside the loop: the
    loop ends every job itself when the step returns. Each sequence gets exactly one final event, the last."""
    from mambakit.generate import check_sampling
    from mambakit.serve import Engine, Job

    engine = Engine(model, model.tokenizer, {256}, max_batch=1)
    real, hold, inside, release = engine.step_fn, threading.Event(), threading.Event(), threading.Event()

    def step(tokens, state):
        if hold.is_set():
            inside.set()
            release.wait(30)
        return real(tokens, state)

    engine.step_fn = step
    events, emit = _recorder()
    params = check_sampling(10**6, 1.0, None, None, None, 1.0)
    engine.submit(Job([[1, 2], [3, 4]], 1, 10**6, params, [], 0, emit("a")))  # prompt 1 waits for the one slot
    engine.submit(Job([[5]], 1, 10**6, params, [], 1, emit("b")))  # waits in the queue
    engine.start()
    t0 = time.monotonic()
    while engine.stats()["tokens"] < 3 and time.monotonic() - t0 < 30:
        time.sleep(0.002)
    hold.set()
    assert inside.wait(30)
    engine.close(timeout=0.05)  # returns with the loop still inside its step
    release.set()
    engine.close()  # joins the loop
    assert set(events) == {("a", 0), ("a", 1), ("b", 0)}
    for key, reasons in events.items():
        assert [r for r in reasons if r is not None] == ["error"] and reasons[-1] == "error", (key, reasons)


def test_engine_ends_finished_and_cancelled_sequences_once(model):
    """A sequence that has ended (eos) is not ended again when the engine closes; a cancelled job gets one
    "cancelled" event per sequence."""
    from mambakit.generate import check_sampling
    from mambakit.serve import Engine, Job

    p0, p1 = [7, 8, 9], [1, 2]
    eos = generate(model, [p0], 1, temperature=0).sequences[0][0]  # p0 ends at its first token
    assert eos not in generate(model, [p1], 1000, temperature=0, eos_token_id=[]).sequences[0]  # p1 never does
    events, emit = _recorder()
    params = check_sampling(10**6, 0.0, None, None, None, 1.0)
    engine = Engine(model, model.tokenizer, {eos}, max_batch=3).start()
    engine.submit(Job([p0, p1], 1, 10**6, params, [], 0, emit("a")))
    gone = engine.submit(Job([p1], 1, 10**6, params, [], 0, emit("gone")))
    t0 = time.monotonic()
    while engine.stats()["tokens"] < 10 and time.monotonic() - t0 < 30:
        time.sleep(0.002)
    gone.cancel()
    while engine.stats()["cancelled"] < 1 and time.monotonic() - t0 < 30:
        time.sleep(0.002)
    engine.close()
    assert events["a", 0] == ["eos"]
    finals = {key: [r for r in reasons if r is not None] for key, reasons in events.items()}
    assert finals == {("a", 0): ["eos"], ("a", 1): ["error"], ("gone", 0): ["cancelled"]}
