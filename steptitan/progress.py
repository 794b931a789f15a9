"""What the console says about progress: elapsed time, ETAs, overall progress, what a growth changed.

The ETA of the whole run weighs every remaining step by its stage's training FLOPs per token
(steptitan/flops.py, the same count summary.json reports), relative to the current stage:
a later, grown stage costs more per step, a stage whose old layers are frozen behind adapters
less (no weight gradients there). Batch and sequence length are run-wide, so tokens per step
are the same in every stage and the FLOP ratio is the step-time ratio. Evaluation and
checkpoint time are not in it.
"""

from __future__ import annotations

import time
from typing import Any, Sequence


def fmt_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``; ``9.4`` -> ``9.4s``."""
    if seconds != seconds or seconds < 0:  # nan: nothing measured yet
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def shape_change(old: Any, new: Any) -> str:
    """What a growth changed, from two ``ModelShape``s: ``dim 64 -> 128, heads 2 -> 4, FFN 176 -> 352``."""
    fields = (("n_layers", "layers"), ("dim", "dim"), ("n_heads", "heads"), ("n_kv_heads", "kv heads"),
              ("head_dim", "head dim"), ("ffn_hidden", "FFN"), ("vocab_size", "vocab"))
    changed = [f"{label} {getattr(old, f)} -> {getattr(new, f)}" for f, label in fields
               if getattr(old, f) != getattr(new, f)]
    if not changed:
        return f"same shape ({new.n_layers} layers, dim {new.dim})"
    if old.n_layers == new.n_layers:  # a width growth: say the depth it kept
        changed.append(f"{new.n_layers} layers")
    return ", ".join(changed)


class Progress:
    """Elapsed time and ETAs over the stages of a run (plus what earlier launches of it took)."""

    def __init__(self, plans: Sequence[Any], flops_per_token: Sequence[float]):
        self.steps = [p.steps for p in plans]
        self.flops = [max(float(f), 1.0) for f in flops_per_token]
        self.start = time.perf_counter()
        self.before = 0.0  # seconds spent by earlier launches up to the checkpoint resumed from

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def fraction(self, stage: int, step: int) -> float:
        return (sum(self.steps[:stage]) + step) / max(sum(self.steps), 1)

    def etas(self, stage: int, step: int, step_time: float) -> tuple[float, float]:
        """(seconds left in this stage, seconds left in the run) at ``step_time`` seconds per step now."""
        stage_left = (self.steps[stage] - step) * step_time
        later = sum(n * self.flops[j] / self.flops[stage] for j, n in enumerate(self.steps) if j > stage)
        return stage_left, stage_left + later * step_time

    def line(self, stage: int, step: int, step_time: float) -> str:
        """`` | run 42% | 1m03s elapsed, ETA stage 12s, run 1m27s`` for the per-log-interval console line."""
        stage_left, run_left = self.etas(stage, step, step_time)
        eta = (f"ETA stage {fmt_duration(stage_left)}, run {fmt_duration(run_left)}" if stage < len(self.steps) - 1
               else f"ETA {fmt_duration(run_left)}")
        return f" | run {100 * self.fraction(stage, step):.0f}% | {fmt_duration(self.elapsed())} elapsed, {eta}"
