"""The HTTP layer: OpenAI-style `/v1/completions` (JSON or Server-Sent Events), `/v1/models`, `/health`.

FastAPI handlers run on the event loop and never touch torch: they validate a request, turn it into an
engine Job and await its events, which the engine thread hands over with `loop.call_soon_threadsafe`.
Every way a request can go wrong ends in a 4xx with an OpenAI-shaped error body
({"error": {"message", "type", "param", "code"}}): malformed JSON or fields (400, as OpenAI; never FastAPI's
422, and the OpenAPI schema says so), a body over the size limit (413), an unknown model (404), a wrong method
(405, with Allow), a full queue (429, with Retry-After); 503 if the decode loop is gone.
A client that disconnects (streaming or not) has its job cancelled as soon as the server sees the connection
close, which frees its slots.
"""

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from typing import Union

from ..generate import check_sampling, check_stop
from .engine import Engine, EngineBusy, EngineClosed, Event, Job


@dataclass
class Limits:
    """What one request may ask for (each breach is a 400 naming the limit)."""

    max_prompt_tokens: int = 4096  # per prompt
    max_tokens: int = 2048  # max_tokens (new tokens per sequence)
    max_n: int = 16  # choices per prompt
    max_prompts: int = 16  # prompts per request
    max_sequences: int | None = None  # prompts × n (default: the engine's slots)
    max_stop: int = 8  # stop strings, each at most 256 characters
    max_body_bytes: int = 1 << 20  # the request body


def _import_fastapi():
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError as e:
        raise ImportError("mambakit serve needs FastAPI and uvicorn: pip install 'mambakit[serve]'") from e


def _request_model():
    """The request schema (built lazily: pydantic is an optional dependency)."""
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

    # a Mamba conditions on at least one token: the schema refuses empty prompts as the server does
    Text = Annotated[StrictStr, Field(min_length=1)]
    Ids = Annotated[list[StrictInt], Field(min_length=1)]
    Prompt = Union[Text, Annotated[list[Text], Field(min_length=1)], Ids, Annotated[list[Ids], Field(min_length=1)]]

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        include_usage: StrictBool = False

    class CompletionRequest(BaseModel):
        """POST /v1/completions (OpenAI's fields; top_k, min_p and repetition_penalty are extensions).
        Types are strict: "5" is not a number and true is not 1."""

        model_config = ConfigDict(extra="forbid")
        model: StrictStr | None = None
        prompt: Prompt = Field(description="a string, strings, token ids or lists of them; none empty (and each "
                               "must tokenize to at least one token)")
        max_tokens: StrictInt = Field(16, ge=1)
        temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0)
        top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
        top_k: StrictInt | None = Field(None, ge=1)
        min_p: StrictFloat | None = Field(None, ge=0.0, le=1.0)
        repetition_penalty: StrictFloat = Field(1.0, gt=0.0, le=10.0)
        stop: Union[StrictStr, list[StrictStr], None] = None
        n: StrictInt = Field(1, ge=1)
        seed: StrictInt | None = Field(None, ge=0, le=2**62)
        stream: StrictBool = False
        stream_options: StreamOptions | None = None
        echo: StrictBool = False
        # OpenAI fields this server does not implement: accepted only at their "off" value
        logprobs: int | None = Field(None, description="not supported (must be null)")
        best_of: int | None = Field(None, description="not supported (must be null or 1)")
        presence_penalty: float = Field(0.0, description="not supported (must be 0); see repetition_penalty")
        frequency_penalty: float = Field(0.0, description="not supported (must be 0); see repetition_penalty")
        logit_bias: dict | None = Field(None, description="not supported (must be null)")
        suffix: str | None = Field(None, description="not supported (must be null)")
        user: str | None = None

        @model_validator(mode="after")
        def _unsupported(self):
            off = dict(logprobs=self.logprobs is None, best_of=self.best_of in (None, 1),
                       presence_penalty=self.presence_penalty == 0, frequency_penalty=self.frequency_penalty == 0,
                       logit_bias=not self.logit_bias, suffix=self.suffix is None)
            bad = [k for k, ok in off.items() if not ok]
            if bad:
                raise ValueError(f"{', '.join(bad)}: not supported by this server (leave unset)")
            return self

    return CompletionRequest


