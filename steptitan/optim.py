"""AdamW with per-row / per-column step counts (for SwitchLoRA, docs/peft.md).

SwitchLoRA (arXiv 2406.06564) resets the Adam state of one row of A or
one column of B when that vector is switched, *including its step count*, so
the bias correction (1 - beta^t) restarts for that vector alone. torch's
AdamW keeps one scalar ``step`` per parameter, and no maintained optimizer
library we checked (torch.optim, torchao, bitsandbytes, pytorch-optimizer,
peft) keeps step counts per slice, so this file is a small AdamW of our own.

``step_dims`` maps a parameter to the dimension whose slices count steps
separately: 0 = one count per row (lora_A, shape r x in), 1 = one count per
column (lora_B, shape out x r). Every other parameter keeps torch's scalar
``step`` and gets exactly torch's AdamW update (Loshchilov & Hutter 2019,
Algorithm 2, as in ``torch.optim.AdamW``).

Under FSDP2 the parameter and its moments are DTensors sharded on dim 0; the
step counts are DTensors too (sharded like the parameter when they count rows,
replicated when they count columns), so DCP saves, loads and reshards them
like any other optimizer state. The update itself works on local shards.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from steptitan.distributed import local_tensor
from steptitan.memory import OptimizerSpec


def step_counts_like(param: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero step counts, one per slice of ``param`` along ``dim`` (size 1 on the other dims)."""
    shape = [n if k == dim else 1 for k, n in enumerate(param.shape)]
    if not isinstance(param, DTensor):
        return torch.zeros(shape, dtype=torch.float32, device=param.device)
    # Sharded like the parameter only along the counted dim; a size-1 dim is replicated.
    placements = [p if isinstance(p, Shard) and p.dim == dim else Replicate() for p in param.placements]
    full = torch.zeros(shape, dtype=torch.float32, device=local_tensor(param).device)
    return distribute_tensor(full, param.device_mesh, placements, src_data_rank=None)


class AdamWSliceSteps(torch.optim.Optimizer):
    """AdamW whose step count can be per row or per column for chosen parameters."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        step_dims: dict[torch.Tensor, int] | None = None,
        foreach: bool | None = None,  # accepted for drop-in use with AdamW kwargs; unused
        **unsupported: Any,
    ):
        if unsupported:
            raise ValueError(f"AdamWSliceSteps does not support {sorted(unsupported)}")
        # Kept off ``defaults`` so it never reaches param_groups / checkpoints.
        self.step_dims = dict(step_dims or {})
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = (step_counts_like(p, self.step_dims[p]) if p in self.step_dims
                                     else torch.tensor(0.0, dtype=torch.float32))
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                param, grad = local_tensor(p), local_tensor(p.grad)
                exp_avg, exp_avg_sq = local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"])
                step = local_tensor(state["step"])
                step += 1
                param.mul_(1 - lr * wd)  # decoupled weight decay
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if step.dim() == 0:  # torch's scalar formula
                    t = step.item()
                    bias1, bias2_sqrt = 1 - beta1**t, math.sqrt(1 - beta2**t)
                    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
                    param.addcdiv_(exp_avg, denom, value=-lr / bias1)
                else:  # per-slice counts broadcast over the other dim
                    bias1 = 1 - torch.pow(beta1, step)
                    bias2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
                    denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
                    param.addcdiv_(exp_avg / bias1, denom, value=-lr)
        return loss


def galore_optimizer_factory(model: nn.Module, options: Any):
    """A constructor for ``OptimizersContainer`` that builds galore-torch's GaLoreAdamW.

    2-D block weights matching ``targets`` (default attention and FFN linears)
    get GaLore's projected Adam (Zhao et al. 2024, Alg. 2: rank, update_proj_gap,
    scale); every other trainable parameter gets plain Adam in the same
    optimizer, as in the GaLore repository's torchrun_main.py. Under FSDP2 the
    projection's SVD runs on DTensor gradients (see docs/benchmark.md)."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise ImportError("training.optimizer = \"galore\" needs the galore-torch package: pip install 'steptitan[galore]'") from exc
    spec = OptimizerSpec("galore", options.rank, tuple(options.targets))
    galore_ids = {id(p) for n, p in model.named_parameters() if p.requires_grad and spec.uses_galore(n, p.dim())}
    extra = {"rank": spec.galore_rank, "update_proj_gap": options.update_proj_gap,
             "scale": options.scale, "proj_type": "std"}

    def build(params, **kwargs):
        params = list(params)
        groups = [{"params": [p for p in params if id(p) not in galore_ids]},
                  {"params": [p for p in params if id(p) in galore_ids], **extra}]
        return GaLoreAdamW([g for g in groups if g["params"]], **kwargs)

    return build
