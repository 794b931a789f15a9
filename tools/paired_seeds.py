#!/usr/bin/env python
"""Compare two arms of a seeded sweep seed by seed (= ``steptitan paired``; docs/bench/issue14.md).

The code lives in steptitan/experiments/paired.py.
"""

import sys

from steptitan.experiments.paired import main

if __name__ == "__main__":
    sys.exit(main())
