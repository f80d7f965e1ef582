"""`mambakit quantize SRC DST --bits 8|4 [--group-size G] [--dtype ...]`: a checkpoint with int8/int4 weights
(mambakit/quantize.py); MambaLM.from_pretrained(DST) loads it quantized."""

from __future__ import annotations

import argparse

from ._common import add_revision_arg, resolve_model

_DTYPES = ("float32", "bfloat16")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="quantize a checkpoint's weights to int8 or int4 (weight-only)")
    p.add_argument("src", help="checkpoint directory (either layout) or a Hub id org/name")
    p.add_argument("dst", help="output directory (config.json with a 'quantization' entry + model.safetensors)")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True,
                   help="8: int8, one scale per output row; 4: int4, one scale per group of inputs")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per int4 scale (even; default 32); not for --bits 8")
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="dtype of the tensors that stay floating point (default: the checkpoint's)")
    add_revision_arg(p)
    p.add_argument("--quiet", action="store_true", help="no download progress bar")
    p.set_defaults(func=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..model import MambaLM
    from ..quantize import is_quantized, quantize

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    if args.bits == 8 and args.group_size is not None:
        raise ValueError("--group-size applies to --bits 4 only (int8 has one scale per output row)")
    src = resolve_model(args.src, args.revision, args.quiet)
    if Path(args.dst).expanduser().resolve() == Path(src).expanduser().resolve():
        raise ValueError("dst must differ from src (the float checkpoint would be replaced)")
    # the Python equivalent: quantize(MambaLM.from_pretrained(src), bits, group_size).save_pretrained(dst)
    model = MambaLM.from_pretrained(src, dtype=dtype)
    if is_quantized(model):
        raise ValueError(f"{args.src} is quantized already ({model.quantization})")
    quantize(model, args.bits, args.group_size)
    model.save_pretrained(args.dst)
    q = model.quantization
    group = f", groups of {q['group_size']}" if q["bits"] == 4 else ", per output channel"
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"quantized {args.src} -> {args.dst} (int{q['bits']}{group}; {', '.join(q['modules'])}; "
          f"{nbytes / 2**20:.1f} MiB of tensors)")
    return 0
