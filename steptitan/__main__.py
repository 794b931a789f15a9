"""``python -m steptitan ...``: the ``steptitan`` console script (steptitan/cli.py)."""

import sys

from steptitan.cli import main

sys.exit(main())
