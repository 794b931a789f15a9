"""Exact per-rank model-state bytes of a stage, and the STEP paper's formula to compare against.

Two views (docs/benchmark.md, "Memory model"):

1. ``model_state_bytes``: per-stage, per-rank bytes of parameters (trainable and
   frozen apart, by dtype), gradients, optimizer state and adapter pools. It
   walks the stage's meta model (``StagePlan.build``), so every PEFT method's
   adapter parameters E(P) are counted as they are built, and it applies
   FSDP2's dim-0 sharding rule tensor by tensor. It predicts exactly what
   ``metrics.memory_breakdown`` measures from the live shards.
2. ``step_paper_bytes``: the STEP paper's formula (Yano et al. 2025, Sec. 3.2;
   methods.md): stage i = 16 n_i P + 2 N_{i-1} P + 16 N_{i-1} E(P), with
   embeddings and LM head left out. Kept to compare against.

The parameter inventory and precision policies both count from are in
steptitan/inventory.py (re-exported here); activation and FLOP estimates are in
steptitan/flops.py, which this module builds on; the stage-split search that
queries this model (``steptitan plan``) is steptitan/planner.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from steptitan.distributed import local_shape
from steptitan.flops import activation_bytes, first_grad_layer, overhead_bytes
from steptitan.inventory import BYTES, PRECISIONS, ParamSpec, Precision, param_specs  # noqa: F401  (re-exported)
from steptitan.model import base_param_names
from steptitan.peft import PeftMethod

OPTIMIZER_GROUPS = ("old", "new", "embeddings", "head", "adapters")


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimizer plugin (registry/optim/, docs/optimizers.md) holds each parameter group's state.

    ``plugins`` maps a group (old, new, embeddings, head, adapters) to an
    ``OptimizerPlugin`` instance; a group not listed uses AdamW. The bytes come
    from the plugin's ``state_bytes``: this module asks, the plugins know their layouts.
    """

    plugins: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, plugins: Mapping[str, Any]) -> "OptimizerSpec":
        return cls(tuple(sorted(plugins.items())))

    @classmethod
    def from_plan(cls, plan: Any) -> "OptimizerSpec":
        return cls.of(getattr(plan, "optim", None) or {})

    def plugin(self, group: str) -> Any:
        found = dict(self.plugins).get(group)
        if found is None:
            from steptitan.registry import OPTIM

            found = OPTIM.get("adamw")()
        return found

    def names(self) -> dict[str, str]:
        return {g: self.plugin(g).registry_name for g in OPTIMIZER_GROUPS}

    def state_bytes(self, spec: "ParamSpec", local_shape: Sequence[int], world_size: int = 1,
                    step_slices: int = 1) -> int:
        """Optimizer-state bytes one rank holds for one trainable parameter with this local shard shape.

        ``step_slices``: number of fp32 step counts (1 = torch's scalar step;
        SwitchLoRA's AdamWSliceSteps keeps one per row or column)."""
        return int(self.plugin(spec.group).state_bytes(spec.name, tuple(local_shape), spec.shape, world_size,
                                                       step_slices))


    def by_optimizer(self, specs: Iterable[ParamSpec]) -> list[tuple[Any, list[tuple[str, tuple[int, ...]]]]]:
        """(plugin, [(name, global shape)]) per torch optimizer of the stage: the trainable parameters in
        model order, as ``optim.build_stage_optimizers`` hands them to each plugin."""
        out: dict[int, tuple[Any, list[tuple[str, tuple[int, ...]]]]] = {}
        plugins: dict[str, Any] = {}  # one instance per group (``plugin`` builds AdamW anew for an unlisted one)
        for s in specs:
            if s.trainable:
                if s.group not in plugins:
                    plugins[s.group] = self.plugin(s.group)
                plugin = plugins[s.group]
                out.setdefault(id(plugin), (plugin, []))[1].append((s.name, tuple(s.shape)))
        return list(out.values())

    def refresh_bytes(self, specs: Sequence[ParamSpec], world_size: int = 1, rank: int = 0) -> int:
        """Peak transient bytes of the optimizers' steps on ``rank`` (GaLore/Fira: the gathered gradient and
        SVD factors of a projection refresh); the optimizers step one after another: the largest."""
        return max((int(p.refresh_bytes(named, world_size, rank)) for p, named in self.by_optimizer(specs)), default=0)

    def step_flops(self, specs: Sequence[ParamSpec], world_size: int = 1, rank: int = 0) -> dict[str, int]:
        """FLOPs per optimizer step on ``rank`` by kind (GaLore/Fira: "projection", "svd" averaged over the gap)."""
        out: dict[str, int] = {}
        for plugin, named in self.by_optimizer(specs):
            for kind, n in plugin.step_flops(named, world_size, rank).items():
                out[kind] = out.get(kind, 0) + int(n)
        return out


