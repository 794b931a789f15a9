#!/usr/bin/env python
"""Compare two arms of a seeded sweep seed by seed (= ``steptitan paired``; docs/bench/apex_cpt_and_width_growth.md).

The code lives in steptitan/experiments/paired.py.
"""

import sys

from steptitan.experiments.paired import main

if __name__ == "__main__":
    sys.exit(main())
