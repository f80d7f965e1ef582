"""`mambakit serve`: an OpenAI-style HTTP server with continuous batching.

    engine.py   the decode loop: a pool of state slots, requests joining and leaving at step boundaries
    api.py      FastAPI app: /v1/completions (JSON or SSE), /v1/models, /health; validation and limits

    mambakit serve --model DIR --host 127.0.0.1 --port 8000 [--max-batch 32 --max-queue 64 ...]

From Python: `start_server(model)` runs it in a background thread (for tests, notebooks, benchmarks).
FastAPI and uvicorn are an optional extra: pip install 'mambakit[serve]'.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import torch

from ..generate import eos_ids
from ..model import MambaLM
from .api import Limits, create_app
from .engine import Engine, EngineBusy, EngineClosed, Event, Job

__all__ = ["Engine", "EngineBusy", "EngineClosed", "Event", "Job", "Limits", "create_app", "make_engine",
           "start_server", "ServerHandle", "serve_forever"]


def require_server_extra():
    """uvicorn (and FastAPI), or an ImportError saying which extra to install."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("mambakit serve needs FastAPI and uvicorn: pip install 'mambakit[serve]'") from e
    return uvicorn


def make_engine(model: MambaLM, tokenizer=None, max_batch: int = 32, max_queue: int = 64,
                prefill_chunk: int = 512, warmup: bool = True, fused: bool | None = None) -> Engine:
    """An Engine for `model` (tokenizer: default model.tokenizer; eos from the tokenizer), started. warmup
    runs one prefill and steps of 1, 2 and max_batch rows first (on pool views, as the engine's steps), so the
    first request does not pay for loading the kernels or packing the weights. fused: see Engine."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    eos = eos_ids(None, tokenizer)
    engine = Engine(model, tokenizer, eos, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                    fused=fused)
    if warmup:  # loads every kernel a request will use (contiguous and strided states, small and full batches)
        device = model.lm_head.weight.device
        with torch.inference_mode():
            model(torch.zeros(1, 2, dtype=torch.long, device=device), return_state=True, num_last_tokens=1)
            pool = model.allocate_state(max_batch)
            for b in sorted({1, min(2, max_batch), max_batch}):
                view = type(pool)(pool.conv[:, :b], pool.ssm[:, :b])
                engine.step_fn(torch.zeros(b, dtype=torch.long, device=device), view)
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
    uvicorn = require_server_extra()
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


def serve_forever(model: MambaLM, host: str = "127.0.0.1", port: int = 8000, *, model_name: str = "mambakit",
                  max_batch: int = 32, max_queue: int = 64, prefill_chunk: int = 512, limits: Limits | None = None,
                  log_level: str = "info") -> None:
    """Serves `model` in this thread until interrupted (what `mambakit serve` runs). On SIGINT or SIGTERM
    uvicorn shuts down gracefully, then re-raises the signal: a SIGINT ends here as KeyboardInterrupt,
    after the engine has told its remaining jobs."""
    uvicorn = require_server_extra()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = make_engine(model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk)
    app = create_app(engine, model_name, limits)
    sock = _bind(host, port)
    h, p = sock.getsockname()[:2]
    print(f"mambakit serve: model {model_name!r} ({model.num_parameters():,} parameters, {max_batch} slots) "
          f"on http://{h}:{p}  (docs: /docs, schema: /openapi.json)", flush=True)
    class Server(uvicorn.Server):
        """Records the signals that stop it: uvicorn re-raises them after its graceful shutdown, but from inside
        asyncio.run, whose own SIGINT handling can swallow the KeyboardInterrupt when the serving task has just
        finished (seen under load: exit code 0 after a Ctrl-C)."""

        def handle_exit(self, sig, frame):
            self.stopped_by.append(sig)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=2))
    server.stopped_by = []
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    # reached only when the re-raised signal was lost: end as the signal would have
    if signal.SIGINT in server.stopped_by:
        raise KeyboardInterrupt
    if server.stopped_by:
        signal.signal(server.stopped_by[-1], signal.SIG_DFL)
        signal.raise_signal(server.stopped_by[-1])