MEMORY_KEYS = ("params_trainable", "params_frozen", "grads", "optimizer", "adapter_pools", "model_states")


def model_state_bytes(specs: Iterable[ParamSpec], world_size: int = 1, rank: int = 0,
                      precision: Precision = Precision(), optimizer: OptimizerSpec = OptimizerSpec(),
                      adapter_pools: int = 0) -> dict[str, int]:
    """Bytes ``rank`` holds, with the keys of ``metrics.memory_breakdown`` at a step where
    gradients and optimizer state are both alive (after backward, from step 2 on)."""
    out = dict.fromkeys(MEMORY_KEYS, 0)
    for spec in specs:
        shape = local_shape(spec.shape, world_size, rank)
        numel = math.prod(shape)
        if spec.trainable:
            out["params_trainable"] += 4 * numel  # fp32 master shard
            out["grads"] += 4 * numel  # FSDP2 reduce-scatters into the fp32 sharded grad
            # slice step counts: sharded with the parameter along dim 0, replicated along other dims
            slices = 1 if spec.step_dim is None else (shape[0] if spec.step_dim == 0 else spec.shape[spec.step_dim])
            out["optimizer"] += optimizer.state_bytes(spec, shape, world_size, slices)
        else:
            out["params_frozen"] += BYTES[precision.frozen] * numel
    out["adapter_pools"] = adapter_pools
    out["model_states"] = sum(out[k] for k in MEMORY_KEYS[:-1])
    return out


def peft_pool_bytes(methods: Sequence[PeftMethod], model: nn.Module, world_size: int, rank: int,
                    device_type: str = "cpu", on_host: bool = False) -> int:
    """Adapter-pool bytes (e.g. SwitchLoRA candidates) the PEFT methods predict for ``rank``
    (``PeftMethod.predicted_extra_state_bytes``; none by default): those on the device, or with
    ``on_host`` those kept in host memory while the model runs on ``device_type``."""
    return sum(int(m.predicted_extra_state_bytes(model, world_size, rank)) for m in methods
               if m.extra_state_on_host(device_type) == on_host)


@dataclass
class StageMemory:
    index: int
    name: str
    n_layers: int
    trainable_params: int
    frozen_params: int
    per_rank: list[dict[str, int]]  # model-state bytes per rank
    activations: int  # estimated saved-activation bytes per rank (one micro-batch)
    # per rank: padded shards, collective buffers, logits, accumulated gradients, fragmentation (flops.overhead_bytes)
    overheads: list[dict[str, int]] = field(default_factory=list)
    # per rank: model-state bytes alive at the switch into this stage (``switch_bytes``); empty for stage 0
    switch: list[int] = field(default_factory=list)
    host_bytes: list[int] = field(default_factory=list)  # per rank: state kept in host memory off the device
    # per rank: the optimizers' FLOPs per step by kind (OptimizerPlugin.step_flops), e.g. GaLore's SVDs
    optimizer_flops: list[dict[str, int]] = field(default_factory=list)

    @property
    def peak_switch(self) -> int:
        return max(self.switch, default=0)

    @property
    def peak_model_states(self) -> int:
        return max(r["model_states"] for r in self.per_rank)

    @property
    def peak_overheads(self) -> int:
        return max((sum(o.values()) for o in self.overheads), default=0)

    @property
    def peak_total(self) -> int:
        if not self.overheads:
            return max(self.peak_model_states + self.activations, self.peak_switch)
        steady = max(r["model_states"] + self.activations + sum(o.values()) for r, o in zip(self.per_rank, self.overheads))
        return max(steady, self.peak_switch)


