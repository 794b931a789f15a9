"""SwitchLoRA (arXiv 2406.06564, method section; defaults from the authors' code, methods.md).

LoRA (y = W x + s B A x, s = alpha / r = 1/r by default) whose factors are
swapped, a few vectors at a time, with vectors from candidate pools. Each
adapted linear keeps two pools of ``pool_size`` vectors (default min(in, out),
as in the paper): candidates for the rows of A and for the columns of B.

Switching row i of A to candidate c, with compensation so the output is
unchanged:

    W <- W + s * B[:, i] (A[i, :] - c)^T ;   A[i, :] <- c

and the same for column j of B:  W <- W + s * (B[:, j] - c) A[j, :]^T ; B[:, j] <- c.
The vector switched out goes back into the pool slot c came from.

Schedule: at step t of T, interval(t) = interval0 / 0.3^(t / (descent_ratio * T)),
and r / interval(t) vectors of A and as many of B are switched, stochastically
rounded. After A[i] is switched its counterpart B[:, i] is frozen for
``freeze_steps`` optimizer steps (and vice versa), and the Adam state of the
switched vector -- both moments and its own step count -- is reset. Per-row
step counts need ``steptitan.optim.AdamWSliceSteps``, which this method asks
the trainer for (``optimizer_class``).

The freeze is exact: ``before_optimizer_step`` saves the frozen vectors and
their optimizer state, ``after_optimizer_step`` puts them back, so they get no
update at all (no gradient step, no momentum, no weight decay).

Under FSDP2: which vectors and which candidates are switched comes from a
generator seeded by (seed, linear, step), so every rank makes the same choice.
W and B are sharded on their output rows, so column switches are shard-local;
row switches gather A (r x in, small) and the chosen candidates. The pools are
per-rank shards (A candidates split along ``in``, B candidates along ``out``)
over the shard group; under HSDP every replica of a shard holds the same pool
(the same seeded choices on the same weights). A checkpoint stores each rank's
shards; a resume with another shard degree concatenates the saved shards and
re-shards them (``load_state_dict``). ``steptitan export`` / ``generate`` load no pools: they read
and merge the model, which is W + s B A alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from steptitan.distributed import (
    full_tensor,
    gather_rows,
    local_part,
    local_rows,
    local_tensor,
    seeded_generator,
    shard_degree,
    shard_index,
    shard_rows,
)
from steptitan.optim import AdamWSliceSteps
from steptitan.peft import StepContext, optimizer_state, target_linears
from steptitan.registry import PEFT
from steptitan.registry.peft.lora import LoRA, LoRAInit, LoRALinear, LoRAOptions

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class SwitchLoRAOptions(LoRAOptions):
    alpha: float = 1.0  # s = alpha / rank; the paper uses s = 1/r
    init: LoRAInit = "uniform"  # both A and B non-zero (paper), W compensated so the function is unchanged
    interval0: float = field(default=40.0, metadata={"gt": 0})  # initial switching interval (steps per r switched vectors)
    descent_ratio: float = field(default=0.1, metadata={"gt": 0})  # the interval has grown by 1/0.3 after descent_ratio * (stage steps)
    freeze_steps: int = field(default=5, metadata={"ge": 0})  # steps the counterpart of a switched vector is frozen
    pool_size: int = field(default=0, metadata={"ge": 0})  # candidates per pool; 0 = min(in, out) (paper)
    # where candidate pools live: the parameters' device ("model"; "auto" = there), or host memory ("cpu": off a
    # GPU's memory, as the paper, but every switch copies vectors between host and device; docs/peft.md)
    pool_device: Literal["auto", "cpu", "model"] = "auto"


def held_rows(param: torch.Tensor) -> torch.Tensor:
    """Global indices of the dim-0 rows of ``param`` this rank holds, computed on the CPU from the
    shard layout (FSDP2's torch.chunk rule): no device tensor, so no host-device sync to use them."""
    n, degree, index = param.shape[0], shard_degree(param), shard_index(param)
    start = min(n, index * math.ceil(n / degree))
    return torch.arange(start, start + local_rows(n, degree, index))


# --------------------------------------------------------------------------- the method


@PEFT.register("switchlora")
class SwitchLoRA(LoRA):
    Options = SwitchLoRAOptions
    description = "SwitchLoRA: LoRA vectors switched with compensated candidates, counterpart freeze, per-row Adam reset"

    def __init__(self, options: SwitchLoRAOptions, layers: list[int], seed: int = 0):
        super().__init__(options, layers, seed)
        self.pools: dict[str, dict[str, torch.Tensor]] = {}  # name -> {"A": (in_local, P), "B": (out_local, P)}
        # "frozen until": vector i of A (B) gets no update in optimizer steps <= frozen_A[name][i].
        self.frozen_A: dict[str, torch.Tensor] = {}
        self.frozen_B: dict[str, torch.Tensor] = {}
        self.switches = 0
        self._saved: list[tuple] = []  # frozen vectors saved before the optimizer step
        self.shard_degree, self.shard_index = 1, 0  # the pools' layout: this rank holds chunk shard_index of shard_degree

    def pool_size(self, module: nn.Linear) -> int:
        return self.options.pool_size or min(module.in_features, module.out_features)

    # ------------------------------------------------------------------ setup

    @torch.no_grad()
    def init_weights(self, model: nn.Module) -> None:
        super().init_weights(model)
        for name, module in self.modules(model):
            gen = seeded_generator(self.seed, name, "pools")
            p, a, b = self.pool_size(module), module.lora_A, module.lora_B
            self.shard_degree, self.shard_index = shard_degree(a), shard_index(a)
            # Candidates follow the "uniform" init of the vectors they replace (fan-in in for A, r for B).
            cand_a = torch.empty(p, module.in_features).uniform_(-1, 1, generator=gen) / math.sqrt(module.in_features)
            cand_b = torch.empty(module.out_features, p).uniform_(-1, 1, generator=gen) / math.sqrt(a.shape[0])
            device = "cpu" if self.options.pool_device == "cpu" else local_tensor(a).device  # auto, model: the device
            self.pools[name] = {"A": shard_rows(cand_a.t().contiguous(), a).to(device),
                                "B": local_part(cand_b.to(local_tensor(b).device), b).to(device)}
            self.frozen_A[name] = torch.zeros(a.shape[0], dtype=torch.long)
            self.frozen_B[name] = torch.zeros(a.shape[0], dtype=torch.long)

    def optimizer_class(self, model: nn.Module) -> tuple[type, dict[str, Any]]:
        step_dims: dict[torch.Tensor, int] = {}
        for _, module in self.modules(model):
            step_dims[module.lora_A] = 0  # one step count per row of A
            step_dims[module.lora_B] = 1  # one per column of B
        return AdamWSliceSteps, {"step_dims": step_dims}

    # ------------------------------------------------------------------ schedule

    def interval(self, step: int, total_steps: int) -> float:
        """interval0 / 0.3^(step / (descent_ratio * T)) (the paper's schedule); constant when T is unknown."""
        if total_steps <= 0:
            return self.options.interval0
        return self.options.interval0 / 0.3 ** (step / (self.options.descent_ratio * total_steps))

    def switch_count(self, rank: int, step: int, total_steps: int, gen: torch.Generator) -> int:
        expected = rank / self.interval(step, total_steps)
        whole = math.floor(expected)
        return whole + int(torch.rand((), generator=gen).item() < expected - whole)

    # ------------------------------------------------------------------ freeze

    def frozen_vectors(self, model: nn.Module, step: int):
        """(module, param, dim, local indices) of the vectors frozen during optimizer step ``step``.

        The bookkeeping stays on the CPU: a mask on the GPU and its ``.any()`` for every linear would
        cost a host-device sync per step even when nothing is frozen (issue 15, defect 4). Only the
        indices of frozen vectors travel to the device, without waiting (``non_blocking``)."""
        for name, module in self.modules(model):
            rows = (self.frozen_A[name][held_rows(module.lora_A)] >= step).nonzero()[:, 0]
            if rows.numel():
                yield module.lora_A, 0, rows.to(local_tensor(module.lora_A).device, non_blocking=True)
            cols = (self.frozen_B[name] >= step).nonzero()[:, 0]
            if cols.numel():
                yield module.lora_B, 1, cols.to(local_tensor(module.lora_B).device, non_blocking=True)

    @torch.no_grad()
    def before_optimizer_step(self, ctx: StepContext) -> None:
        self._saved = []
        for param, dim, idx in self.frozen_vectors(ctx.model, ctx.step):
            state = optimizer_state(ctx.optimizer, param)
            tensors = [param] + [state[k] for k in (*MOMENTS, "step") if k in state and state[k].dim() > 0]
            self._saved.append((dim, idx, [(t, local_tensor(t).index_select(dim, idx).clone()) for t in tensors]))

    @torch.no_grad()
    def restore_frozen(self) -> None:
        for dim, idx, saved in self._saved:
            for t, values in saved:
                local_tensor(t).index_copy_(dim, idx, values)
        self._saved = []

    # ------------------------------------------------------------------ switching

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        self.restore_frozen()
        for name, module in self.modules(ctx.model):
            gen = seeded_generator(self.seed, "switch", name, ctx.step)
            r = module.lora_A.shape[0]
            n = self.switch_count(r, ctx.step, ctx.total_steps, gen)
            free = ((self.frozen_A[name] <= ctx.step) & (self.frozen_B[name] <= ctx.step)).nonzero()[:, 0]
            free = free[torch.randperm(free.numel(), generator=gen)]
            rows, cols = free[:n], free[n:2 * n]  # disjoint: a vector and its counterpart never switch together
            pool = self.pool_size(module)
            slots = torch.randperm(pool, generator=gen)
            self.switch_rows(name, module, rows, slots[:rows.numel()], ctx.optimizer, ctx.step)
            slots = torch.randperm(pool, generator=gen)
            self.switch_cols(name, module, cols, slots[:cols.numel()], ctx.optimizer, ctx.step)

    @torch.no_grad()
    def switch_rows(self, name: str, module: LoRALinear, rows: torch.Tensor, slots: torch.Tensor, optimizer: Any, step: int) -> None:
        """A[rows] <- pool candidates, W += s B[:, rows] (A_old[rows] - c); the old rows go back to the pool."""
        if rows.numel() == 0:
            return
        A, B, W = module.lora_A, module.lora_B, module.weight
        a_full = full_tensor(A).float()
        pool = self.pools[name]["A"]
        slots = slots.to(pool.device, non_blocking=True)  # a device pool (pool_device = "model") takes a device index
        cand = gather_rows(pool[:, slots].float(), A, module.in_features).t()  # (k, in)
        on_device = rows.to(a_full.device, non_blocking=True)  # CPU bookkeeping -> device index, no wait
        old = a_full.index_select(0, on_device)
        w = local_tensor(W)
        b_local = local_tensor(B).float()
        w.add_((module.scale * b_local.index_select(1, on_device) @ (old - cand.to(old.device))).to(w.dtype))
        a_full.index_copy_(0, on_device, cand.to(a_full.device))
        local_tensor(A).copy_(local_part(a_full.to(local_tensor(A).dtype), A))
        pool[:, slots] = shard_rows(old.t().contiguous(), A).to(pool.device, pool.dtype)
        self.reset_state(optimizer, A, 0, rows)
        self.frozen_B[name][rows] = step + self.options.freeze_steps
        self.switches += rows.numel()

    @torch.no_grad()
    def switch_cols(self, name: str, module: LoRALinear, cols: torch.Tensor, slots: torch.Tensor, optimizer: Any, step: int) -> None:
        """B[:, cols] <- pool candidates, W += s (B_old[:, cols] - c) A[cols]; shard-local except gathering A."""
        if cols.numel() == 0:
            return
        A, B, W = module.lora_A, module.lora_B, module.weight
        a_full = full_tensor(A).float()
        b = local_tensor(B)
        pool = self.pools[name]["B"]
        slots = slots.to(pool.device, non_blocking=True)
        cand = pool[:, slots].to(b.device, torch.float32)  # (out_local, k)
        local_cols = cols.to(b.device, non_blocking=True)
        old = b[:, local_cols].float()
        w = local_tensor(W)
        w.add_((module.scale * (old - cand) @ a_full.index_select(0, local_cols.to(a_full.device))).to(w.dtype))
        b[:, local_cols] = cand.to(b.dtype)
        pool[:, slots] = old.to(pool.device, pool.dtype)
        self.reset_state(optimizer, B, 1, cols)
        self.frozen_A[name][cols] = step + self.options.freeze_steps
        self.switches += cols.numel()

    @staticmethod
    @torch.no_grad()
    def reset_state(optimizer: Any, param: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        """Zero the moments and the step count of the switched rows (dim 0) / columns (dim 1)."""
        state = optimizer_state(optimizer, param)
        if not state:
            return
        if dim == 0:  # rows of a dim-0-sharded tensor: keep those this rank holds (found on the CPU)
            local_index = torch.isin(held_rows(param), index.cpu()).nonzero()[:, 0]
        else:
            local_index = index.cpu()
        for key in (*MOMENTS, "step"):
            if key in state:
                t = local_tensor(state[key])
                if key == "step" and t.dim() == 0:
                    raise RuntimeError("SwitchLoRA needs per-row step counts (steptitan.optim.AdamWSliceSteps)")
                t.index_fill_(dim, local_index.to(t.device, non_blocking=True), 0)

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        """LoRA's merge, then drop the candidate pools: merge ends the stage (before the next growth, or
        for export), and the plan keeps this method alive for the whole run, so the pools would stay
        resident through every later stage (issue 15, defect 3)."""
        super().merge(model)
        self.pools, self._saved = {}, []

    # ------------------------------------------------------------------ memory and resume

    def _my_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's dim-0 chunk of a whole pool (FSDP2's torch.chunk layout over the shard group)."""
        start = min(full.shape[0], self.shard_index * math.ceil(full.shape[0] / self.shard_degree))
        return full[start:start + local_rows(full.shape[0], self.shard_degree, self.shard_index)]

    def counters(self) -> dict[str, float]:
        return {"switchlora/switches": self.switches}

    def extra_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pools in self.pools.values() for t in pools.values())

    def extra_state_on_host(self, device_type: str) -> bool:
        """``pool_device = "cpu"`` on a GPU keeps the pools in host memory, not the device's."""
        return self.options.pool_device == "cpu" and device_type != "cpu"

    def predicted_extra_state_bytes(self, model: nn.Module, world_size: int, rank: int) -> int:
        """Pool bytes rank ``rank`` will hold (for steptitan.memory), from the (meta) model's shapes."""
        total = 0
        for _, _, _, linear in target_linears(model, self.layers, self.options.targets):
            p = self.pool_size(linear)
            total += 4 * p * (local_rows(linear.in_features, world_size, rank) + local_rows(linear.out_features, world_size, rank))
        return total

    def state_dict(self) -> dict[str, Any]:
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {"world_size": world, "shard_degree": self.shard_degree, "switches": self.switches,
                "pools": {n: {k: t.cpu() for k, t in p.items()} for n, p in self.pools.items()},
                "frozen_A": dict(self.frozen_A), "frozen_B": dict(self.frozen_B)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.frozen_A = {n: t.clone() for n, t in state["frozen_A"].items()}
        self.frozen_B = {n: t.clone() for n, t in state["frozen_B"].items()}
        self.switches = int(state.get("switches", 0))
        if not self.pools:
            # No init_weights ran: a model loaded to be read and merged (steptitan export / generate), whose
            # function is W + s B A alone. The pools only serve further switching, so they are not loaded
            # (nor re-sharded: any saved shard degree will do). Issue 23, defect 1.
            return
        saved_degree = int(state.get("shard_degree", state["world_size"]))  # flat FSDP2 before HSDP
        if saved_degree == self.shard_degree:
            pools = state["pools"]
        elif len(state.get("shards", [])) == saved_degree:  # another shard degree: re-shard the saved pools
            pools = {name: {key: self._my_rows(torch.cat([s["pools"][name][key] for s in state["shards"]]))
                            for key in held} for name, held in state["pools"].items()}
        else:
            raise RuntimeError(f"SwitchLoRA candidate pools were saved in {saved_degree} shards, this run has "
                               f"{self.shard_degree} and the checkpoint's other shards were not given")
        for name, held in pools.items():
            for key, saved in held.items():
                self.pools[name][key].copy_(saved)
