"""Fira (Chen et al. 2024, arXiv 2410.01623) through the ``fira`` package's FiraAdamW.

GaLore's projected Adam plus the part of the gradient the projection drops:
for a projected weight, the residual G - P P^T G is added to the update,
scaled by the ratio of the Adam-normalised to the raw projected gradient
(norm-based scaling, Sec. 4.2, one factor per row or column) and held back
by the norm-growth limiter (Sec. 4.3: the residual's norm grows at most 1.01x
per step). Targets, rank, update_proj_gap and scale (Fira's ``alpha``) work
as for ``galore``; other parameters get plain Adam in the same optimizer.

State of an m x n projected weight (``proj_type = "std"``, as the Fira
repository's torchrun_main.py): Adam moments of the projected gradient
(m x r' if m >= n, else r' x n, r' = min(r, smaller side)), the projection
matrix (r' x n or m x r', on a Python projector object) and the limiter's
last residual norm (a 0-d fp32 tensor, 4 bytes); steps are Python ints.
Under FSDP2 it runs on DTensor gradients like ``galore`` (same <2% caveat of
the byte count on more than one rank). Not resumable: the projector is a
Python object DCP cannot save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from steptitan.optim import OptimizerHParams, OptimizerPlugin
from steptitan.registry import OPTIM
from steptitan.registry.optim.galore import projected_side


@dataclass
class FiraOptions:
    rank: int = field(default=128, metadata={"gt": 0})  # rank of the gradient projection
    update_proj_gap: int = field(default=200, metadata={"gt": 0})  # steps between SVDs of the gradient
    scale: float = field(default=0.25, metadata={"gt": 0})  # Fira's alpha: scale of the projected update
    targets: list[str] = field(default_factory=lambda: ["attention", "feed_forward"])  # block submodules projected


@OPTIM.register("fira")
class Fira(OptimizerPlugin):
    Options = FiraOptions
    description = "Fira: GaLore + norm-scaled full-rank residual with a norm-growth limiter (fira package)"
    growth_state_policy = "fresh"  # moments live in the projected space
    resumable = False  # the projector is a Python object DCP cannot save
    requires = "fira"
    imports = ("fira",)

    def projects(self, name: str, ndim: int) -> bool:
        return ndim == 2 and name.startswith("layers.") and any(f".{t}." in name for t in self.options.targets)

    def build(self, named_params: Sequence[tuple[str, nn.Parameter]], hparams: OptimizerHParams) -> torch.optim.Optimizer:
        self.check_available()
        from fira import FiraAdamW

        extra = {"rank": self.options.rank, "update_proj_gap": self.options.update_proj_gap,
                 "alpha": self.options.scale, "proj_type": "std"}
        groups = [{"params": [p for n, p in named_params if not self.projects(n, p.dim())]},
                  {"params": [p for n, p in named_params if self.projects(n, p.dim())], **extra}]
        return FiraAdamW([g for g in groups if g["params"]], lr=hparams.lr, betas=hparams.betas, eps=hparams.eps,
                         weight_decay=hparams.weight_decay, no_deprecation_warning=True)

    def state_bytes(self, name: str, local_shape: Sequence[int], global_shape: Sequence[int],
                    world_size: int = 1, step_slices: int = 1) -> int:
        if not self.projects(name, len(local_shape)):
            return 8 * math.prod(local_shape)
        m, n = local_shape
        r, right = projected_side(m, n, self.options.rank)
        moments_and_projection = 4 * (2 * m * r + r * n) if right else 4 * (2 * r * n + m * r)
        return moments_and_projection + 4  # + the limiter's 0-d residual norm
