"""``steptitan prepare RECIPE [key=value ...]``: tokenize a recipe's corpus once, ahead of training.

Writes the cache entry training reads (``data.cache_dir/tokens/<key>``: the same
key, so ``steptitan train`` with the same recipe and data overrides finds it
and does not tokenize again), with several worker processes and a progress bar
(characters, tokens, tokens/s, ETA). Killed mid-way, the same command resumes:
finished pieces are kept, a partial one is never taken as complete
(steptitan/pieces.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from steptitan.pieces import PIECE_CHARS

    parser = argparse.ArgumentParser(
        prog="steptitan prepare",
        description="Tokenize a recipe's corpus into the data cache ahead of training (resumable after a kill).")
    parser.add_argument("recipe", help="path to a TOML recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (the data.* ones must match the training run's)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizing processes, one core each (default: the CPUs this process may use); "
                             "0 = this process with the tokenizers library's threads")
    parser.add_argument("--piece-chars", type=int, default=PIECE_CHARS,
                        help=f"characters per resumable piece (default {PIECE_CHARS:,}): the work a kill can lose")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from steptitan.corpus import DataError
    from steptitan.recipe import RecipeError, load_recipe

    if args.workers < 0 or args.piece_chars < 1:
        print("steptitan prepare: error: --workers must be >= 0 and --piece-chars >= 1", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        from steptitan.data import prepare_data  # torch: after the recipe and arguments are known to be usable

        data = prepare_data(recipe.data, recipe.model.vocab_size, workers=args.workers, bar=True,
                            piece_chars=args.piece_chars)
    except (RecipeError, DataError) as exc:
        print(f"steptitan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steptitan prepare: interrupted; run the same command to resume (finished pieces are kept)",
              file=sys.stderr)
        return 130
    n_train, n_val = len(data.tokens("train")), len(data.tokens("val"))
    print(f"steptitan prepare: {n_train:,} training + {n_val:,} validation tokens ({data.dtype}) in "
          f"{data.train_path.parent}; `steptitan train {args.recipe}` with the same data.* settings reads them")
    return 0
