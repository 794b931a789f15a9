"""Plan STEP stage splits: ``python tools/plan_stages.py --dim 1024 --layers 24 -K 3 --peft lora --peft-opt rank=64``.

Same as ``steptitan plan ...``; the logic lives in steptitan/planner.py (plan_cli).
"""

import sys

from steptitan.planner import plan_cli

if __name__ == "__main__":
    sys.exit(plan_cli())
