"""`mambakit eval`: argparse only (transitional: the parser still lives in mambakit.eval)."""

from ..eval import add_cli as add_parser  # noqa: F401
