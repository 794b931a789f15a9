"""APOLLO (Zhu et al., MLSys 2025, arXiv 2412.05270) through ``apollo-torch``'s APOLLOAdamW.

SGD-like memory with AdamW-like results: for a targeted m x n block weight,
Adam's moments are kept for a *random* rank-r projection of the gradient
(Sec. 4.1, a Gaussian matrix from a per-tensor seed, redrawn every
``update_proj_gap`` steps), and only the ratio of the Adam-normalised to the
raw projected gradient is used: one scaling factor per channel (Sec. 4.2,
``scale_type = "channel"``) or per tensor (APOLLO-Mini, rank 1), applied to
the full-rank gradient, held back by Fira's norm-growth limiter (Sec. 4.3).
Other parameters given to it (embeddings, head, norms, PEFT adapters) get the
package's plain AdamW in the same optimizer, as in the APOLLO repository's
main_pretrain.py.

Two things the package does not do and this adapter adds (docs/optimizers.md):

* FSDP2. The package draws the projection as a plain tensor from the
  gradient's global shape and multiplies it with the gradient, which DTensor
  refuses ("got mixed torch.Tensor and DTensor"). Every rank draws the same
  matrix (same seed, same shape), so the adapter wraps it as a *replicated*
  DTensor; DTensor then does the collectives (the left projection's sum over
  the sharded rows, the limiter's whole-tensor norm) and the sharded update is
  the single-device one. A left projection's Partial result is made
  replicated, so its moments are whole on every rank, and so is the limiter's
  norm (DCP cannot save a pending reduction).
* Resume. The projector is a Python object in the state, which DCP cannot
  save. It is dropped from ``state_dict()`` and its one piece of information,
  the seed that drew the current matrix (``proj_seed``, a Python int), is
  saved instead; the next step after a load redraws that matrix and the
  projector continues from the next seed, exactly as without the interruption.

State of an m x n projected weight (global shape, "std" projection): right
(m >= n): moments m_local x r + projection r x n (replicated); left (m < n):
moments r x n + projection m x r (both replicated); + the limiter's last norm
(a 0-d fp32 tensor). Other parameters: two fp32 moments like the shard. Steps
and seeds are Python ints (0 bytes). Exact bytes: tests/test_optim.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate

from steptitan.optim import OptimizerHParams, OptimizerPlugin
from steptitan.registry import OPTIM


@dataclass
class ApolloOptions:
    rank: int = field(default=256, metadata={"gt": 0})  # rank of the random projection (APOLLO-Mini: 1)
    update_proj_gap: int = field(default=200, metadata={"gt": 0})  # steps between redraws of the projection (T)
    scale: float = field(default=1.0, metadata={"gt": 0})  # alpha: update scale (APOLLO 1, APOLLO-Mini 128)
    scale_type: Literal["channel", "tensor"] = "channel"  # one scaling factor per channel (APOLLO) or tensor (Mini)
    norm_growth_limiter: bool = True  # Fira's limiter: the scaled gradient's norm grows <= 1.01x per step
    targets: list[str] = field(default_factory=lambda: ["attention", "feed_forward"])  # block submodules projected


def right_projected(global_shape: Sequence[int]) -> bool:
    """The package's "std" projection: from the right (keeping rows) when m >= n, else from the left."""
    return global_shape[0] >= global_shape[1]


