#!/usr/bin/env python
"""GaLore/Fira's sharded step next to the package's on DTensors: ``torchrun --nproc_per_node=2 tools/lowrank_probe.py ...``.

Same as ``torchrun ... -m steptitan.experiments.lowrank_probe``; the code lives there.
"""

import os

from steptitan.experiments.lowrank_probe import main

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
