"""`mambakit serve`: an OpenAI-style HTTP server over a checkpoint (argparse only; see mambakit.serve)."""

from __future__ import annotations

import os
import sys

from ._common import add_model_args, check_positive, load_model, set_threads


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint over HTTP (OpenAI-style /v1/completions)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--name", default=None,
                   help="the model id clients send (default: the directory's name, or the Hub id)")
    p.add_argument("--max-batch", type=int, default=32, help="state slots: sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then 429)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="longer prompts are prefilled in chunks of this many tokens between decode steps")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="limit on a prompt's tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="limit on a request's max_tokens")
    p.add_argument("--max-n", type=int, default=None, help="limit on a request's n")
    p.add_argument("--max-body-bytes", type=int, default=None, help="limit on a request body's size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-huge-pages", action="store_true",
                   help="leave the weights in ordinary pages (default: moved into 2 MiB pages for decoding)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    try:
        return _serve(args)
    except KeyboardInterrupt:
        # Ctrl-C is how a foreground server is stopped: uvicorn has shut down gracefully and re-raised the
        # signal (so does a Ctrl-C while loading). Exit as an interrupted process does, without a traceback.
        print("mambakit serve: interrupted, shut down", file=sys.stderr)
        return 130


def _default_name(model: str) -> str:
    """A Hub id names itself (as OpenAI-style servers call models "org/name"); a directory by its last part."""
    from ..hub import is_hub_id

    if not os.path.lexists(model) and is_hub_id(model):
        return model
    return os.path.basename(os.path.normpath(model))


def _serve(args) -> int:
    from ..engine import use_huge_pages
    from ..serve import Limits, require_server_extra, serve_forever

    require_server_extra()  # a missing extra fails before the model is loaded
    set_threads(args)
    limits = Limits(**{k: getattr(args, k) if getattr(args, k) is not None else getattr(Limits, k)
                       for k in ("max_prompt_tokens", "max_tokens", "max_n", "max_body_bytes")})
    check_positive(args, "max_batch", "max_queue", "prefill_chunk")
    for k in ("max_prompt_tokens", "max_tokens", "max_n", "max_body_bytes"):
        if getattr(limits, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(limits, k)}")
    model = load_model(args)
    if model.tokenizer is None:
        print(f"mambakit serve: {args.model} has no tokenizer.json: prompts must be token ids "
              "(or pass --tokenizer PATH / byte)", file=sys.stderr)
    if not args.no_huge_pages:
        use_huge_pages(model)  # the server decodes every step: 2 MiB pages stream the weights faster
    serve_forever(model, args.host, args.port, model_name=args.name or _default_name(args.model),
                  max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, limits=limits,
                  log_level=args.log_level)
    return 0
