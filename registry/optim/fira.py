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
Under FSDP2 it runs on the local shards like ``galore`` (steptitan/lowrank.py:
one SVD per weight on its owner); the residual's scaling is per row or column
of tensors each rank holds, and the limiter stays on the device
(``clamp(ratio, min=1.01) / 1.01`` instead of the package's Python ``max``,
which calls bool() on a tensor). Not resumable: the projector is a Python
object DCP cannot save.
"""

from __future__ import annotations

from typing import Any

from steptitan.registry import OPTIM
from steptitan.registry.optim.galore import Galore


@OPTIM.register("fira")
class Fira(Galore):
    """GaLore's plugin with Fira's step (the residual) and projector: same options (``scale`` is Fira's ``alpha``), targets and byte
    count, plus the limiter's residual norm per projected weight."""

    description = "Fira: GaLore + norm-scaled full-rank residual with a norm-growth limiter (fira package)"
    requires = "fira"
    imports = ("fira",)
    projected_extra_bytes = 4  # the norm-growth limiter's last residual norm: a 0-d fp32 tensor
    residual = True

    def projection_options(self) -> dict[str, Any]:
        return {"rank": self.options.rank, "update_proj_gap": self.options.update_proj_gap,
                "alpha": self.options.scale, "proj_type": "std"}

    def projector(self, group: dict[str, Any]) -> Any:
        from fira.gradient_projection import GradientProjector

        return GradientProjector(group["rank"], update_proj_gap=group["update_proj_gap"], alpha=group["alpha"],
                                 proj_type=group["proj_type"])