def _without_projectors(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {**state_dict, "state": {k: {n: v for n, v in st.items() if n != "projector"}
                                    for k, st in state_dict["state"].items()}}


def _apollo_optimizer_class() -> type[torch.optim.Optimizer]:
    """APOLLOAdamW with DTensor projections and a DCP-saveable projector (module docstring)."""
    from apollo_torch import APOLLOAdamW
    from apollo_torch.random_projector import GradientProjector, next_seed

    class DTensorProjector(GradientProjector):
        matrix_seed: int | None = None  # the seed that drew the current ortho_matrix

        def update_ortho_matrix(self, full_rank_grad: torch.Tensor, proj_type: str) -> None:
            self.matrix_seed = self.seed
            super().update_ortho_matrix(full_rank_grad, proj_type)

        def get_orthogonal_matrix(self, weights: torch.Tensor, rank: int, type: str, seed: int) -> torch.Tensor:
            proj = super().get_orthogonal_matrix(weights, rank, type, seed)
            if isinstance(weights, DTensor):  # same seed and global shape on every rank: the same matrix
                proj = DTensor.from_local(proj, weights.device_mesh, [Replicate()] * weights.device_mesh.ndim,
                                          run_check=False)
            return proj

        def project(self, full_rank_grad: torch.Tensor, iter: int) -> torch.Tensor:
            low_rank = super().project(full_rank_grad, iter)
            if isinstance(low_rank, DTensor) and any(isinstance(p, Partial) for p in low_rank.placements):
                low_rank = low_rank.redistribute(placements=[Replicate()] * low_rank.device_mesh.ndim)
            return low_rank

    class ApolloAdamW(APOLLOAdamW):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # The package numbers parameters as projection seeds in __init__; kept off the state until
            # the first step, so an optimizer that has not stepped holds no state (growth policy "fresh").
            self.initial_seeds = {p: st.pop("seed") for p, st in self.state.items()}
            self.state.clear()

        def _initialize_projector(self, group: dict, state: dict) -> Any:
            return DTensorProjector(group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                                    proj_type=group["proj_type"], seed=state["seed"])

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    state.setdefault("seed", self.initial_seeds[p])
                    if "rank" in group and "projector" not in state and "proj_seed" in state:
                        self._restore_projector(group, state, p.grad)
            loss = super().step(closure)
            for st in self.state.values():
                if "projector" in st:
                    st["proj_seed"] = int(st["projector"].matrix_seed)
                norm = st.get("scaled_grad")
                if isinstance(norm, DTensor) and any(isinstance(p, Partial) for p in norm.placements):
                    # the limiter's first norm is a pending (Partial) reduction: DCP needs it reduced
                    st["scaled_grad"] = norm.redistribute(placements=[Replicate()] * norm.device_mesh.ndim)
            return loss

        def _restore_projector(self, group: dict, state: dict, grad: torch.Tensor) -> None:
            """After a load: redraw the matrix the saved run was using and continue from the next seed."""
            projector = self._initialize_projector(group, state)
            seed = int(state["proj_seed"])
            side = "right" if right_projected(grad.shape) else "left"
            projector.ortho_matrix = projector.get_orthogonal_matrix(grad, group["rank"], side, seed)
            projector.matrix_seed, projector.seed = seed, next_seed(seed)
            state["projector"] = projector

        def state_dict(self) -> dict[str, Any]:
            return _without_projectors(super().state_dict())

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            # DCP's unflattening may hand back an empty placeholder for the key the live state had
            super().load_state_dict(_without_projectors(state_dict))

    return ApolloAdamW


@OPTIM.register("apollo")
class Apollo(OptimizerPlugin):
    Options = ApolloOptions
    description = "APOLLO: AdamW-like update scaled from a random rank-r projection, SGD-like memory (apollo-torch)"
    growth_state_policy = "fresh"  # moments live in a random projected space: nothing maps them through growth
    resumable = True  # the projector is rebuilt from its saved seed (module docstring)
    requires = "apollo"
    imports = ("apollo_torch",)

    def projects(self, name: str, ndim: int) -> bool:
        """A block linear's weight under ``targets`` (not a PEFT adapter such as ``...wq.lora_A``: its
        gradient is rank-r already; the package's AdamW branch takes it, as the 1-D norms)."""
        return (ndim == 2 and name.startswith("layers.") and name.endswith(".weight")
                and any(f".{t}." in name for t in self.options.targets))

    def build(self, named_params: Sequence[tuple[str, nn.Parameter]], hparams: OptimizerHParams) -> torch.optim.Optimizer:
        self.check_available()
        o = self.options
        projected = {"rank": o.rank, "proj": "random", "scale_type": o.scale_type, "scale": o.scale,
                     "update_proj_gap": o.update_proj_gap, "proj_type": "std"}
        groups = [{"params": [p for n, p in named_params if not self.projects(n, p.dim())]},
                  {"params": [p for n, p in named_params if self.projects(n, p.dim())], **projected}]
        return _apollo_optimizer_class()([g for g in groups if g["params"]], lr=hparams.lr, betas=hparams.betas,
                                         eps=hparams.eps, weight_decay=hparams.weight_decay,
                                         disable_nl=not o.norm_growth_limiter)

    def state_bytes(self, name: str, local_shape: Sequence[int], global_shape: Sequence[int],
                    world_size: int = 1, step_slices: int = 1) -> int:
        if not self.projects(name, len(local_shape)):
            return 8 * math.prod(local_shape)
        r = self.options.rank
        (m_local, n), m = local_shape, global_shape[0]
        # right: moments (m_local, r) sharded + projection (r, n); left: moments (r, n) + projection (m, r)
        moments_and_projection = 4 * (2 * m_local * r + r * n) if right_projected(global_shape) else 4 * (2 * r * n + m * r)
        return moments_and_projection + (4 if self.options.norm_growth_limiter else 0)  # the limiter's last norm
