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

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from steptitan.distributed import local_tensor
from steptitan.peft import PeftMethod, StepContext, optimizer_state
from steptitan.registry import PEFT
from steptitan.registry.peft.lora import lora_modules

@dataclass
class MomentumResetOptions:
    interval: int = field(default=100, metadata={"gt": 0})  # zero the moments after every N optimizer steps of the stage
    recovery_steps: int = field(default=10, metadata={"ge": 0})  # steps of the LR ramp after a reset (0 = no ramp)
    start_factor: float = field(default=0.001, metadata={"gt": 0, "le": 1})  # LR multiplier on the first step after a reset
    scope: Literal["adapters", "optimizer"] = "adapters"  # adapters = LoRA factors on this method's layers; optimizer = every parameter


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
        self.resets = 0

    def lr_factor(self, step: int) -> float:
        """Ramp factor of optimizer step ``step`` (1-based); resets follow steps N, 2N, ..."""
        n, ramp = self.options.interval, self.options.recovery_steps
        done = step - 1  # optimizer steps taken before this one
        if done < n or ramp == 0 or done % n >= ramp:
            return 1.0
        return self.options.start_factor + (1.0 - self.options.start_factor) * (done % n) / ramp

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
