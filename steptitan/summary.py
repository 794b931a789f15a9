"""The run's summary: each stage's row (losses, throughput, memory measured and predicted, FLOPs) and summary.json.

The trainer measures while it trains; this module turns what it measured at a
stage end into the row that ``summary.json`` lists under ``stages`` (read by
sweeps, the benchmark, BENCHMARKS.md and the tests), and the run's summary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from steptitan.distributed import DistEnv, all_gather_object
from steptitan.flops import stage_flops_per_token
from steptitan.memory import predict_stage
from steptitan.metrics import cuda_peak_bytes, cuda_reserved_bytes, memory_breakdown, peak_rss_bytes
from steptitan.model import base_param_names, params_by_group
from steptitan.plan import StagePlan
from steptitan.recipe import Recipe, TrainingConfig, to_dict

# The summary's keys that also go to the trackers' run summary (TensorBoard text, W&B summary).
TRACKED = ("final_val_loss", "final_val_ppl", "wall_time_s", "tokens_seen", "peak_model_state_bytes", "peak_rss_bytes")


def stage_row(plan: StagePlan, model: nn.Module, optimizer: Any, env: DistEnv, training: TrainingConfig, *,
              losses: list[float], val_loss: float, wall: float, tokens: int, step_time: float, step_time_tokens: int,
              peak_step_memory: dict[str, int]) -> dict[str, Any]:
    """Stage ``plan``'s row of summary.json. A collective: every rank calls it, and the row lists every
    rank's memory under ``ranks`` (``peak_step_memory``: this rank's breakdown at its largest model-state step)."""
    memory = memory_breakdown(model, optimizer, [m.extra_state_bytes() for m in plan.peft])
    groups = params_by_group(model, plan.old_layers, base_param_names(plan.shape))
    # per shard rank (HSDP replicas hold what their shard group holds); steptitan/memory.py, checked in BENCHMARKS.md
    predicted = predict_stage(plan, env.dp_shard, training)
    flops = stage_flops_per_token(plan, training.seq_len, training.activation_checkpointing)
    per_rank = all_gather_object({"rank": env.rank, "memory": memory, "peak_rss": peak_rss_bytes(),
                                  "cuda_peak": cuda_peak_bytes(), "cuda_reserved": cuda_reserved_bytes(),
                                  "peak_step_memory": peak_step_memory})
    t = training
    return {
        "index": plan.index, "name": plan.name, "n_layers": plan.shape.n_layers, "dim": plan.shape.dim,
        "steps": plan.steps, "trainable_params": plan.trainable_params, "frozen_params": plan.frozen_params,
        "trainable_by_group": groups["trainable"], "frozen_by_group": groups["frozen"],
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "wall_s": wall,
        "tokens_per_s": tokens / wall if tokens else 0.0,
        "step_tokens_per_s": step_time_tokens / step_time if step_time else 0.0,  # steps 2.. only
        "peak_rss_bytes": max(r["peak_rss"] for r in per_rank),
        "peak_model_state_bytes": max(r["peak_step_memory"].get("model_states", 0) for r in per_rank),
        "predicted_model_state_bytes": [r["model_states"] for r in predicted.per_rank],
        "predicted_activation_bytes": predicted.activations,
        "predicted_overhead_bytes": predicted.overheads,  # per rank: padding, buffers, logits, ... (flops.overhead_bytes)
        "flops_per_token": flops.as_dict(),
        "predicted_optimizer_flops_per_step": predicted.optimizer_flops,  # per rank, by kind (e.g. GaLore's SVD)
        "train_flops": flops.total * plan.steps * env.world_size * t.batch_size * t.grad_accum * t.seq_len,
        "ranks": per_rank,
    }


def stage_memory_scalars(rank: dict[str, Any]) -> dict[str, float]:
    """One rank's stage peaks for the trackers (model states at the largest step, RSS, CUDA), from a row's ``ranks``."""
    return {f"stage_memory/rank{rank['rank']}/{k}": v for k, v in
            {**rank["peak_step_memory"], "peak_rss": rank["peak_rss"], "cuda_max_allocated": rank["cuda_peak"],
             "cuda_max_reserved": rank["cuda_reserved"]}.items()}


def run_summary(recipe: Recipe, env: DistEnv, stages: list[dict[str, Any]], wall_time_s: float,
                tokens_seen: int) -> dict[str, Any]:
    """summary.json's content: the final losses, the peaks over stages, every stage's row, the resolved recipe."""
    last = stages[-1] if stages else {}
    return {
        "recipe": recipe.name, "world_size": env.world_size,
        "dp_replicate": env.dp_replicate, "dp_shard": env.dp_shard,
        "final_val_loss": last.get("val_loss"), "final_val_ppl": last.get("val_ppl"),
        "final_val_blocks": len(last.get("val_block_losses") or []),
        "peak_rss_bytes": max((s["peak_rss_bytes"] for s in stages), default=0),
        "peak_model_state_bytes": max((s["peak_model_state_bytes"] for s in stages), default=0),
        "stages": stages, "recipe_resolved": to_dict(recipe),
        # the run's wall time over all launches (time between a resumed checkpoint and its interruption excluded)
        "wall_time_s": wall_time_s, "tokens_seen": tokens_seen,
    }


def write_summary_json(summary: dict[str, Any], run_dir: Path) -> Path:
    """``run_dir/summary.json``, replaced in one rename (a reader never sees half a file)."""
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(run_dir / "summary.json")
    return run_dir / "summary.json"
