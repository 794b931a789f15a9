"""ReLoRA (Lialin et al., ICLR 2024, arXiv 2307.05695, Section 3 "Method").

LoRA whose adapters are merged and restarted every ``reset_interval`` steps:

    W <- W + s * B A;   A <- fresh random draw;   B <- 0

so the sum of the low-rank updates can reach a high rank. At each reset the
adapters' optimizer state is

* ``magnitude``: pruned -- entries whose |exp_avg| is at or below the
  ``prune_ratio`` quantile (per adapter tensor) are zeroed in both moments
  (the paper's optimizer-state reset by magnitude pruning);
* ``random``: pruned at random, exactly ``floor(prune_ratio * n)`` entries,
  the same entries in both moments;
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

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from steptitan.distributed import full_tensor, local_part, local_tensor, seeded_generator
from steptitan.metrics import log
from steptitan.peft import StepContext, optimizer_state
from steptitan.registry import PEFT
from steptitan.registry.peft.lora import LoRA, LoRAOptions, merge_lora_linear

@dataclass
class ReLoRAOptions(LoRAOptions):
    reset_interval: int = field(default=100, metadata={"gt": 0})  # N: merge + re-init every N optimizer steps of the stage
    optimizer_reset: Literal["magnitude", "random", "full"] = "magnitude"  # what happens to the adapters' optimizer state at a reset
    prune_ratio: float = field(default=0.9, metadata={"ge": 0, "le": 1})  # fraction of each adapter state tensor zeroed by magnitude/random pruning
    restart_warmup_steps: int = field(default=10, metadata={"ge": 0})  # linear LR re-warm-up after each reset (0 = none)


def prune_mask(state: torch.Tensor, mode: str, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Local boolean mask of the entries of ``state`` (possibly sharded) to zero.

    Computed from the full tensor so every rank agrees on the threshold / the
    random choice. Exactly floor(ratio * numel) entries either way: the ``random``
    draw, or the k smallest |x| for ``magnitude`` (ties at the threshold broken by
    position, so equal magnitudes never prune more than asked).
    """
    full = full_tensor(state).detach().float()
    n, k = full.numel(), int(ratio * full.numel())
    if k == 0:
        return torch.zeros_like(local_tensor(state), dtype=torch.bool)
    chosen = torch.zeros(n, dtype=torch.bool)
    if mode == "magnitude":
        chosen[full.abs().flatten().argsort(stable=True)[:k]] = True
    else:
        chosen[torch.randperm(n, generator=gen)[:k]] = True
    return local_part(chosen.view(full.shape).to(local_tensor(state).device), state)


@torch.no_grad()
def reset_adapter_state(state: dict[str, Any], mode: str, ratio: float, gen: torch.Generator) -> None:
    """Apply ReLoRA's optimizer-state handling to one parameter's AdamW state.

    Pruning zeroes exp_avg and exp_avg_sq at the same entries (one mask, from
    |exp_avg| for ``magnitude``, one draw for ``random``): every entry keeps an
    intact (m, v) pair or neither. Independent masks leave entries with m != 0
    and v = 0, which then step by lr * m / eps -- right after a reset A's
    gradient is 0 (B = 0), so nothing damps them (issue 11; docs/peft.md).
    """
    if not state:
        return
    keys = [k for k in ("exp_avg", "exp_avg_sq") if k in state]
    if mode == "full":
        for key in keys:
            local_tensor(state[key]).zero_()
        if "step" in state:
            local_tensor(state["step"]).zero_()  # a fresh Adam: bias correction restarts
        return
    if not keys:
        return
    mask = prune_mask(state[keys[0]], mode, ratio, gen)  # keyed on the first moment, the update's direction
    for key in keys:
        local_tensor(state[key]).masked_fill_(mask, 0.0)


@PEFT.register("relora")
class ReLoRA(LoRA):
    Options = ReLoRAOptions
    edits_adam_state = True  # the reset prunes exp_avg / exp_avg_sq (reset_adapter_state)
    description = "ReLoRA: LoRA merged and restarted every N steps, optimizer-state pruning, jagged cosine LR"

    def __init__(self, options: ReLoRAOptions, layers: list[int], seed: int = 0):
        super().__init__(options, layers, seed)
        self.resets = 0  # informational; the schedule is a function of the step alone

    def lr_factor(self, step: int) -> float:
        """Jagged re-warm-up for optimizer step ``step`` (1-based).

        Resets follow optimizer steps N, 2N, ..., so optimizer step kN+1+j
        (j = 0, 1, ...) runs at (j+1)/(W+1) of the cosine value while j < W.
        """
        n, w = self.options.reset_interval, self.options.restart_warmup_steps
        done = step - 1  # optimizer steps taken before this one
        if done < n or w == 0:
            return 1.0
        since = done % n
        return (since + 1) / (w + 1) if since < w else 1.0

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.step % self.options.reset_interval == 0:
            self.reset(ctx.model, ctx.optimizer, ctx.step)

    @torch.no_grad()
    def reset(self, model: nn.Module, optimizer: Any, step: int) -> None:
        """Merge B A into W, re-draw A, zero B, and prune/reset the adapters' optimizer state."""
        generation = step // self.options.reset_interval
        for name, module in self.modules(model):
            merge_lora_linear(module)
            self.init_adapter(name, module, generation)
            for pname in ("lora_A", "lora_B"):
                gen = seeded_generator(self.seed, "prune", name, pname, step)
                reset_adapter_state(optimizer_state(optimizer, getattr(module, pname)),
                                    self.options.optimizer_reset, self.options.prune_ratio, gen)
        self.resets += 1
        o = self.options
        pruned = "reset" if o.optimizer_reset == "full" else f"{o.optimizer_reset}-pruned ({o.prune_ratio:g})"
        log.info(f"relora: reset {self.resets} after step {step}: B A merged into W on {len(self.modules(model))} "
                 f"linears, A re-drawn, B = 0, adapters' optimizer state {pruned}")

    def counters(self) -> dict[str, float]:
        return {"relora/resets": self.resets}

    def state_dict(self) -> dict[str, Any]:
        return {"resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resets = int(state.get("resets", 0))
