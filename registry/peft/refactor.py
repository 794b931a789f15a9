"""Weight refactorization (Glentis et al., arXiv 2505.22922, "weight refactorization").

Every ``interval`` steps, each adapter B A (made by another method, e.g.
``lora`` / ``relora`` / ``switchlora`` on the same layers) is rebalanced
without changing the product:

    U S V^T = SVD(B A);   B <- U_r S_r^1/2,   A <- S_r^1/2 V_r^T

so both factors have the same singular values (B^T B = A A^T = S_r). The SVD
of the rank-r product is taken through thin QR factors (B = Q_B R_B,
A^T = Q_A R_A, SVD of the r x r matrix R_B R_A^T), in float64, on the full
(gathered) factors; every rank computes the same result and keeps its shard.

Use it through ``extra_peft`` next to the method that owns the adapters:

    peft = { method = "lora", layers = "old", rank = 8 }
    extra_peft = [{ method = "refactor", layers = "old", interval = 50 },
                  { method = "momentum_reset", layers = "old", interval = 50 }]

An adapter whose product has a (numerically) zero singular value, or whose
rank exceeds min(out, in), is skipped:
rebalancing it would zero a row of A together with the matching column of B,
and such a pair never gets a gradient again (the A = B = 0 trap). That is the
case right after a B = 0 initialisation; refactor after training has moved B.
The optimizer state is left alone: pair it with ``momentum_reset``, as the
paper does, since the moments refer to the old factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from steptitan.distributed import full_tensor, local_part, local_tensor
from steptitan.peft import PeftMethod, StepContext
from steptitan.registry import PEFT
from steptitan.registry.peft.lora import LoRALinear, lora_modules


@dataclass
class RefactorOptions:
    interval: int = field(default=100, metadata={"gt": 0})  # rebalance every N optimizer steps of the stage
    rel_tol: float = field(default=1e-6, metadata={"ge": 0, "lt": 1})  # skip an adapter whose smallest singular value is below rel_tol * the largest


def balanced_factors(b: torch.Tensor, a: torch.Tensor, rel_tol: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B', A') with B' A' = B A and B'^T B' = A' A'^T = S, or None when B A is rank-deficient."""
    if b.shape[0] < b.shape[1] or a.shape[1] < a.shape[0]:  # r > min(out, in): B A cannot have rank r
        return None
    b, a = b.double(), a.double()
    q_b, r_b = torch.linalg.qr(b)  # (out, r), (r, r)
    q_a, r_a = torch.linalg.qr(a.t())  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())
    if s.numel() == 0 or s[-1] <= rel_tol * s[0]:
        return None
    root = s.sqrt()
    return (q_b @ u) * root, root[:, None] * (vh @ q_a.t())


@torch.no_grad()
def refactor_lora_linear(module: LoRALinear, rel_tol: float = 1e-6) -> bool:
    """Rebalance one adapter in place (sharded or not). Returns False when it was skipped."""
    factors = balanced_factors(full_tensor(module.lora_B), full_tensor(module.lora_A), rel_tol)
    if factors is None:
        return False
    for param, full in zip((module.lora_B, module.lora_A), factors):
        local = local_tensor(param)
        local.copy_(local_part(full.to(local.device, local.dtype), param))
    return True


@PEFT.register("refactor")
class Refactor(PeftMethod):
    Options = RefactorOptions
    description = "SVD rebalancing of LoRA factors B A every N steps, product unchanged (Glentis et al.)"

    def __init__(self, options: RefactorOptions, layers: list[int], seed: int = 0):
        super().__init__(options, layers, seed)
        self.done = self.skipped = 0

    def apply(self, model: nn.Module) -> None:
        if self.layers and not lora_modules(model, self.layers):
            raise ValueError("refactor needs LoRA adapters on its layers: put it in extra_peft after a "
                             "lora / relora / switchlora method on the same layers")

    def after_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.step % self.options.interval == 0:
            self.refactor(ctx.model)

    @torch.no_grad()
    def refactor(self, model: nn.Module) -> None:
        for _, module in lora_modules(model, self.layers):
            if refactor_lora_linear(module, self.options.rel_tol):
                self.done += 1
            else:
                self.skipped += 1

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done, self.skipped = int(state.get("done", 0)), int(state.get("skipped", 0))
