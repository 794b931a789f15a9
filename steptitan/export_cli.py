"""``steptitan export``'s command line (steptitan/export.py does the work).

The parser lives apart from the loading code, which imports torch, torchtitan and the model stack
at module level: ``steptitan export --help`` and a bad argument answer at once (issue 23, item 12).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

DTYPE_NAMES = ("bfloat16", "float16", "float32")  # = steptitan.export.DTYPES (tests/test_fast_refusal.py checks)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="steptitan export", description="Export a steptitan checkpoint as a Hugging "
                                "Face Llama folder (model.safetensors + config.json); docs/huggingface.md.")
    p.add_argument("checkpoint", help="a checkpoint folder (stageNN-stepNNNNNN) or a run folder (its newest checkpoint)")
    p.add_argument("out", help="output folder for model.safetensors + config.json")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (with --recipe)")
    p.add_argument("--recipe", help="the recipe TOML, when the run folder has no recipe.json / summary.json")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="dtype of the saved weights")
    args = p.parse_args(argv)
    if args.overrides and not args.recipe:
        p.error("key=value overrides need --recipe")
    from steptitan.export import ExportError, export
    from steptitan.recipe import RecipeError

    try:
        out = export(args.checkpoint, args.out, args.recipe, args.overrides, args.dtype)
    except (ExportError, RecipeError, FileNotFoundError) as exc:
        print(f"steptitan export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}/model.safetensors and config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
