"""`mambakit train`: every TrainConfig field as an option --key=value, plus --config=FILE (the training itself
is mambakit.train)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..train import NonFiniteLossError, TrainConfig, config_from_args, train
from ..train.distributed import teardown_processes


def _run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    if args.quiet:
        if args.progress is not None:
            raise ValueError("--quiet turns the progress bar off: leave out --progress")
        overrides["progress"] = False
    try:
        train(config_from_args(args.config, overrides))
    except (TypeError, NonFiniteLossError) as e:  # the rest (ValueError, FileNotFoundError) mambakit.cli reports
        print(f"mambakit train: error: {e}", file=sys.stderr)
        return 1
    finally:
        teardown_processes()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a Mamba language model (torchrun --nproc_per_node=N for several processes)",
        description="Train a Mamba LM. Every TrainConfig field is an option --key=value; a TOML/JSON file "
                    "(--config) sets many at once; the command line wins.", allow_abbrev=False)
    p.add_argument("--config", help="a .toml or .json file of TrainConfig fields")
    for name, f in TrainConfig.__dataclass_fields__.items():
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        # None = not given, so that a --config file's value stands; a bare --flag of a bool field means true
        bool_field = f.type in (bool, "bool")
        p.add_argument(f"--{name}", default=None, nargs="?" if bool_field else None,
                       const="true" if bool_field else None, metavar="VALUE", help=f"(default: {default!r})")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the same as --progress=false)")
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    """`python -m mambakit.train --key=value …` (mambakit/train/__main__.py): `mambakit train` alone."""
    parser = argparse.ArgumentParser(prog="mambakit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