def _error_model():
    from pydantic import BaseModel

    class ErrorDetail(BaseModel):
        message: str
        type: str
        param: str | None = None
        code: str | None = None

    class ErrorResponse(BaseModel):
        """Every error the server sends (OpenAI's shape)."""

        error: ErrorDetail

    return ErrorResponse


# what /v1/completions can answer besides 200 (documented in the OpenAPI schema; 422 is never sent)
_ERRORS = {400: "malformed JSON, a field of the wrong type or out of range, a limit exceeded",
           404: "the model is not the one served", 413: "the body exceeds the size limit",
           429: "the queue is full (see Retry-After)", 500: "the generation failed", 503: "the server is shutting down"}


def _error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
           headers: dict | None = None):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": type_, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: reads the whole body (counting, so chunked bodies are bounded too), answers 413
    above the limit, then replays it to the app; later receives (the disconnect) pass through."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = _error(413, f"request body exceeds the server's limit of {self.limit} bytes")
        await response(scope, receive, send)


def create_app(engine: Engine, model_name: str, limits: Limits | None = None):
    """The FastAPI app serving `engine` as model `model_name` (the engine must be started)."""
    _import_fastapi()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    max_sequences = min(limits.max_sequences or engine.max_batch, engine.max_batch)
    CompletionRequest = _request_model()
    ErrorResponse = _error_model()
    tokenizer, vocab = engine.tokenizer, engine.model.config.vocab_size
    created = int(time.time())

    app = FastAPI(title="mambakit", version="1", description="OpenAI-style completions from a Mamba language "
                  "model, with continuous batching.")
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
        if loc and loc[0] == "prompt" and first.get("type") != "missing" and (len(loc) == 1 or not loc[1].isdigit()):
            # the union's branches all fail: say why the one that fits the shape did
            bad_text = [e for e in errors if e.get("type") == "string_unicode"]  # e.g. a lone surrogate
            if bad_text:
                i = next((p for p in bad_text[0]["loc"] if isinstance(p, int)), 0)
                return _error(400, f"prompt[{i}]: cannot be tokenized (not valid Unicode text)", param="prompt")
            if any(e.get("type") in ("string_too_short", "too_short") for e in errors):
                return _error(400, "prompt: must not be empty, nor hold an empty prompt (a Mamba needs at least "
                              "one token to condition on)", param="prompt")
            return _error(400, "prompt: must be a string, a list of strings, a list of token ids or a list of "
                          "token-id lists", param="prompt")
        msg = first.get("msg", "invalid").removeprefix("Value error, ")
        if not loc:  # a whole-body check (e.g. unsupported fields): the message names the field
            return _error(400, msg, param=msg.split(":")[0] if ":" in msg else None)
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return _error(400, f"{'.'.join(loc)}: {msg}{more}", param=loc[0])

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):  # 404, 405 (its Allow header kept), ...
        return _error(exc.status_code, str(exc.detail), type_="invalid_request_error", headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):  # a bug: answer 500, keep serving
        return _error(500, f"internal error: {type(exc).__name__}", type_="server_error")

    @app.get("/health")
    async def health():
        """Liveness and load: slots, active sequences, waiting requests, counters."""
        stats = engine.stats()
        return {"status": "ok" if stats["running"] else "down", "model": model_name, **stats}

    def _model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "mambakit"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != model_name:
            return _error(404, f"model {model_id!r} not found (this server serves {model_name!r})",
                          param="model", type_="not_found_error")
        return _model_card()

    def _prompts(req) -> tuple[list[list[int]], list[str]]:
        """req.prompt → (token ids per prompt, prompt text per prompt for echo (with echo only)). Ids the model
        has and the tokenizer lacks are valid (they are never sampled), but have no text to echo."""
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        elif p and isinstance(p[0], int):
            p = [p]
        if not p:
            raise ValueError("prompt: must not be empty")
        if len(p) > limits.max_prompts:
            raise ValueError(f"prompt: {len(p)} prompts exceed the limit of {limits.max_prompts} per request")
        ids, texts = [], []
        for i, x in enumerate(p):
            if isinstance(x, str):
                if tokenizer is None:
                    raise ValueError("prompt: this server has no tokenizer; send token ids")
                if len(x) > 16 * limits.max_prompt_tokens:  # cheap bound before tokenizing
                    raise ValueError(f"prompt[{i}]: longer than the limit of {limits.max_prompt_tokens} tokens")
                try:
                    t = tokenizer.encode(x)
                except Exception as e:  # e.g. a lone surrogate ("\ud800") that UTF-8 cannot encode
                    raise ValueError(f"prompt[{i}]: cannot be tokenized ({type(e).__name__}: {e})") from None
            else:
                t = list(x)
                bad = [v for v in t if not 0 <= v < vocab]
                if bad:
                    raise ValueError(f"prompt[{i}]: token id {bad[0]} is outside the vocabulary [0, {vocab})")
            if not t:
                raise ValueError(f"prompt[{i}]: is empty (a Mamba needs at least one token)")
            if len(t) > limits.max_prompt_tokens:
                raise ValueError(f"prompt[{i}]: {len(t)} tokens exceed the limit of {limits.max_prompt_tokens}")
            ids.append(t)
            if not req.echo or isinstance(x, str) or tokenizer is None:
                texts.append(x if isinstance(x, str) else "")
                continue
            beyond = [v for v in t if v >= tokenizer.vocab_size]
            if beyond:
                raise ValueError(f"prompt[{i}]: token id {beyond[0]} has no text in the tokenizer's vocabulary "
                                 f"[0, {tokenizer.vocab_size}), so echo cannot show it")
            texts.append(tokenizer.decode(t))
        return ids, texts

    def _job(req, emit) -> tuple[Job, list[list[int]], list[str]]:
        if req.model is not None and req.model != model_name:
            raise LookupError(f"model {req.model!r} not found (this server serves {model_name!r})")
        if req.max_tokens > limits.max_tokens:
            raise ValueError(f"max_tokens: {req.max_tokens} exceeds the limit of {limits.max_tokens}")
        if req.n > limits.max_n:
            raise ValueError(f"n: {req.n} exceeds the limit of {limits.max_n}")
        stop = check_stop(req.stop, tokenizer) if req.stop else []
        if len(stop) > limits.max_stop or any(len(s) > 256 for s in stop):
            raise ValueError(f"stop: at most {limits.max_stop} strings of at most 256 characters")
        ids, texts = _prompts(req)
        if len(ids) * req.n > max_sequences:
            raise ValueError(f"n × prompts = {len(ids) * req.n} sequences exceed the limit of {max_sequences} "
                             "per request")
        params = check_sampling(req.max_tokens, req.temperature, req.top_k, req.top_p if req.top_p < 1 else None,
                                req.min_p, req.repetition_penalty)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**62)
        return Job(ids, req.n, req.max_tokens, params, stop, seed, emit), ids, texts

    @app.post("/v1/completions", responses={k: {"model": ErrorResponse, "description": v} for k, v in _ERRORS.items()})
    async def completions(body: CompletionRequest, request: Request):  # type: ignore[valid-type]
        """Completes the prompt(s): n choices each; `stream: true` sends Server-Sent Events ending with
        `data: [DONE]`. Choice index = prompt index · n + choice."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[list[Event]] = asyncio.Queue()

        def emit(batch: list[Event]) -> None:  # called from the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, batch)
            except RuntimeError:  # the loop is closed (the server has stopped): nobody is waiting
                pass

        try:
            job, ids, texts = _job(body, emit)
        except LookupError as e:
            return _error(404, str(e), param="model", type_="not_found_error")
        except (ValueError, TypeError) as e:
            msg = str(e)
            param = msg.split(":")[0].split("[")[0] if ":" in msg else None
            return _error(400, msg, param=param)
        try:
            engine.submit(job)
        except EngineBusy as e:
            return _error(429, str(e), type_="rate_limit_error", headers={"Retry-After": "1"})
        except EngineClosed as e:
            return _error(503, str(e), type_="server_error")
        rid = f"cmpl-{secrets.token_hex(12)}"
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        prompt_tokens = sum(len(t) for t in ids)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            gen = _stream(job, _Events(events, request, job), base, texts if body.echo else None, prompt_tokens,
                          include_usage, token_ids=tokenizer is None)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(job, _Events(events, request, job), base, texts if body.echo else None,
                              prompt_tokens, token_ids=tokenizer is None)

    default_openapi = app.openapi

    def openapi():
        # FastAPI documents a 422 for every route with parameters; this server answers 400 instead
        schema = default_openapi()  # built once, then cached by FastAPI: the edits below are idempotent
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi
    return app


# ------------------------------------------------------------------------------------- event handling
class _Events:
    """The events of one request's job. A task waits on the connection (ASGI receive) meanwhile: when the
    client goes, the job is cancelled at once (its slots freed at the next step) and `next` returns None.
    (Polling for the disconnect instead cost up to a poll period of decoding for nobody.) `close()` when done."""

    def __init__(self, queue: asyncio.Queue, request, job: Job):
        self.queue, self.job, self.gone = queue, job, False
        self._watch = asyncio.ensure_future(self._watch_disconnect(request.receive))

    async def _watch_disconnect(self, receive) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass  # (the body was read before: nothing else is expected)
        except Exception:  # the connection is unusable: treat it as gone
            pass
        self.gone = True
        self.job.cancel()
        self.queue.put_nowait(None)  # wakes next()

    async def next(self) -> list[Event] | None:
        """The next batch of events, or None once the client has gone."""
        batch = await self.queue.get()
        return None if self.gone else batch

    def close(self) -> None:
        self._watch.cancel()


def _finish(reason: str | None) -> str | None:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


async def _collect(job: Job, events: _Events, base: dict, echo: list[str] | None, prompt_tokens: int,
                   token_ids: bool = False):
    """The whole response. token_ids: also give each choice's token ids (a server without a tokenizer)."""
    k = job.num_sequences
    texts, reasons, ids = [""] * k, [None] * k, [[] for _ in range(k)]
    try:
        while any(r is None for r in reasons):
            batch = await events.next()
            if batch is None:
                return _error(499, "client disconnected")
            for ev in batch:
                if ev.error is not None:
                    job.cancel()
                    return _error(500, f"generation failed: {ev.error}", type_="server_error")
                texts[ev.index] += ev.text
                if ev.token_id is not None:
                    ids[ev.index].append(ev.token_id)
                reasons[ev.index] = ev.finish_reason
    finally:
        events.close()
        job.cancel()  # no-op once finished; frees the slots if the handler was cancelled
    choices = [{"text": (echo[i // job.n] if echo else "") + texts[i], "index": i, "logprobs": None,
                "finish_reason": _finish(reasons[i])} | ({"token_ids": ids[i]} if token_ids else {})
               for i in range(k)]
    n_tokens = sum(map(len, ids))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens, "total_tokens": prompt_tokens + n_tokens}
    return {**base, "choices": choices, "usage": usage}


async def _stream(job: Job, events: _Events, base: dict, echo: list[str] | None, prompt_tokens: int,
                  include_usage: bool, token_ids: bool = False):
    """Server-Sent Events: a chunk per choice per step with new text (with token_ids, every token, its
    id in the chunk: a server without a tokenizer), the final chunk of each choice with its
    finish_reason, the usage chunk if asked, then `data: [DONE]`."""
    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def chunk(index, text, reason, token=None):
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
        if token_ids:
            choice["token_ids"] = [] if token is None else [token]
        c = {**base, "choices": [choice]}
        return sse(c | ({"usage": None} if include_usage else {}))

    k = job.num_sequences
    open_, completion_tokens = set(range(k)), 0
    try:
        if echo:
            for i in range(k):
                yield chunk(i, echo[i // job.n], None)
        while open_:
            batch = await events.next()
            if batch is None:
                return
            for ev in batch:
                if ev.index not in open_:
                    continue
                if ev.error is not None:
                    yield sse({"error": {"message": f"generation failed: {ev.error}", "type": "server_error",
                                         "param": None, "code": None}})
                    job.cancel()
                    open_.clear()
                    break
                completion_tokens += ev.token_id is not None
                if ev.text or ev.finish_reason is not None or (token_ids and ev.token_id is not None):
                    yield chunk(ev.index, ev.text, _finish(ev.finish_reason), ev.token_id)
                if ev.finish_reason is not None:
                    open_.discard(ev.index)
        if include_usage:
            yield sse({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                         "completion_tokens": completion_tokens,
                                                         "total_tokens": prompt_tokens + completion_tokens}})
        yield "data: [DONE]\n\n"
    finally:
        events.close()
        job.cancel()  # the client went away (the generator is closed) or we are done: free the slots
