"""`mambakit serve`: argparse only (transitional: the parser still lives in mambakit.serve)."""

from ..serve import add_cli as add_parser  # noqa: F401
