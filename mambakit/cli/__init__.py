"""The `mambakit` command line: argparse only, thin wrappers over the library (the library is the source of truth).

    mambakit convert | quantize | generate | train | eval | serve | forecast ...   (one module a subcommand, mambakit/cli/)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# One module a subcommand (mambakit/cli/<name>.py): each defines `add_parser(subparsers)`, which registers its
# parser with `set_defaults(func=handler)`; the handler takes the parsed args and returns an exit code.
_COMMAND_MODULES: tuple[str, ...] = ("convert", "quantize", "generate", "train", "eval", "serve", "forecast")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambakit", description="Mamba language models in PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(f"mambakit.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # torch and numba's kernels share one OpenMP runtime. Its default wait policy keeps idle threads spinning after
    # each parallel region; when the cores are shared (other processes, DDP ranks, CI) a spinning thread starves
    # the thread a region waits for, and steps slow down 10× and more (docs/engine.md). The command line opts in
    # to passive waiting before torch is first imported (the runtime reads it once, at load); a value the user
    # set is kept. Importing the library (or this module) changes nothing.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError) as e:  # CheckpointError is a ValueError; ImportError:
        # a missing optional extra, whose message says what to install
        print(f"mambakit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
