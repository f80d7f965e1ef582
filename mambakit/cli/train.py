"""`mambakit train`: argparse only (transitional: the parser still lives in mambakit.train)."""

from ..train import add_cli as add_parser  # noqa: F401
