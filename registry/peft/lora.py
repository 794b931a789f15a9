"""LoRA (Hu et al. 2021, Eq. 3): y = W x + s * B A dropout(x), s = alpha / r.

The base weight W is frozen. Initialisations (``init``):

* ``kaiming``  A ~ Kaiming-uniform(a=sqrt(5)), B = 0 (LoRA / ReLoRA code default, methods.md);
* ``gaussian`` A ~ N(0, 1/r^2), B = 0 (peft's "gaussian");
* ``uniform``  A and B both non-zero (nn.Linear's default uniform init for each,
  as SwitchLoRA starts, arXiv 2406.06564, method section), and W -= s*B*A so the
  adapted model still computes W x;
* ``pissa``    B A = the top-r singular triplets of W (PiSSA, Meng et al. 2024,
  arXiv 2404.02948, method section): B = U_r S_r^1/2 / sqrt(s), A = S_r^1/2 V_r^T / sqrt(s),
  W -= s*B*A (the residual). Gathers each W once per init.

Every choice leaves the model's function unchanged (exact for B = 0, up to
float32 rounding otherwise) and none starts with A = B = 0, the reference
ReLoRA bug where no gradient ever reaches either factor.

``merge`` folds s*B*A into W and zeroes B: exact up to rounding. Everything
works on FSDP2-sharded parameters (each rank updates its rows of W) and on
plain tensors (one process, export).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from steptitan.distributed import full_tensor, init_like, local_part, local_tensor, seeded_generator
from steptitan.peft import PeftMethod, target_linears
from steptitan.registry import PEFT

ALL_LINEARS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
LoRAInit = Literal["kaiming", "gaussian", "uniform", "pissa"]


@dataclass
class LoRAOptions:
    rank: int = field(default=8, metadata={"gt": 0})  # r: inner dimension of B A
    alpha: float = 16.0  # s = alpha / rank scales the update
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})  # dropout on the adapter's input only
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEARS))  # block linears by name or glob ("wq", "attention.*")
    init: LoRAInit = "kaiming"  # gaussian / kaiming: B = 0; uniform / pissa: B != 0, W compensated; see the module doc


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


def layer_of(name: str) -> int:
    """Block index of a qualified module name ("layers.3.attention.wq" -> 3)."""
    return int(name.split(".")[1])


def lora_modules(model: nn.Module, layers: list[int] | None = None) -> list[tuple[str, LoRALinear]]:
    """(name, module) of every LoRALinear, in module order (the same on every rank), optionally in ``layers`` only."""
    keep = None if layers is None else set(layers)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and (keep is None or layer_of(n) in keep)]


@torch.no_grad()
def add_to_weight(module: LoRALinear, delta: torch.Tensor) -> None:
    """W += delta, where ``delta`` is the full (out, in) matrix held identically by every rank."""
    w = local_tensor(module.weight)
    w.add_(local_part(delta.to(w.device), module.weight).to(w.dtype))


@torch.no_grad()
def add_local_product(module: LoRALinear, b_local: torch.Tensor, a_full: torch.Tensor, factor: float) -> None:
    """W += factor * B A on this rank's rows only: B and W are both dim-0 shards of the same ``out`` rows
    over the same mesh, so this rank's rows of B A are its rows of B times the whole A (r x in, small).
    Building the full (out x in) delta on every rank would repeat the work and the memory W times
    (issue 15, defect 9)."""
    w = local_tensor(module.weight)
    if b_local.shape[0] != w.shape[0]:
        raise RuntimeError(f"LoRA: B holds {b_local.shape[0]} rows on this rank, W {w.shape[0]}: not sharded alike")
    w.add_((factor * (b_local @ a_full.to(b_local.device, b_local.dtype))).to(w.dtype))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (bf16 adapters are merged in float32; float64 ones stay float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


@torch.no_grad()
def merge_lora_linear(module: LoRALinear) -> None:
    """W += s * B A on this rank's rows of W; then B = 0 (the function is unchanged)."""
    add_local_product(module, _wide(local_tensor(module.lora_B)), _wide(full_tensor(module.lora_A)), module.scale)
    local_tensor(module.lora_B).zero_()


