"""`mambakit serve`: an OpenAI-style HTTP server with continuous batching.

    engine.py   the decode loop: a pool of state slots, requests joining and leaving at step boundaries
    api.py      FastAPI app: /v1/completions (JSON or SSE), /v1/models, /health; validation and limits

    mambakit serve --model DIR --host 127.0.0.1 --port 8000 [--max-batch 32 --max-queue 64 ...]

From Python: `start_server(model)` runs it in a background thread (for tests, notebooks, benchmarks).
FastAPI and uvicorn are an optional extra: pip install 'mambakit[serve]'.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

import torch

from ..generate import eos_ids
from ..model import MambaLM
from .api import Limits, create_app
from .engine import Engine, EngineBusy, EngineClosed, Event, Job

__all__ = ["Engine", "EngineBusy", "EngineClosed", "Event", "Job", "Limits", "create_app", "make_engine",
           "start_server", "ServerHandle", "add_cli"]


def _import_uvicorn():
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("mambakit serve needs FastAPI and uvicorn: pip install 'mambakit[serve]'") from e
    return uvicorn


def make_engine(model: MambaLM, tokenizer=None, max_batch: int = 32, max_queue: int = 64,
                prefill_chunk: int = 512, warmup: bool = True) -> Engine:
    """An Engine for `model` (tokenizer: default model.tokenizer; eos from the tokenizer), started. warmup
    runs one prefill and one step first, so the first request does not pay for loading the kernels."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    eos = eos_ids(None, tokenizer)
    engine = Engine(model, tokenizer, eos, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
    if warmup:  # loads every kernel a request will use (a step of 1 row and of a full pool differ)
        device = model.lm_head.weight.device
        with torch.inference_mode():
            model(torch.zeros(1, 2, dtype=torch.long, device=device), return_state=True, num_last_tokens=1)
            for b in sorted({1, max_batch}):
                model.step(torch.zeros(b, dtype=torch.long, device=device), model.allocate_state(b))
    return engine.start()


class ServerHandle:
    """A server running in a background thread: `.url`, `.engine`, `.stop()` (or use `with`)."""

    def __init__(self, server, thread: threading.Thread, engine: Engine, url: str):
        self.server, self.thread, self.engine, self.url = server, thread, engine, url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # port 0: the OS picks a free one
    return sock


def start_server(model: MambaLM, host: str = "127.0.0.1", port: int = 0, *, model_name: str = "mambakit",
                 tokenizer=None, max_batch: int = 32, max_queue: int = 64, prefill_chunk: int = 512,
                 limits: Limits | None = None, log_level: str = "warning") -> ServerHandle:
    """Starts the server in a daemon thread and returns once it accepts connections."""
    uvicorn = _import_uvicorn()
    engine = make_engine(model, tokenizer, max_batch, max_queue, prefill_chunk)
    app = create_app(engine, model_name, limits)
    sock = _bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mambakit-http", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > 30:
            engine.close()
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    h, p = sock.getsockname()[:2]
    return ServerHandle(server, thread, engine, f"http://{h if ':' not in h else f'[{h}]'}:{p}")


# ------------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI-style /v1/completions)")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + weights [+ tokenizer.json])")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--name", default=None, help="the model id clients send (default: the directory's name)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or directory (default: the checkpoint's; 'byte' for the byte tokenizer)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--max-batch", type=int, default=32, help="state slots: sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then 429)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="longer prompts are prefilled in chunks of this many tokens between decode steps")
    p.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens)
    p.add_argument("--max-tokens", type=int, default=Limits.max_tokens, help="limit on a request's max_tokens")
    p.add_argument("--max-n", type=int, default=Limits.max_n, help="limit on a request's n")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from ..tokenizer import ByteTokenizer, load_tokenizer

    uvicorn = _import_uvicorn()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for name in ("max_batch", "max_queue", "prefill_chunk", "max_prompt_tokens", "max_tokens", "max_n",
                 "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model = MambaLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    if args.tokenizer == "byte":
        model.tokenizer = ByteTokenizer()
    elif args.tokenizer is not None:
        model.tokenizer = load_tokenizer(args.tokenizer)
    if model.tokenizer is None:
        print(f"mambakit serve: {args.model} has no tokenizer.json: prompts must be token ids "
              "(or pass --tokenizer PATH / byte)", file=sys.stderr)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_n=args.max_n,
                    max_body_bytes=args.max_body_bytes)
    engine = make_engine(model, max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    name = args.name or os.path.basename(os.path.normpath(args.model))
    app = create_app(engine, name, limits)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"mambakit serve: model {name!r} ({model.num_parameters():,} parameters, {args.max_batch} slots) "
          f"on http://{host}:{port}  (docs: /docs, schema: /openapi.json)", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, lifespan="off",
                                      timeout_graceful_shutdown=2)).run(sockets=[sock])
    finally:
        engine.close()
    return 0
