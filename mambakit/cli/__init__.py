"""The `mambakit` command line: thin wrappers over the library (the library is the source of truth).

    mambakit convert SRC DST --layout hf|official [--dtype float32|bfloat16|float16]
    mambakit generate | train | eval | serve | forecast ...   (registered by their modules, see below)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# One module a subcommand (mambakit/cli/<name>.py): each defines `add_parser(subparsers)`, which registers its
# parser with `set_defaults(func=handler)`; the handler takes the parsed args and returns an exit code.
_COMMAND_MODULES: tuple[str, ...] = ("generate", "train", "eval", "serve", "forecast")

_DTYPES = ("float32", "bfloat16", "float16")


def _convert(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import convert

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    src_layout, model = convert(args.src, args.dst, layout=args.layout, dtype=dtype)
    dtype_name = str(model.backbone.embedding.weight.dtype).removeprefix("torch.")
    print(f"converted {args.src} ({src_layout} layout) -> {args.dst} ({args.layout} layout, {dtype_name}, "
          f"{model.num_parameters():,} parameters)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambakit", description="Mamba language models in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert a checkpoint between the official and transformers layouts")
    p.add_argument("src", help="checkpoint directory (either layout; detected from config.json)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--layout", choices=("hf", "official"), default="hf",
                   help="hf: config.json + model.safetensors; official: config.json + pytorch_model.bin")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="cast the weights (default: keep)")
    p.set_defaults(func=_convert)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"mambakit.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError) as e:  # CheckpointError is a ValueError; ImportError:
        # a missing optional extra, whose message says what to install
        print(f"mambakit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
