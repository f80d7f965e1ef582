"""What the subcommands share: the one model loader (a checkpoint directory or a Hugging Face Hub id, its
tokenizer or an override) and argument checks."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, dtypes=("float32", "bfloat16")) -> None:
    """--model, --revision, --tokenizer, --dtype and --quiet, as every command that loads a checkpoint takes them."""
    p.add_argument("--model", required=True,
                   help="checkpoint directory (config.json + weights [+ tokenizer.json]), or a Hugging Face Hub id "
                        "org/name (downloaded into the Hub's cache; HF_HUB_OFFLINE=1: from the cache only)")
    add_revision_arg(p)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or directory (default: the checkpoint's; 'byte' for the byte tokenizer)")
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal anyway)")


def add_revision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None, help="with a Hub id: the branch, tag or commit (default: main)")


def resolve_model(name: str, revision: str | None, quiet: bool = False):
    """The local directory of a checkpoint argument: a path as it is, a Hub id downloaded (mambakit.hub)."""
    from ..hub import resolve

    return resolve(name, revision=revision, progress=False if quiet else None)


def load_model(args: argparse.Namespace, need_tokenizer: bool = False):
    """The MambaLM of args.model in args.dtype, with args.tokenizer ('byte', a path, or None: the checkpoint's)
    as model.tokenizer; ValueError when need_tokenizer and there is none."""
    import torch

    from ..model import MambaLM
    from ..tokenizer import ByteTokenizer, load_tokenizer

    directory = resolve_model(args.model, args.revision, args.quiet)
    model = MambaLM.from_pretrained(directory, dtype=getattr(torch, args.dtype))
    if args.tokenizer == "byte":
        model.tokenizer = ByteTokenizer()
    elif args.tokenizer is not None:
        model.tokenizer = load_tokenizer(args.tokenizer)
    if need_tokenizer and model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json: pass --tokenizer PATH (or --tokenizer byte)")
    return model


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """ValueError naming the first of the options `names` (attribute names) that is < 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
