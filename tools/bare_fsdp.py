#!/usr/bin/env python
"""A bare FSDP2 training loop, the throughput reference: ``torchrun --nproc_per_node=2 tools/bare_fsdp.py ...``.

Same as ``torchrun ... -m steptitan.experiments.bare_fsdp``; the code lives there.
"""

import os

from steptitan.experiments.bare_fsdp import main

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
