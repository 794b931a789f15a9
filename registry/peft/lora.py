"""LoRA (Hu et al. 2021, Eq. 3): y = W x + s * B A dropout(x), s = alpha / r.

The base weight W is frozen; A starts Kaiming-uniform(a=sqrt(5)) and B at zero
so the adapted model equals the base model at init (ReLoRA code defaults,
methods.md). ``merge`` folds s*B*A into W and zeroes B: exact up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from steptitan.distributed import full_tensor, local_part, local_tensor, reshard
from steptitan.peft import PeftMethod, init_like, seeded_generator, target_linears
from steptitan.registry import PEFT

ALL_LINEARS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
INITS = ("kaiming", "gaussian")


@dataclass
class LoRAOptions:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEARS))
    init: str = "kaiming"  # kaiming (A ~ Kaiming-uniform, B = 0) | gaussian (A ~ N(0, 1/r), B = 0)


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update; ``weight`` keeps its name so growth and checkpoints see the dense model."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_lora_linear(module: LoRALinear) -> None:
    """W += s * B A on this rank's rows of W; then B = 0 (the function is unchanged)."""
    delta = module.scale * (full_tensor(module.lora_B).float() @ full_tensor(module.lora_A).float())
    w = local_tensor(module.weight)
    w.add_(local_part(delta, module.weight).to(w.dtype))
    local_tensor(module.lora_B).zero_()


@PEFT.register("lora")
class LoRA(PeftMethod):
    Options = LoRAOptions
    description = "LoRA adapters on frozen block linears (rank, alpha, dropout, targets, init)"

    def __init__(self, options: LoRAOptions, layers: list[int], seed: int = 0):
        super().__init__(options, layers, seed)
        if options.rank <= 0:
            raise ValueError(f"lora.rank must be > 0, got {options.rank}")
        if not 0.0 <= options.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {options.dropout}")
        if options.init not in INITS:
            raise ValueError(f"lora.init must be one of {', '.join(INITS)}, got {options.init!r}")
        self.scale = options.alpha / options.rank

    def apply(self, model: nn.Module) -> None:
        targets = target_linears(model, self.layers, self.options.targets)
        if self.layers and not targets:
            raise ValueError(f"lora.targets {self.options.targets} match no linear in layers {self.layers}")
        for _, parent, attr, linear in targets:
            if isinstance(linear, LoRALinear):
                raise ValueError(f"{attr} already has an adapter; two adapter methods target the same linear")
            lora = LoRALinear(linear.in_features, linear.out_features, self.options.rank, self.scale,
                              self.options.dropout, device=linear.weight.device)
            lora.weight = linear.weight
            lora.weight.requires_grad_(False)
            setattr(parent, attr, lora)

    @torch.no_grad()
    def init_weights(self, model: nn.Module) -> None:
        for name, module in lora_modules(model):
            if int(name.split(".")[1]) not in self.layers:
                continue
            self.init_adapter(name, module, generation=0)

    def init_adapter(self, name: str, module: LoRALinear, generation: int) -> None:
        gen = seeded_generator(self.seed, name, generation)
        if self.options.init == "kaiming":
            init_like(module.lora_A, lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g), gen)
        else:
            init_like(module.lora_A, lambda t, g: nn.init.normal_(t, std=1.0 / self.options.rank, generator=g), gen)
        local_tensor(module.lora_B).zero_()

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        reshard(model)
        for name, module in lora_modules(model):
            if int(name.split(".")[1]) in self.layers:
                merge_lora_linear(module)
