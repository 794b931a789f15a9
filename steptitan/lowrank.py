"""GaLore's and Fira's projected Adam on FSDP2 shards: one SVD per weight, local updates, no host reads.

GaLore (Zhao et al. 2024, arXiv 2403.03507, Alg. 2) keeps Adam's moments for a rank-r projection
of a weight's gradient, refreshed every ``update_proj_gap`` steps from the gradient's SVD; Fira
(Chen et al. 2024, arXiv 2410.01623) adds the residual the projection drops, scaled per row or
column (Sec. 4.2) and held back by a norm-growth limiter (Sec. 4.3). The packages (galore-torch,
fira) run on whole tensors. Run on FSDP2's DTensors they work, but DTensor has no sharded SVD, so
every rank all-gathers each gradient and runs the same SVD; a left projection (m < n) builds the
whole m x n update on every rank; and fira's limiter ``max(tensor, 1.01)`` calls ``bool()`` on a
tensor (a collective and a host sync per weight per step). ``ProjectedAdamW`` is the packages'
step with the same arithmetic, written for dim-0 shards:

* **refresh, once per weight.** The projected weights are dealt round robin over the shard group
  in the optimizer's parameter order (the same on every rank). A refresh runs in rounds of one
  weight per rank: each weight's gradient is gathered on its owner only (one ``gather``), every
  owner runs the package's own SVD routine on its whole gradient (the ranks' SVDs run at the same
  time), and each projector goes out from its owner: the r x n right factor (m >= n) by
  ``broadcast``, the m x r left factor (m < n) by ``scatter`` of its rows (a rank only needs the
  rows of its shard). The projector is bit-identical to the SVD of the whole gradient.
* **the step on the local shard.** m >= n: the projected gradient, its moments and the update are
  this rank's rows (G_loc P^T, no communication). m < n: P^T G is a sum over the sharded rows, so
  ``P_loc^T G_loc`` is all-reduced (r x n, the one collective the math needs); the r x n moments
  are replicated (every rank updates the same small tensors), and the update ``P_loc N`` is this
  rank's rows only. Fira's residual ``G - P P^T G`` and its scaling are per row (m >= n) or per
  column of the replicated projected tensors (m < n): both local.
* **the limiter on the device.** The residual's norm is the one other collective (an all-reduce of
  a 1-element sum of squares per weight); the limiter is ``clamp(ratio, min=1.01) / 1.01``.

Without a process group (or on one rank) the step is the package's, bit for bit (tested). State per
projected weight: ``step`` (int), ``exp_avg`` / ``exp_avg_sq`` of the projected gradient (DTensors:
rows sharded for m >= n, replicated for m < n), ``projector`` (the package's projector object;
``ortho_matrix`` is the whole r x n factor, or this rank's m_loc x r rows) and Fira's
``scaling_grad`` (0-d). Other parameters get the packages' plain Adam branch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from steptitan.distributed import local_rows


def right_projection(m: int, n: int) -> bool:
    """galore-torch's "std" choice: project from the right (keep rows) when m >= n, else from the left."""
    return m >= n


def owner_of(position: int, degree: int) -> int:
    """Shard-group rank that computes the SVD of the ``position``-th projected weight (round robin)."""
    return position % degree


def refresh_buffer_bytes(m: int, n: int, degree: int, elem: int = 4) -> int:
    """Bytes the owner holds at the SVD of an m x n gradient: the thin SVD's factors U, S, Vh (fp32)
    and, sharded, the gather buffer (``degree`` chunks of ceil(m / degree) rows: FSDP2's padded
    chunks; on one rank the SVD reads the gradient itself). LAPACK's workspace is not counted."""
    k = min(m, n)
    gathered = elem * degree * math.ceil(m / degree) * n if degree > 1 else 0
    return gathered + 4 * (m * k + k + k * n)


def svd_flops(m: int, n: int) -> int:
    """FLOPs of a thin SVD with both factors of an m x n matrix: Golub & Van Loan (4th ed., Fig. 8.6.1,
    R-SVD with U1, Sigma, V) 6 a b^2 + 20 b^3 for a = max(m, n), b = min(m, n)."""
    a, b = max(m, n), min(m, n)
    return 6 * a * b * b + 20 * b ** 3


class _Shards:
    """The shard group of a dim-0 sharded DTensor parameter (None parts for a plain tensor)."""

    def __init__(self, p: torch.Tensor):
        self.dtensor = isinstance(p, DTensor)
        self.group, self.degree, self.index = None, 1, 0
        if self.dtensor:
            dims = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
            if dims:
                if len(dims) > 1 or p.placements[dims[0]].dim != 0:
                    raise ValueError(f"projected weights must be sharded on dim 0 over one mesh dim, got {p.placements}")
                self.group = p.device_mesh.get_group(dims[0])
                self.degree, self.index = dist.get_world_size(self.group), dist.get_rank(self.group)
            self.mesh, self.placements = p.device_mesh, p.placements

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def wrap(self, local: torch.Tensor, shape: Sequence[int], sharded: bool) -> torch.Tensor:
        """``local`` as this parameter's DTensor: rows sharded like the parameter, or replicated."""
        if not self.dtensor:
            return local
        placements = self.placements if sharded else [Replicate()] * len(self.placements)
        stride = tuple(math.prod(shape[k + 1:]) for k in range(len(shape)))
        return DTensor.from_local(local, self.mesh, placements, run_check=False, shape=tuple(shape), stride=stride)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.degree > 1:
            dist.all_reduce(t, group=self.group)
        return t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """A compact copy of ``t`` with column-major strides (LAPACK's layout)."""
    return t.t().contiguous().t()


