#!/usr/bin/env python
"""The benchmark: ``python tools/bench.py`` (= ``steptitan bench``; docs/benchmark.md).

The code lives in steptitan/experiments/bench.py and bench_report.py.
"""

import sys

from steptitan.experiments.bench import main

if __name__ == "__main__":
    sys.exit(main())
