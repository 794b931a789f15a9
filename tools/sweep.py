#!/usr/bin/env python
"""Run a sweep of steptitan recipes: ``python tools/sweep.py SWEEP.toml`` (= ``steptitan sweep``; docs/sweeps.md).

The code lives in steptitan/experiments/ (spec.py, runner.py, report.py, sweep.py).
"""

import sys

from steptitan.experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main())