class ProjectedAdamW(torch.optim.Optimizer):
    """galore-torch's ``GaLoreAdamW`` (``residual=False``) or fira's ``FiraAdamW`` (``residual=True``)
    on dim-0 shards. A param group with ``rank`` is projected (its options: ``rank``,
    ``update_proj_gap``, ``scale``, ``proj_type = "std"``); the others get the packages' Adam."""

    def __init__(self, params: Iterable[Any], projector_factory: Callable[[dict[str, Any]], Any], residual: bool,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias))
        for group in self.param_groups:
            if "rank" in group and group.get("proj_type", "std") != "std":
                raise ValueError(f"only proj_type = 'std' is supported, got {group['proj_type']!r}")
        self.projector_factory = projector_factory  # kept off ``defaults``: not saved
        self.residual = residual

    def projected(self) -> list[torch.Tensor]:
        """The projected parameters in the order every rank agrees on (param groups, then their lists)."""
        return [p for g in self.param_groups if "rank" in g for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._refresh_projections()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    # ------------------------------------------------------------------ the refresh: one SVD per weight

    def _refresh_projections(self) -> None:
        due = []
        for position, p in enumerate(self.projected()):
            if p.grad is None:
                continue
            state = self.state[p]
            group = self._group_of(p)
            if "projector" not in state:
                state["projector"] = self.projector_factory(group)
                state.setdefault("step", 0)
            if state["projector"].ortho_matrix is None or state.get("step", 0) % group["update_proj_gap"] == 0:
                due.append((position, p, group))
        by_degree: dict[int, list] = {}
        for item in due:  # one round-robin deal per shard group size (one group under FSDP2)
            by_degree.setdefault(_Shards(item[1]).degree, []).append(item)
        for degree, items in by_degree.items():
            for start in range(0, len(items), degree):  # rounds: at most one weight per owner
                self._refresh_round(items[start:start + degree])

    def _refresh_round(self, items: list[tuple[int, torch.Tensor, dict[str, Any]]]) -> None:
        mine = None
        for position, p, group in items:  # gather each gradient on its owner
            shards = _Shards(p)
            owner = owner_of(position, shards.degree)
            full = self._gather_to(p.grad, shards, owner)
            if shards.index == owner:
                mine = (p, group, full)
        factors: dict[int, torch.Tensor] = {}
        if mine is not None:  # this rank's SVD, at the same time as the other owners'
            p, group, full = mine
            mine = None  # the gathered gradient is freed once its SVD is taken
            side = "right" if right_projection(*p.shape) else "left"
            factor = self.state[p]["projector"].get_orthogonal_matrix(full, group["rank"], type=side)
            del full
            factors[id(p)] = factor
        for position, p, group in items:  # each projector from its owner
            self.state[p]["projector"].ortho_matrix = self._send_projector(p, factors.get(id(p)), group["rank"],
                                                                          owner_of(position, _Shards(p).degree))

    def _gather_to(self, grad: torch.Tensor, shards: _Shards, owner: int) -> torch.Tensor | None:
        """The whole gradient on shard rank ``owner`` (None elsewhere): one gather of FSDP2's padded chunks
        into one buffer, returned as a view of its first m rows."""
        local = _local(grad)
        if shards.degree == 1:
            return local
        m = grad.shape[0]
        chunk = math.ceil(m / shards.degree)
        send = local.contiguous()
        if local.shape[0] < chunk:
            send = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype, device=local.device)
            send[:local.shape[0]] = local
        buffer = pieces = None
        if shards.index == owner:
            buffer = torch.empty((chunk * shards.degree, *local.shape[1:]), dtype=local.dtype, device=local.device)
            pieces = list(buffer.split(chunk))
        dist.gather(send, pieces, dst=shards.global_rank(owner), group=shards.group)
        return None if buffer is None else buffer[:m]

    def _send_projector(self, p: torch.Tensor, factor: torch.Tensor | None, rank: int, owner: int) -> torch.Tensor:
        """Every rank's projector from the owner's ``factor``: r x n whole (right), or this rank's rows of
        m x r (left). LAPACK returns column-major factors, and the BLAS rounds a transposed operand
        differently, so every rank keeps the factor column-major as the package does (it keeps a view of
        the whole factor; a compact copy frees the rest)."""
        shards = _Shards(p)
        if shards.degree == 1:
            return _column_major(factor)
        m, n = p.shape
        r = min(rank, m, n)
        local = _local(p.grad)  # the factor has the gradient's dtype (galore-torch casts the SVD's back to it)
        if right_projection(m, n):  # (r, n) column-major is (n, r) row-major, transposed
            out = _column_major(factor).t() if factor is not None else torch.empty((n, r), dtype=local.dtype,
                                                                                   device=local.device)
            dist.broadcast(out, src=shards.global_rank(owner), group=shards.group)
            return out.t()
        chunk = math.ceil(m / shards.degree)
        out = torch.empty((r, chunk), dtype=local.dtype, device=local.device)
        pieces = None
        if factor is not None:  # rank k's rows of the m x r factor: a contiguous (r, chunk) block of its transpose
            padded = torch.zeros((shards.degree, r, chunk), dtype=factor.dtype, device=factor.device)
            for k in range(shards.degree):
                rows = local_rows(m, shards.degree, k)
                padded[k, :, :rows] = factor[k * chunk:k * chunk + rows].t()
            pieces = list(padded.unbind(0))
        dist.scatter(out, pieces, src=shards.global_rank(owner), group=shards.group)
        return out[:, :local_rows(m, shards.degree, shards.index)].t()

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    # ------------------------------------------------------------------ the update on the local shard

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """One parameter's step, op for op the package's (galore_torch/adamw.py, fira/fira_adamw.py)."""
        state = self.state[p]
        state.setdefault("step", 0)
        projected = "rank" in group
        shards = _Shards(p)
        grad_full_local = _local(p.grad)
        grad = self._project(p, grad_full_local, shards) if projected else grad_full_local
        if "exp_avg" not in state:
            shape = self._projected_shape(p, group) if projected else tuple(p.shape)
            sharded = not projected or right_projection(*p.shape)
            state["exp_avg"] = shards.wrap(torch.zeros_like(grad), shape, sharded)
            state["exp_avg_sq"] = shards.wrap(torch.zeros_like(grad), shape, sharded)
        exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=(1.0 - beta1))
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            bias_correction1 = 1.0 - beta1 ** state["step"]
            bias_correction2 = 1.0 - beta2 ** state["step"]
            step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
        norm_grad = exp_avg / denom
        if projected:
            update = self._project_back(p, norm_grad, group)
            if self.residual:
                update = update + self._scaled_residual(p, grad_full_local, grad, norm_grad, group, shards)
            norm_grad = update
        param = _local(p)
        param.add_(norm_grad, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            param.add_(param, alpha=(-group["lr"] * group["weight_decay"]))

    def _projected_shape(self, p: torch.Tensor, group: dict[str, Any]) -> tuple[int, int]:
        m, n = p.shape
        r = min(group["rank"], m, n)
        return (m, r) if right_projection(m, n) else (r, n)

    def _project(self, p: torch.Tensor, grad: torch.Tensor, shards: _Shards) -> torch.Tensor:
        ortho = self.state[p]["projector"].ortho_matrix
        if right_projection(*p.shape):
            return torch.matmul(grad, ortho.t())  # this rank's rows
        return shards.all_reduce(torch.matmul(ortho.t(), grad))  # a sum over the sharded rows

    def _project_back(self, p: torch.Tensor, low: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """This rank's rows of the projected-back tensor (galore's ``scale``, fira's ``alpha``)."""
        ortho = self.state[p]["projector"].ortho_matrix
        back = torch.matmul(low, ortho) if right_projection(*p.shape) else torch.matmul(ortho, low)
        return back * group["scale" if "scale" in group else "alpha"]

    def _scaled_residual(self, p: torch.Tensor, grad: torch.Tensor, low_grad: torch.Tensor, norm_grad: torch.Tensor,
                         group: dict[str, Any], shards: _Shards) -> torch.Tensor:
        """Fira's residual (Sec. 4.2) through its norm-growth limiter (Sec. 4.3), on the device."""
        state = self.state[p]
        subgrad = self._project_back(p, low_grad, group)
        rows, cols = self._projected_shape(p, group)
        norm_dim = 0 if rows < cols else 1  # the package's choice, from the projected gradient's shape
        scaling_factor = torch.norm(norm_grad, dim=norm_dim) / (torch.norm(low_grad, dim=norm_dim) + 1e-8)
        if norm_dim == 1:
            scaling_factor = scaling_factor.unsqueeze(1)
        scaling_grad = (grad - subgrad) * scaling_factor
        if shards.degree > 1:  # the whole residual's norm: one all-reduce of its sum of squares
            scaling_grad_norm = shards.all_reduce(scaling_grad.square().sum()).sqrt()
        else:
            scaling_grad_norm = torch.norm(scaling_grad)
        if "scaling_grad" in state:
            limiter = torch.clamp(scaling_grad_norm / (_local(state["scaling_grad"]) + 1e-8), min=1.01) / 1.01
            scaling_grad = scaling_grad / limiter
            scaling_grad_norm = scaling_grad_norm / limiter
        state["scaling_grad"] = shards.wrap(scaling_grad_norm, (), sharded=False)
        return scaling_grad
