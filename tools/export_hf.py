#!/usr/bin/env python
"""Export a steptitan checkpoint as a Hugging Face Llama folder: ``python tools/export_hf.py CKPT_OR_RUN OUT_DIR``.

Same as ``steptitan export``; the code lives in steptitan/export.py.
"""

import sys

from steptitan.export_cli import main

if __name__ == "__main__":
    sys.exit(main())
