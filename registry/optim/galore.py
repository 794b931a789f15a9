"""GaLore (Zhao et al., ICML 2024, arXiv 2403.03507): galore-torch's projected Adam, run on FSDP2 shards.

2-D block weights whose name matches ``targets`` (default: attention and FFN
linears) get GaLore's projected Adam (Alg. 2: rank r, update_proj_gap T,
scale alpha); every other parameter given to it gets plain Adam inside the
same optimizer, as in the GaLore repository's torchrun_main.py.

The step is galore-torch's ``GaLoreAdamW`` arithmetic, written for dim-0 shards
(``steptitan.lowrank.ProjectedAdamW``): each projected weight's SVD runs once,
on the rank that owns it (round robin), and its projector is broadcast; the
update is computed for this rank's rows only. The projector itself is the
package's ``GaLoreProjector`` (its SVD routine), so the result is the package's
(bit for bit without a process group; to float32 tolerance sharded, tested).

State of an m x n projected weight (global shape, r' = min(r, m, n)): Adam
moments of the projected gradient (this rank's m_loc x r' rows if m >= n; the
whole r' x n, replicated, if m < n) and the projector (the whole r' x n if
m >= n; this rank's m_loc x r' rows if m < n); other parameters: two fp32
moments. Steps are Python ints (0 bytes). Not resumable: the projector is a
Python object in the optimizer state that DCP cannot save (docs/optimizers.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from steptitan.distributed import local_rows
from steptitan.lowrank import ProjectedAdamW, owner_of, refresh_buffer_bytes, svd_flops
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
    residual: ClassVar[bool] = False  # Fira adds the projection's residual to the update

    def projection_options(self) -> dict[str, Any]:
        """The projected param group's options, in the package's own names."""
        return {"rank": self.options.rank, "update_proj_gap": self.options.update_proj_gap,
                "scale": self.options.scale, "proj_type": "std"}

    def projector(self, group: dict[str, Any]) -> Any:
        """The package's projector object for a projected param group (its SVD routine and factor)."""
        from galore_torch.galore_projector import GaLoreProjector

        return GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                               proj_type=group["proj_type"])

    def build(self, named_params: Sequence[tuple[str, nn.Parameter]], hparams: OptimizerHParams) -> torch.optim.Optimizer:
        self.check_available()
        groups = [{"params": [p for n, p in named_params if not self.projects(n, p.dim())]},
                  {"params": [p for n, p in named_params if self.projects(n, p.dim())], **self.projection_options()}]
        return ProjectedAdamW([g for g in groups if g["params"]], self.projector, self.residual, lr=hparams.lr,
                              betas=hparams.betas, eps=hparams.eps, weight_decay=hparams.weight_decay)

    def state_bytes(self, name: str, local_shape: Sequence[int], global_shape: Sequence[int],
                    world_size: int = 1, step_slices: int = 1) -> int:
        if not self.projects(name, len(local_shape)):
            return 8 * math.prod(local_shape)
        m_loc = local_shape[0]
        m, n = global_shape
        r, right = projected_side(m, n, self.options.rank)
        r = min(r, m)
        # right: moments (m_loc, r') + projector (r', n); left: moments (r', n) replicated + projector rows (m_loc, r')
        moments_and_projection = 4 * (2 * m_loc * r + r * n) if right else 4 * (2 * r * n + m_loc * r)
        return moments_and_projection + self.projected_extra_bytes

    def _owned(self, named_shapes: Sequence[tuple[str, Sequence[int]]], world_size: int,
               rank: int) -> list[tuple[int, int]]:
        """Global (m, n) of the projected weights ``rank`` computes the SVD of: the optimizer's projected
        parameters in ``named_shapes``' order (the order the optimizer is built in), dealt round robin."""
        projected = [tuple(s) for n, s in named_shapes if self.projects(n, len(s))]
        return [s for k, s in enumerate(projected) if owner_of(k, world_size) == rank]

    def refresh_bytes(self, named_shapes: Sequence[tuple[str, Sequence[int]]], world_size: int = 1,
                      rank: int = 0) -> int:
        """Peak transient bytes of a projection refresh on ``rank``: the largest gathered gradient it owns
        (padded to FSDP2's chunks) with its SVD factors; one rank keeps no gather buffer."""
        return max((refresh_buffer_bytes(m, n, world_size) for m, n in self._owned(named_shapes, world_size, rank)),
                   default=0)

    def step_flops(self, named_shapes: Sequence[tuple[str, Sequence[int]]], world_size: int = 1,
                   rank: int = 0) -> dict[str, int]:
        """FLOPs per step on ``rank`` of the projection: projecting the gradient and back (and Fira's
        residual: a second projection back) on this rank's rows, and the SVDs it owns averaged over
        ``update_proj_gap`` steps. Adam's element-wise work is not counted."""
        matmuls = 2 + int(self.residual)
        projection = 0
        for name, shape in named_shapes:
            if self.projects(name, len(shape)):
                m, n = shape
                r = min(self.options.rank, m, n)
                projection += matmuls * 2 * local_rows(m, world_size, rank) * n * r
        svd = sum(svd_flops(m, n) for m, n in self._owned(named_shapes, world_size, rank))
        return {"projection": projection, "svd": svd // self.options.update_proj_gap}
