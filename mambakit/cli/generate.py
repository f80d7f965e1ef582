"""`mambakit generate`: argparse only (transitional: the parser still lives in mambakit.generate)."""

from ..generate import add_cli as add_parser  # noqa: F401
