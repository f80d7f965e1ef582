"""`mambakit convert SRC DST --layout hf|official [--dtype ...]`: a checkpoint from one layout to the other."""

from __future__ import annotations

import argparse

from ._common import add_revision_arg, resolve_model

_DTYPES = ("float32", "bfloat16", "float16")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a checkpoint between the official and transformers layouts")
    p.add_argument("src", help="checkpoint directory (either layout; detected from config.json) or a Hub id org/name")
    p.add_argument("dst", help="output directory")
    p.add_argument("--layout", choices=("hf", "official"), default="hf",
                   help="hf: config.json + model.safetensors; official: config.json + pytorch_model.bin")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="cast the weights (default: keep)")
    add_revision_arg(p)
    p.add_argument("--quiet", action="store_true", help="no download progress bars")
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import convert
    from ..model import MambaLM

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    src = resolve_model(args.src, args.revision, args.quiet)
    src_layout, model = convert(MambaLM, src, args.dst, layout=args.layout, dtype=dtype)
    dtype_name = str(model.backbone.embedding.weight.dtype).removeprefix("torch.")
    print(f"converted {args.src} ({src_layout} layout) -> {args.dst} ({args.layout} layout, {dtype_name}, "
          f"{model.num_parameters():,} parameters)")
    return 0
