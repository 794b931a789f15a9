"""GaLore (Zhao et al., ICML 2024, arXiv 2403.03507) through galore-torch's GaLoreAdamW.

2-D block weights whose name matches ``targets`` (default: attention and FFN
linears) get GaLore's projected Adam (Alg. 2: rank r, update_proj_gap T,
scale alpha); every other parameter given to it gets plain Adam inside the
same optimizer, as in the GaLore repository's torchrun_main.py.

State of an m x n projected weight: Adam moments of the projected gradient
(m x r' if m >= n, else r' x n, r' = min(r, the smaller side)) and the
projection matrix (r' x n or m x r') on a Python projector object; other
parameters: two fp32 moments. Steps are Python ints (0 bytes).

Under FSDP2 the projection's SVD and matmuls run on DTensor gradients, so the
projection comes from the full gradient as on one device; DTensor picks the
projected moments' placements, which the byte count (it assumes dim-0 shards
of the local shape) does not follow on more than one rank: measured under 2%
off (BENCHMARKS.md). Not resumable: the projector is a Python object in the
optimizer state that DCP cannot save (docs/optimizers.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from steptitan.optim import OptimizerHParams, OptimizerPlugin
from steptitan.registry import OPTIM


@dataclass
class GaloreOptions:
    rank: int = field(default=128, metadata={"gt": 0})  # rank of the gradient projection
    update_proj_gap: int = field(default=200, metadata={"gt": 0})  # steps between SVDs of the gradient (T)
    scale: float = field(default=0.25, metadata={"gt": 0})  # alpha: scale of the projected update
    targets: list[str] = field(default_factory=lambda: ["attention", "feed_forward"])  # block submodules projected


def projected_side(m: int, n: int, rank: int) -> tuple[int, bool]:
    """(r', right): GaLore's "std" projection keeps the smaller side, r' = min(rank, that side)."""
    return (min(rank, n), True) if m >= n else (min(rank, m), False)


@OPTIM.register("galore")
class Galore(OptimizerPlugin):
    Options = GaloreOptions
    description = "GaLore: Adam on a rank-r projection of block-linear gradients (galore-torch)"
    growth_state_policy = "fresh"  # moments live in the projected space: nothing maps them through growth
    resumable = False  # the projector is a Python object DCP cannot save
    requires = "galore"
    imports = ("galore_torch",)

    def projects(self, name: str, ndim: int) -> bool:
        return ndim == 2 and name.startswith("layers.") and any(f".{t}." in name for t in self.options.targets)

    # Hooks that Fira (registry/optim/fira.py), GaLore plus a residual, overrides.
    projected_extra_bytes: ClassVar[int] = 0  # per projected weight, beyond moments and projection

    def projection_options(self) -> dict[str, Any]:
        """The projected param group's options, in the package's own names."""
        return {"rank": self.options.rank, "update_proj_gap": self.options.update_proj_gap,
                "scale": self.options.scale, "proj_type": "std"}

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW

    def build(self, named_params: Sequence[tuple[str, nn.Parameter]], hparams: OptimizerHParams) -> torch.optim.Optimizer:
        self.check_available()
        groups = [{"params": [p for n, p in named_params if not self.projects(n, p.dim())]},
                  {"params": [p for n, p in named_params if self.projects(n, p.dim())], **self.projection_options()}]
        return self.optimizer_class()([g for g in groups if g["params"]], lr=hparams.lr, betas=hparams.betas,
                                      eps=hparams.eps, weight_decay=hparams.weight_decay, no_deprecation_warning=True)

    def state_bytes(self, name: str, local_shape: Sequence[int], global_shape: Sequence[int],
                    world_size: int = 1, step_slices: int = 1) -> int:
        if not self.projects(name, len(local_shape)):
            return 8 * math.prod(local_shape)
        m, n = local_shape
        r, right = projected_side(m, n, self.options.rank)
        # right: moments (m, r') + projection (r', n); left: moments (r', n) + projection (m, r')
        moments_and_projection = 4 * (2 * m * r + r * n) if right else 4 * (2 * r * n + m * r)
        return moments_and_projection + self.projected_extra_bytes