def with_step_dims(specs: list[ParamSpec], model: nn.Module, methods: Sequence[PeftMethod]) -> list[ParamSpec]:
    """Mark parameters whose optimizer keeps per-slice step counts (a PEFT method's ``optimizer_class``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    dims: dict[str, int] = {}
    for m in methods:
        choice = m.optimizer_class(model)
        if choice is not None:
            for p, d in (choice[1].get("step_dims") or {}).items():
                if id(p) in names:
                    dims[names[id(p)]] = d
    if not dims:
        return specs
    return [ParamSpec(s.name, s.shape, s.trainable, s.group, dims.get(s.name)) for s in specs]


def predict_stage(plan: Any, world_size: int, training: Any) -> StageMemory:
    """Per-rank model-state bytes of one ``StagePlan`` (exact) plus an activation estimate.

    ``world_size`` is the shard degree: the world size under plain FSDP2, parallel.dp_shard under HSDP."""
    from steptitan.device import attention_kernel, device_type_for

    precision, optimizer = Precision.from_training(training), OptimizerSpec.from_plan(plan)
    device_type = device_type_for(getattr(training, "backend", "auto"))
    model = plan.build()
    specs = with_step_dims(param_specs(model, plan.old_layers, base_param_names(plan.shape)), model, plan.peft)
    per_rank = [model_state_bytes(specs, world_size, r, precision, optimizer,
                                  peft_pool_bytes(plan.peft, model, world_size, r, device_type)) for r in range(world_size)]
    host = [peft_pool_bytes(plan.peft, model, world_size, r, device_type, on_host=True) for r in range(world_size)]
    acts = activation_bytes(plan.shape, training.batch_size, training.seq_len, precision,
                            training.activation_checkpointing, first_grad_layer(specs, plan.shape.n_layers),
                            attention_kernel(device_type, precision.compute, plan.shape.head_dim))
    acts += sum(m.predicted_saved_bytes(model, training.batch_size, training.seq_len, BYTES[precision.compute],
                                        training.activation_checkpointing) for m in plan.peft)  # e.g. APEX's weights
    overheads = [overhead_bytes(specs, plan.shape, training.batch_size, training.seq_len, precision, world_size, r,
                                getattr(training, "grad_accum", 1), getattr(training, "grad_sync", "last"),
                                device_type, resident=per_rank[r]["model_states"] + acts) for r in range(world_size)]
    for r, o in enumerate(overheads):  # e.g. GaLore/Fira's projection refresh (steptitan/lowrank.py)
        o["optimizer_refresh"] = optimizer.refresh_bytes(specs, world_size, r)
        if device_type == "cuda":
            o["fragmentation"] += o["optimizer_refresh"] // 10
    return StageMemory(plan.index, plan.name, plan.shape.n_layers, plan.trainable_params, plan.frozen_params,
                       per_rank, acts, overheads, host_bytes=host,
                       optimizer_flops=[optimizer.step_flops(specs, world_size, r) for r in range(world_size)])


def switch_bytes(prev: StageMemory, new: StageMemory, copies_state: bool) -> list[int]:
    """Per-rank model-state bytes alive while stage ``new`` is built and grown from stage ``prev``.

    The trainer frees the old gradients first and the old optimizer state too unless growth carries
    it (``optimizer_state = "copy"``): then the old moments and the new ones grown from them (two
    fp32 copies of every new trainable parameter, counted as the new stage's whole optimizer state)
    are alive at once, next to both models' parameters and the new stage's adapter pools."""
    out = []
    for old, cur in zip(prev.per_rank, new.per_rank):
        params = old["params_trainable"] + old["params_frozen"] + cur["params_trainable"] + cur["params_frozen"]
        moments = old["optimizer"] + cur["optimizer"] if copies_state else 0
        out.append(params + moments + cur["adapter_pools"])
    return out


def predict_recipe(recipe: Any, plans: Sequence[Any], world_size: int) -> list[StageMemory]:
    """Every stage on ``world_size`` ranks laid out per ``recipe.parallel``: a rank holds 1/dp_shard of
    each parameter (HSDP replicas add ranks, not savings), so ``per_rank`` lists the dp_shard shard ranks.
    A later stage also predicts its stage switch (``switch_bytes``)."""
    from steptitan.recipe import parallel_degrees

    parallel = getattr(recipe, "parallel", None)
    shard = parallel_degrees(parallel, world_size)[1] if parallel is not None else world_size
    stages = [predict_stage(p, shard, recipe.training) for p in plans]
    for plan, prev, cur in zip(plans[1:], stages, stages[1:]):
        cur.switch = switch_bytes(prev, cur, plan.growth is not None and plan.growth.carries_optimizer_state())
    return stages


# --------------------------------------------------------------------------- the paper's formula


def step_paper_bytes(layers_per_stage: Sequence[int], layer_params: int, adapter_params: int) -> list[int]:
    """STEP's model-state bytes per stage (methods.md): 16 n_i P + 2 N_{i-1} P + 16 N_{i-1} E(P).

    Mixed-precision Adam: 16 B per trainable parameter (bf16 weight + bf16 grad
    + fp32 master + two fp32 moments), 2 B per frozen bf16 parameter; no
    embeddings, no LM head, no sharding."""
    out, n_old = [], 0
    for n in layers_per_stage:
        out.append(16 * n * layer_params + 2 * n_old * layer_params + 16 * n_old * adapter_params)
        n_old += n
    return out


__all__ = [
    "BYTES", "Precision", "PRECISIONS", "OptimizerSpec", "ParamSpec", "param_specs", "MEMORY_KEYS",
    "model_state_bytes", "peft_pool_bytes", "with_step_dims", "predict_stage", "predict_recipe", "StageMemory",
    "switch_bytes",
    "step_paper_bytes",
]
