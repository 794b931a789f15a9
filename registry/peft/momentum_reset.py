"""Momentum reset with quick LR recovery (Glentis et al., arXiv 2505.22922).

Every ``interval`` steps the Adam moments (exp_avg and exp_avg_sq) are set to
zero -- of the LoRA adapters on this method's layers (``scope = "adapters"``)
or of every parameter the optimizer holds (``scope = "optimizer"``) -- and
the LR recovers quickly: for the ``recovery_steps`` optimizer steps after a
reset the schedule is multiplied by a linear ramp from ``start_factor``
(0.001 in the paper) back to 1:

    factor(j) = start_factor + (1 - start_factor) * j / recovery_steps,  j = 0 .. recovery_steps - 1

where j counts optimizer steps since the reset. The LR multiplier acts on the
whole optimizer (one schedule per stage). Step counts are kept, so Adam's
bias correction does not restart (``relora``'s ``optimizer_reset = "full"``
resets them).

Use it through ``extra_peft`` (see ``refactor``); it adds no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steptitan.distributed import local_tensor
from steptitan.peft import PeftMethod, StepContext, optimizer_state
from steptitan.registry import PEFT
from steptitan.registry.peft.lora import lora_modules

SCOPES = ("adapters", "optimizer")


@dataclass
class MomentumResetOptions:
    interval: int = 100  # zero the moments after every N optimizer steps of the stage
    recovery_steps: int = 10  # steps of the LR ramp after a reset (0 = no ramp)
    start_factor: float = 0.001  # LR multiplier on the first step after a reset
    scope: str = "adapters"  # adapters (LoRA factors on this method's layers) | optimizer (every parameter)


@torch.no_grad()
def zero_moments(state: dict[str, Any]) -> None:
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            local_tensor(state[key]).zero_()


@PEFT.register("momentum_reset")
class MomentumReset(PeftMethod):
    Options = MomentumResetOptions
    description = "zero Adam moments every N steps with a quick linear LR recovery (Glentis et al.)"

    def __init__(self, options: MomentumResetOptions, layers: list[int], seed: int = 0):
        super().__init__(options, layers, seed)
        if options.interval <= 0:
            raise ValueError(f"momentum_reset.interval must be > 0, got {options.interval}")
        if options.recovery_steps < 0:
            raise ValueError(f"momentum_reset.recovery_steps must be >= 0, got {options.recovery_steps}")
        if not 0.0 < options.start_factor <= 1.0:
            raise ValueError(f"momentum_reset.start_factor must be in (0, 1], got {options.start_factor}")
        if options.scope not in SCOPES:
            raise ValueError(f"momentum_reset.scope must be one of {', '.join(SCOPES)}, got {options.scope!r}")
        self.resets = 0

    def lr_factor(self, step: int) -> float:
        """``step`` is the scheduler step serving optimizer step step+1; resets follow steps N, 2N, ..."""
        n, ramp = self.options.interval, self.options.recovery_steps
        if step < n or ramp == 0 or step % n >= ramp:
            return 1.0
        return self.options.start_factor + (1.0 - self.options.start_factor) * (step % n) / ramp

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.step % self.options.interval == 0:
            self.reset(ctx.model, ctx.optimizer)

    def params(self, model: nn.Module, optimizer: Any) -> list[torch.Tensor]:
        if self.options.scope == "optimizer":
            return [p for opt in getattr(optimizer, "optimizers", [optimizer]) for g in opt.param_groups for p in g["params"]]
        return [p for _, m in lora_modules(model, self.layers) for p in (m.lora_A, m.lora_B)]

    @torch.no_grad()
    def reset(self, model: nn.Module, optimizer: Any) -> None:
        for p in self.params(model, optimizer):
            zero_moments(optimizer_state(optimizer, p))
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {"resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resets = int(state.get("resets", 0))
