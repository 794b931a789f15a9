"""``steptitan train RECIPE --dry-run``: what a recipe will do and what it will cost, checked, nothing started.

Prints a few lines of the settings that matter (data, tokenizer, starting weights, batch),
the stage table (shapes, growth, PEFT with rank and alpha, freezing, parameter counts,
predicted peak model states per rank and their ratio to vanilla training of the final
model), and the per-rank memory breakdown. ``--json`` prints the fully resolved recipe as
JSON instead (for tools). Missing data files are errors (exit 2), as they would be at launch.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from steptitan.plan import StagePlan, build_plan, format_plan, format_table
from steptitan.recipe import Recipe, StageConfig, missing_files, parallel_degrees, to_dict


def vanilla_plan(recipe: Recipe, plans: list[StagePlan]) -> StagePlan:
    """The baseline the ratios are against: the last stage's model, every parameter trained from step 0,
    with the recipe's precision and run-wide optimizer choice (one stage, no growth, no PEFT, no freezing)."""
    shape = dataclasses.asdict(plans[-1].shape)
    return build_plan(dataclasses.replace(recipe, stages=[StageConfig(steps=1, name="vanilla", model=shape)]))[0]


def settings_lines(recipe: Recipe, world_size: int) -> list[str]:
    from steptitan.memory import Precision

    d, t = recipe.data, recipe.training
    if d.files:
        source = f"{len(d.files)} file(s): {', '.join(d.files[:3])}{' ...' if len(d.files) > 3 else ''}"
    elif d.hub:
        source = f"hub dataset {d.hub!r}, streamed (a hub name needs network; not checked here)"
    elif d.tokens:
        source = f"given tokens {d.tokens!r} ({d.tokens_dtype} if a .bin; not tokenized)"
    else:
        source = "the embedded stdlib-docs corpus"
    val = f"val: {', '.join(d.val_files or [d.val_tokens or ''])}" if d.val_files or d.val_tokens else f"val: the last {d.val_fraction:g} of the tokens"
    tok = f"tokenizer {d.tokenizer}" if d.tokenizer else f"a BPE trained on the corpus (vocab {recipe.model.vocab_size:,})"
    tokens = world_size * t.batch_size * t.grad_accum * t.seq_len
    lines = [f"recipe {recipe.name!r} -> {recipe.run_dir}",
             f"data: {source}; {val}; {tok}",
             f"batch: {world_size} rank(s) x {t.batch_size} seq x {t.grad_accum} accum x {t.seq_len} tokens = "
             f"{tokens:,} tokens/step; lr {t.lr:g}, {Precision.from_training(t).compute} compute, "
             f"{t.frozen_dtype} frozen weights"]
    if recipe.model.init_from:
        lines.append(f"stage 0 starts from the Hugging Face model {recipe.model.init_from} (its weights and shape)")
    return lines


def memory_lines(recipe: Recipe, plans: list[StagePlan], world_size: int) -> tuple[list[str], list[Any], Any]:
    """The per-rank breakdown table, the per-stage predictions and vanilla's."""
    from steptitan.memory import predict_recipe
    from steptitan.metrics import fmt_bytes

    replicate, shard = parallel_degrees(recipe.parallel, world_size, "--world-size")
    layout = f" as {replicate} x {shard} HSDP (replicate x shard)" if replicate > 1 else ""
    memory = predict_recipe(recipe, plans, world_size)
    vanilla = predict_recipe(recipe, [vanilla_plan(recipe, plans)], world_size)[0]
    rows = []
    for stage in [*memory, vanilla]:
        peak = max(stage.per_rank, key=lambda r: r["model_states"])
        params = peak.get("params_trainable", 0) + peak.get("params_frozen", 0)
        rows.append([stage.name if stage is not vanilla else "(vanilla)", fmt_bytes(params), fmt_bytes(peak.get("grads", 0)),
                     fmt_bytes(peak.get("optimizer", 0)), fmt_bytes(stage.peak_model_states), fmt_bytes(stage.activations),
                     fmt_bytes(stage.peak_total), f"{stage.peak_total / vanilla.peak_total:.2f}x"])
    head = [f"predicted memory per rank, {world_size} rank(s){layout} (model states exact, activations estimated; "
            f"vanilla = the last stage's {plans[-1].shape.n_layers}-layer model trained in full):"]
    table = format_table(["stage", "params", "grads", "optimizer", "model states", "activations", "total", "vs vanilla"],
                         rows, right=set(range(1, 8)))
    return head + table, memory, vanilla


def dry_run(recipe: Recipe, plans: list[StagePlan], world_size: int, as_json: bool = False) -> int:
    """Print the report (rank 0's job); 2 when a file the recipe reads is missing, else 0."""
    if as_json:
        print(json.dumps(to_dict(recipe), indent=1))
    else:
        memory_table, memory, vanilla = memory_lines(recipe, plans, world_size)
        print("\n".join(settings_lines(recipe, world_size)))
        print()
        print(format_plan(plans, memory, vanilla))
        print()
        print("peft = method[layers it adapts] with rank, alpha and any non-default option; states/rank = predicted\n"
              "peak model states (params + grads + optimizer state) per rank; vs vanilla = states/rank over vanilla's")
        print()
        print("\n".join(memory_table))
        print()
        print("(the full resolved recipe: --dry-run --json)")
    missing = missing_files(recipe)
    for problem in missing:
        print(f"steptitan: error: {problem}", file=sys.stderr)
    return 2 if missing else 0
