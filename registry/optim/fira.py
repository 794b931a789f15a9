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
the byte count on more than one rank). The limiter runs on the device (``device_max``). Not resumable: the projector is a
Python object DCP cannot save.
"""

from __future__ import annotations

from typing import Any

import torch

from steptitan.registry import OPTIM
from steptitan.registry.optim.galore import Galore


@OPTIM.register("fira")
class Fira(Galore):
    """GaLore's plugin with FiraAdamW: same options (``scale`` is Fira's ``alpha``), targets and byte
    count, plus the limiter's residual norm per projected weight."""

    description = "Fira: GaLore + norm-scaled full-rank residual with a norm-growth limiter (fira package)"
    requires = "fira"
    imports = ("fira",)
    projected_extra_bytes = 4  # the norm-growth limiter's last residual norm: a 0-d fp32 tensor

    def projection_options(self) -> dict[str, Any]:
        return {"rank": self.options.rank, "update_proj_gap": self.options.update_proj_gap,
                "alpha": self.options.scale, "proj_type": "std"}

    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        from fira import FiraAdamW, fira_adamw

        # The package's norm-growth limiter is ``max(ratio, 1.01) / 1.01`` with a tensor ratio: Python's max
        # compares, i.e. calls bool() on the tensor -- a host-device sync per projected weight per step, and
        # on a DTensor a collective first (issue 23, item 5). The same value on the device: clamp.
        fira_adamw.max = device_max
        return FiraAdamW


def device_max(*args: Any, **kwargs: Any) -> Any:
    """``max`` for the fira module: ``max(tensor, number)`` -> ``tensor.clamp(min=number)`` (no host read);
    anything else -> Python's max."""
    if len(args) == 2 and not kwargs and torch.is_tensor(args[0]) and isinstance(args[1], (int, float)):
        return args[0].clamp(min=args[1])
    return max(*args, **kwargs)
