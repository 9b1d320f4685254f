"""`python -m qatfx ...`: the same as the `qatfx` command."""

import sys

from qatfx.cli import main

sys.exit(main())
