"""`python -m mambakit.train --key=value …`: the same as `mambakit train`."""

import sys

from ..cli.train import main

sys.exit(main())
