"""Entry point: ``torchrun --nproc_per_node=N -m steptitan.train RECIPE.toml [key=value ...]``.

Also runs as a single process (``python -m steptitan.train ...``). Order of
work: parse and validate the recipe, resolve the stage plan, prepare data --
all before any process group exists, so a bad recipe costs one clear message
and no hung ranks -- then start the process group and train.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from steptitan.data import DataError, num_blocks, prepare_data
from steptitan.distributed import env_world_size
from steptitan.plan import StagePlan, build_plan, format_plan
from steptitan.recipe import Recipe, RecipeError, load_recipe, to_dict


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="steptitan train",
        description="Run a steptitan recipe. Trailing key=value pairs override recipe keys "
        "(OmegaConf dot-list: training.steps=40 stages.1.peft.rank=16).",
    )
    parser.add_argument("recipe", help="path to a TOML recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe and stage plan, then exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks to predict memory for in --dry-run (default: torchrun's WORLD_SIZE, else 1)")
    return parser.parse_intermixed_args(argv)  # options may come after key=value overrides and vice versa


def check_data_fits(recipe: Recipe, train_tokens: int, val_tokens: int) -> None:
    """seq_len and batch must be fillable from the prepared token files."""
    t = recipe.training
    world = env_world_size()
    for split, n_tokens in (("training", train_tokens), ("validation", val_tokens)):
        blocks = num_blocks(n_tokens, t.seq_len)
        if blocks == 0:
            raise RecipeError(
                f"training.seq_len={t.seq_len} is larger than the {split} data can fill "
                f"({n_tokens:,} tokens make no block of {t.seq_len + 1}); lower seq_len or add text"
            )
    blocks = num_blocks(train_tokens, t.seq_len)
    if blocks < world * t.batch_size:
        raise RecipeError(
            f"the training data makes {blocks} blocks of seq_len={t.seq_len}, fewer than one step needs "
            f"({world} ranks x batch_size {t.batch_size}); lower seq_len or batch_size, or add text"
        )


def resolve(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Recipe, list[StagePlan]]:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    plans = build_plan(recipe)
    return args, recipe, plans


# Process exit codes (docs/reliability.md).
EXIT_OK = 0
EXIT_BAD_INPUT = 2  # recipe, data or output-folder problem, found before any process group starts
EXIT_TRAINING = 3  # training stopped on purpose (a non-finite loss); the last good checkpoint is kept
EXIT_PEER_FAILED = 4  # another rank died or hung (watchdog) or a collective failed
# 1 = an unexpected error (Python traceback)


def format_predicted_memory(recipe: Recipe, plans: list[StagePlan], world_size: int) -> str:
    """--dry-run: the planner's per-rank memory prediction for every stage (steptitan/memory.py)."""
    from steptitan.memory import predict_recipe
    from steptitan.metrics import fmt_bytes

    rows = [f"predicted memory per rank, {world_size} rank(s) (model states exact, activations estimated):",
            f"{'stage':<14}{'params':>12}{'grads':>12}{'optimizer':>12}{'model states':>14}{'activations':>13}{'total':>12}"]
    for stage in predict_recipe(recipe, plans, world_size):
        peak = max(stage.per_rank, key=lambda r: r["model_states"])
        params = peak.get("params_trainable", 0) + peak.get("params_frozen", 0)
        rows.append(f"{stage.name:<14}{fmt_bytes(params):>12}{fmt_bytes(peak.get('grads', 0)):>12}"
                    f"{fmt_bytes(peak.get('optimizer', 0)):>12}{fmt_bytes(stage.peak_model_states):>14}"
                    f"{fmt_bytes(stage.activations):>13}{fmt_bytes(stage.peak_total):>12}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        args, recipe, plans = resolve(argv)
        if args.dry_run:
            if rank == 0:
                print(json.dumps(to_dict(recipe), indent=1))
                print(format_plan(plans))
                print(format_predicted_memory(recipe, plans, args.world_size or env_world_size()))
            return 0
        data = prepare_data(recipe.data, recipe.model.vocab_size)
        check_data_fits(recipe, len(data.tokens("train")), len(data.tokens("val")))
        from steptitan.trainer import prepare_run_dir

        if rank == 0:
            prepare_run_dir(recipe, plans)
            # The resolved recipe beside the checkpoints: tools/export_hf.py and
            # tools/sweep.py rebuild a run's model from it, even for a dead run.
            (recipe.run_dir / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=1))
    except (RecipeError, DataError, FileExistsError) as exc:
        print(f"steptitan: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    # Heavy imports and the process group only after everything is validated.
    from steptitan.distributed import init_distributed, shutdown_distributed
    from steptitan.metrics import setup_logging
    from steptitan.trainer import Trainer, TrainingError

    setup_logging(rank)
    if recipe.training.deterministic:
        import torch

        torch.use_deterministic_algorithms(True)
    env = init_distributed(recipe.training.backend, timeout_s=recipe.training.collective_timeout_s)
    from steptitan.watchdog import start_watchdog

    watchdog = start_watchdog(env.rank, env.world_size, recipe.training.heartbeat_timeout_s)
    status = "done"
    try:
        Trainer(recipe, plans, data, env).run()
    except TrainingError as exc:  # every rank sees the same all-reduced loss and stops together
        print(f"steptitan: error on rank {env.rank}: {exc}", file=sys.stderr)
        return EXIT_TRAINING
    except Exception as exc:
        import torch.distributed as dist

        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        status = f"failed:{type(exc).__name__}: {first_line}"
        if isinstance(exc, dist.DistError) or "gloo" in str(exc).lower():
            # A collective timed out or a peer's connection dropped: a peer died or hung.
            print(f"steptitan: error on rank {env.rank}: a collective failed, another rank died or hung "
                  f"(training.collective_timeout_s={recipe.training.collective_timeout_s:g}): {first_line}",
                  file=sys.stderr)
            return EXIT_PEER_FAILED
        raise  # a bug: keep the traceback; the watchdog status tells the peers which rank failed
    finally:
        if watchdog is not None:
            watchdog.stop(status)
        shutdown_distributed(synchronize=status == "done")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
