"""Do copied units diverge after width growth? FPI (bert2bert) vs LEMON, under AdamW (docs/growth.md, "lemon").

Grows a 2-layer model's FFN 24 -> 48 channels (every channel copied once), trains the grown model k
AdamW steps (lr 3e-3) on random tokens and prints, over all (old channel, copy) pairs of layer 0,
1 - cosine and the relative distance |w_i - w_j| / |w_i| of their w1 rows.

    .venv/bin/python tools/width_symmetry.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_growth_lemon import copy_divergence, make  # noqa: E402  (the measured helper is the tested one)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="tools/width_symmetry.py", description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(f"{'steps':>5}  {'FPI 1-cos max':>13}  {'FPI dist max':>12}  {'LEMON 1-cos mean':>16}  {'max':>9}  "
          f"{'LEMON dist min':>14}  {'mean':>9}")
    for steps in (1, 2, 10, 50, 200):
        fpi_cos, fpi_dist = copy_divergence(make("bert2bert", ffn_hidden=48), steps)
        cos, dist = copy_divergence(make("lemon", ffn_hidden=48, alpha=0.6), steps)
        print(f"{steps:>5}  {(1 - fpi_cos).max().item():>13.1e}  {fpi_dist.max().item():>12.1e}  "
              f"{(1 - cos).mean().item():>16.1e}  {(1 - cos).max().item():>9.1e}  {dist.min().item():>14.1e}  {dist.mean().item():>9.1e}")


if __name__ == "__main__":
    main()