def uniform_fan_in_(t: torch.Tensor, g: torch.Generator) -> None:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = t.shape[1]."""
    bound = 1.0 / math.sqrt(t.shape[1])
    nn.init.uniform_(t, -bound, bound, generator=g)


@torch.no_grad()
def init_lora_linear(module: LoRALinear, init: str, gen: torch.Generator) -> None:
    """Draw A and B by ``init`` and compensate W so s*B*A + W is the old W (docs/peft.md, "LoRA")."""
    rank = module.lora_A.shape[0]
    if init == "kaiming":
        init_like(module.lora_A, lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g), gen)
        local_tensor(module.lora_B).zero_()
    elif init == "gaussian":
        init_like(module.lora_A, lambda t, g: nn.init.normal_(t, std=1.0 / rank, generator=g), gen)
        local_tensor(module.lora_B).zero_()
    elif init == "uniform":
        init_like(module.lora_A, uniform_fan_in_, gen)
        init_like(module.lora_B, uniform_fan_in_, gen)
        add_local_product(module, _wide(local_tensor(module.lora_B)), _wide(full_tensor(module.lora_A)), -module.scale)
    elif init == "pissa":
        a, b = pissa_factors(module, rank, gen)
        for p, full in ((module.lora_A, a), (module.lora_B, b)):
            local_tensor(p).copy_(local_part(full.float().to(local_tensor(p).device), p))
        add_local_product(module, local_part(b.to(local_tensor(module.lora_B).device), module.lora_B), a, -module.scale)
    else:
        raise ValueError(f"unknown LoRA init {init!r}")


@torch.no_grad()
def pissa_factors(module: LoRALinear, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float64, whole, the same on every rank: B A = the top-r singular triplets of W / s.

    The float64 SVD of the whole W runs on one rank, chosen from the adapter's seed so the SVDs of a
    model's linears spread over the ranks, and its factors are broadcast (r x (in + out) numbers), instead
    of every rank repeating the same SVD (issue 15, defect 9). Every rank takes part in gathering W."""
    w = full_tensor(module.weight)
    sharded = isinstance(module.weight, DTensor) and dist.is_initialized() and dist.get_world_size() > 1
    owner = gen.initial_seed() % dist.get_world_size() if sharded else 0
    a = torch.zeros(module.lora_A.shape, dtype=torch.float64, device=w.device)
    b = torch.zeros(module.lora_B.shape, dtype=torch.float64, device=w.device)
    if not sharded or dist.get_rank() == owner:
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        k = min(rank, s.numel())
        root = (s[:k] / module.scale).sqrt()
        b[:, :k] = u[:, :k] * root
        a[:k] = root[:, None] * vh[:k]
        if k < rank:  # r > min(out, in): extra directions get a random A row (B = 0), never A = B = 0
            extra = torch.empty(rank - k, a.shape[1]).uniform_(-1.0, 1.0, generator=gen).double() / math.sqrt(a.shape[1])
            a[k:] = extra.to(a.device)
    del w
    if sharded:
        dist.broadcast(a, owner)
        dist.broadcast(b, owner)
    return a, b


@PEFT.register("lora")
class LoRA(PeftMethod):
    Options = LoRAOptions
    description = "LoRA adapters on frozen block linears (rank, alpha, dropout, targets, init)"

    def __init__(self, options: LoRAOptions, layers: list[int], seed: int = 0):
        super().__init__(options, layers, seed)
        name = self.registry_name
        if not options.targets:
            raise ValueError(f"{name}.targets must name at least one linear (e.g. {ALL_LINEARS})")
        self.scale = options.alpha / options.rank

    def apply(self, model: nn.Module) -> None:
        targets = target_linears(model, self.layers, self.options.targets)
        if self.layers and not targets:
            raise ValueError(f"{self.registry_name}.targets {self.options.targets} match no linear in layers {self.layers}")
        for _, parent, attr, linear in targets:
            if isinstance(linear, LoRALinear):
                raise ValueError(f"{attr} already has an adapter; two adapter methods target the same linear")
            lora = LoRALinear(linear.in_features, linear.out_features, self.options.rank, self.scale,
                              self.options.dropout, device=linear.weight.device)
            lora.weight = linear.weight
            lora.weight.requires_grad_(False)
            setattr(parent, attr, lora)

    def modules(self, model: nn.Module) -> list[tuple[str, LoRALinear]]:
        """The adapted linears this method owns (its layers)."""
        return lora_modules(model, self.layers)

    @torch.no_grad()
    def init_weights(self, model: nn.Module) -> None:
        for name, module in self.modules(model):
            self.init_adapter(name, module, generation=0)

    def init_adapter(self, name: str, module: LoRALinear, generation: int) -> None:
        """(Re-)initialise one adapter from a generator seeded by (seed, name, generation): the same on every rank."""
        init_lora_linear(module, self.options.init, seeded_generator(self.seed, name, generation))

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        for _, module in self.modules(model):
            merge_lora_linear(module)
