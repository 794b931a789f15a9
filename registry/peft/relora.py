"""ReLoRA (Lialin et al., ICLR 2024, arXiv 2307.05695, Section 3 "Method").

LoRA whose adapters are merged and restarted every ``reset_interval`` steps:

    W <- W + s * B A;   A <- fresh random draw;   B <- 0

so the sum of the low-rank updates can reach a high rank. At each reset the
adapters' optimizer state is

* ``magnitude``: pruned -- entries with |x| at or below the ``prune_ratio``
  quantile of |x| (per tensor: exp_avg and exp_avg_sq of each adapter) are
  zeroed (the paper's optimizer-state reset by magnitude pruning);
* ``random``: pruned at random, exactly ``floor(prune_ratio * n)`` entries;
* ``full``: reset (moments and the step count zeroed).

The LR follows the "jagged" schedule: the stage's cosine (training.decay_type,
min ratio training.min_lr_factor, 0.1 by default) times a linear re-warm-up over
``restart_warmup_steps`` after every reset (the paper's "jagged" cosine schedule).

The full-rank warm start of the paper is an earlier stage of the recipe
without PEFT (recipes/relora.toml). The re-initialisation draws A at random
(``init`` must keep A non-zero; all LoRA inits do), avoiding the reference
code's A = B = 0 bug.

Under FSDP2 the adapters and their state are sharded; the merge gathers A and
B (small), each rank updates its rows of W; the pruning threshold is taken
over the full state tensor and random masks are drawn in full from a shared
seeded generator, so the result does not depend on the world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steptitan.distributed import full_tensor, local_part, local_tensor, reshard
from steptitan.peft import StepContext, optimizer_state, seeded_generator
from steptitan.registry import PEFT
from steptitan.registry.peft.lora import LoRA, LoRAOptions, merge_lora_linear

OPTIMIZER_RESETS = ("magnitude", "random", "full")


@dataclass
class ReLoRAOptions(LoRAOptions):
    reset_interval: int = 100  # N: merge + re-init every N optimizer steps of the stage
    optimizer_reset: str = "magnitude"  # magnitude | random | full (adapters' optimizer state at a reset)
    prune_ratio: float = 0.9  # fraction of each adapter state tensor zeroed by magnitude/random pruning
    restart_warmup_steps: int = 10  # linear LR re-warm-up after each reset (0 = none)


def prune_mask(state: torch.Tensor, mode: str, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Local boolean mask of the entries of ``state`` (possibly sharded) to zero.

    Computed from the full tensor so every rank agrees on the threshold / the
    random choice; exactly floor(ratio * numel) entries for ``random``, and the
    entries at or below the ratio-quantile of |x| for ``magnitude``.
    """
    full = full_tensor(state).detach().float()
    n, k = full.numel(), int(ratio * full.numel())
    if k == 0:
        return torch.zeros_like(local_tensor(state), dtype=torch.bool)
    if mode == "magnitude":
        threshold = full.abs().flatten().kthvalue(k).values
        return local_tensor(state).abs() <= threshold
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=gen)[:k]] = True
    return local_part(chosen.view(full.shape).to(local_tensor(state).device), state)


@torch.no_grad()
def reset_adapter_state(state: dict[str, Any], mode: str, ratio: float, gen: torch.Generator) -> None:
    """Apply ReLoRA's optimizer-state handling to one parameter's AdamW state."""
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key not in state:
            continue
        if mode == "full":
            local_tensor(state[key]).zero_()
        else:
            local = local_tensor(state[key])
            local.masked_fill_(prune_mask(state[key], mode, ratio, gen), 0.0)
    if mode == "full" and "step" in state:
        local_tensor(state["step"]).zero_()  # a fresh Adam: bias correction restarts


@PEFT.register("relora")
class ReLoRA(LoRA):
    Options = ReLoRAOptions
    description = "ReLoRA: LoRA merged and restarted every N steps, optimizer-state pruning, jagged cosine LR"

    def __init__(self, options: ReLoRAOptions, layers: list[int], seed: int = 0):
        super().__init__(options, layers, seed)
        if options.reset_interval <= 0:
            raise ValueError(f"relora.reset_interval must be > 0, got {options.reset_interval}")
        if options.optimizer_reset not in OPTIMIZER_RESETS:
            raise ValueError(f"relora.optimizer_reset must be one of {', '.join(OPTIMIZER_RESETS)}, got {options.optimizer_reset!r}")
        if not 0.0 <= options.prune_ratio <= 1.0:
            raise ValueError(f"relora.prune_ratio must be in [0, 1], got {options.prune_ratio}")
        if options.restart_warmup_steps < 0:
            raise ValueError(f"relora.restart_warmup_steps must be >= 0, got {options.restart_warmup_steps}")
        self.resets = 0  # informational; the schedule is a function of the step alone

    def lr_factor(self, step: int) -> float:
        """Jagged re-warm-up: the scheduler step ``step`` serves optimizer step step+1.

        Resets follow optimizer steps N, 2N, ..., so optimizer step kN+1+j
        (j = 0, 1, ...) runs at (j+1)/(W+1) of the cosine value while j < W.
        """
        n, w = self.options.reset_interval, self.options.restart_warmup_steps
        if step < n or w == 0:
            return 1.0
        since = step % n
        return (since + 1) / (w + 1) if since < w else 1.0

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.step % self.options.reset_interval == 0:
            self.reset(ctx.model, ctx.optimizer, ctx.step)

    @torch.no_grad()
    def reset(self, model: nn.Module, optimizer: Any, step: int) -> None:
        """Merge B A into W, re-draw A, zero B, and prune/reset the adapters' optimizer state."""
        reshard(model)
        generation = step // self.options.reset_interval
        for name, module in self.modules(model):
            merge_lora_linear(module)
            self.init_adapter(name, module, generation)
            for pname in ("lora_A", "lora_B"):
                gen = seeded_generator(self.seed, "prune", name, pname, step)
                reset_adapter_state(optimizer_state(optimizer, getattr(module, pname)),
                                    self.options.optimizer_reset, self.options.prune_ratio, gen)
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {"resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resets = int(state.get("resets", 0))
