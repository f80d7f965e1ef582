"""`python -m mambakit …` is the `mambakit` command."""

import sys

from .cli import main

sys.exit(main())
