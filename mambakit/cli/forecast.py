"""`mambakit forecast`: argparse only (transitional: the parser still lives in mambakit.forecast)."""

from ..forecast import add_cli as add_parser  # noqa: F401
