"""Memory and FLOP model of a staged schedule, and the stage-split planner core.

Three layers, from exact to estimated (docs/benchmark.md, "Memory model"):

1. ``model_state_bytes``: per-stage, per-rank bytes of parameters (trainable and
   frozen apart, by dtype), gradients, optimizer state and adapter pools. It
   walks the stage's meta model (``StagePlan.build``), so every PEFT method's
   adapter parameters E(P) are counted as they are built, and it applies
   FSDP2's dim-0 sharding rule tensor by tensor. It predicts exactly what
   ``metrics.memory_breakdown`` measures from the live shards.
2. ``step_paper_bytes``: the STEP paper's formula (Yano et al. 2025, Sec. 3.2;
   methods.md): stage i = 16 n_i P + 2 N_{i-1} P + 16 N_{i-1} E(P), with
   embeddings and LM head left out. Kept to compare against.
3. ``activation_bytes`` and ``flops_per_token``: estimates of saved
   activations and of forward+backward FLOPs that know which layers need
   weight gradients and which only pass activation gradients.

The planner (``plan_splits``, ``largest_fitting``) enumerates how L layers are
split over K stages and ranks the splits by their peak per-rank bytes, using
per-layer inventories built once from meta models; ``tools/plan_stages.py`` and
``steptitan plan`` print and write its answers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from steptitan.model import ModelShape, base_param_names, build_model

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Precision:
    """Where bytes go per parameter.

    ``compute`` is FSDP2's all-gather/compute dtype (training.dtype). Trainable
    shards, their gradients and optimizer state are always fp32 (master weights:
    FSDP2 keeps the sharded parameter in its original dtype and reduces
    gradients in fp32). ``frozen`` is the storage dtype of frozen weights
    (training.frozen_dtype): the STEP paper's mixed-precision policy keeps them
    in bf16 only, 2 bytes per parameter.
    """

    compute: str = "float32"
    frozen: str = "float32"

    @property
    def name(self) -> str:
        for key, value in PRECISIONS.items():
            if value == self:
                return key
        return f"{self.compute}/{self.frozen}"

    @classmethod
    def from_training(cls, training: Any) -> "Precision":
        return cls(training.dtype, getattr(training, "frozen_dtype", "float32"))


PRECISIONS = {
    "fp32": Precision("float32", "float32"),
    "bf16": Precision("bfloat16", "float32"),  # bf16 compute, fp32 master/grads/Adam, fp32 frozen
    "paper": Precision("bfloat16", "bfloat16"),  # STEP's policy: frozen weights in bf16 only (2 B)
}


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer's state layout: ``adamw`` (torch AdamW: two fp32 moments + a
    4-byte step tensor per parameter) or ``galore`` (galore-torch's GaLoreAdamW:
    moments of the projected gradient + the projection matrix for 2-D block
    weights, full moments elsewhere, Python-int steps)."""

    name: str = "adamw"
    galore_rank: int = 128
    galore_targets: tuple[str, ...] = ("attention", "feed_forward")

    @classmethod
    def from_training(cls, training: Any) -> "OptimizerSpec":
        name = getattr(training, "optimizer", "adamw")
        galore = training.galore
        return cls(name, galore.rank, tuple(galore.targets))

    def uses_galore(self, name: str, ndim: int) -> bool:
        return self.name == "galore" and ndim == 2 and name.startswith("layers.") and any(
            f".{t}." in name for t in self.galore_targets)

    def state_bytes(self, name: str, local_shape: Sequence[int], step_slices: int = 1) -> int:
        """Optimizer-state bytes for one trainable parameter with this local shape (fp32 state).

        ``step_slices``: number of fp32 step counts (1 = torch's scalar step;
        SwitchLoRA's AdamWSliceSteps keeps one per row or column)."""
        numel = math.prod(local_shape)
        if self.name == "adamw":
            return 8 * numel + 4 * step_slices  # exp_avg + exp_avg_sq (fp32) + step count(s)
        if self.uses_galore(name, len(local_shape)):
            m, n = local_shape
            r = self.galore_rank
            if m >= n:  # right projection: grad (m, n) @ P^T, P = Vh[:r] is (r', n)
                r = min(r, n)
                return 4 * (2 * m * r + r * n)
            r = min(r, m)  # left projection: P = U[:, :r] is (m, r'), P^T grad is (r', n)
            return 4 * (2 * r * n + m * r)
        return 8 * numel


# --------------------------------------------------------------------------- sharding and inventories


def local_rows(rows: int, world_size: int, rank: int) -> int:
    """Rows of a dim-0 FSDP2 shard on ``rank`` (torch.chunk: ceil-sized chunks, trailing ranks may be empty)."""
    if rows == 0:
        return 0
    chunk = math.ceil(rows / world_size)
    return max(0, min(chunk, rows - rank * chunk))


def local_shape(shape: Sequence[int], world_size: int, rank: int) -> tuple[int, ...]:
    if not shape:
        return tuple(shape)
    return (local_rows(shape[0], world_size, rank), *shape[1:])


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    trainable: bool
    group: str  # old | new | embeddings | head | adapters
    step_dim: int | None = None  # per-slice optimizer step counts along this dim (SwitchLoRA), None = scalar


def param_specs(model: nn.Module, old_layers: set[int] | None = None, base_names: set[str] | None = None) -> list[ParamSpec]:
    """One entry per distinct parameter of a (meta) model, tied weights counted once."""
    from steptitan.model import layer_group_of

    old_layers = old_layers or set()
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        group = layer_group_of(name, old_layers) if base_names is None or name in base_names else "adapters"
        out.append(ParamSpec(name, tuple(p.shape), p.requires_grad, group))
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
            out["optimizer"] += optimizer.state_bytes(spec.name, shape, slices)
        else:
            out["params_frozen"] += BYTES[precision.frozen] * numel
    out["adapter_pools"] = adapter_pools
    out["model_states"] = sum(out[k] for k in MEMORY_KEYS[:-1])
    return out


def peft_pool_bytes(methods: Sequence[Any], model: nn.Module, world_size: int, rank: int) -> int:
    """Adapter-pool bytes (e.g. SwitchLoRA candidates) a PEFT method predicts for ``rank``.

    Methods that keep pools implement ``predicted_extra_state_bytes(model,
    world_size, rank)``; the default is none."""
    total = 0
    for m in methods:
        fn = getattr(m, "predicted_extra_state_bytes", None)
        if fn is not None:
            total += int(fn(model, world_size, rank))
    return total


@dataclass
class StageMemory:
    index: int
    name: str
    n_layers: int
    trainable_params: int
    frozen_params: int
    per_rank: list[dict[str, int]]  # model-state bytes per rank
    activations: int  # estimated saved-activation bytes per rank (one micro-batch)

    @property
    def peak_model_states(self) -> int:
        return max(r["model_states"] for r in self.per_rank)

    @property
    def peak_total(self) -> int:
        return self.peak_model_states + self.activations


def with_step_dims(specs: list[ParamSpec], model: nn.Module, methods: Sequence[Any]) -> list[ParamSpec]:
    """Mark parameters whose optimizer keeps per-slice step counts (a PEFT method's ``optimizer_class``)."""
    names = {id(p): n for n, p in model.named_parameters()}
    dims: dict[str, int] = {}
    for m in methods:
        fn = getattr(m, "optimizer_class", None)
        choice = fn(model) if fn is not None else None
        if choice is not None:
            for p, d in (choice[1].get("step_dims") or {}).items():
                if id(p) in names:
                    dims[names[id(p)]] = d
    if not dims:
        return specs
    return [ParamSpec(s.name, s.shape, s.trainable, s.group, dims.get(s.name)) for s in specs]


def predict_stage(plan: Any, world_size: int, training: Any) -> StageMemory:
    """Per-rank model-state bytes of one ``StagePlan`` (exact) plus an activation estimate."""
    precision, optimizer = Precision.from_training(training), OptimizerSpec.from_training(training)
    model = plan.build()
    specs = with_step_dims(param_specs(model, plan.old_layers, base_param_names(plan.shape)), model, plan.peft)
    per_rank = [model_state_bytes(specs, world_size, r, precision, optimizer,
                                  peft_pool_bytes(plan.peft, model, world_size, r)) for r in range(world_size)]
    acts = activation_bytes(plan.shape, training.batch_size, training.seq_len, precision,
                            training.activation_checkpointing, first_grad_layer(specs, plan.shape.n_layers))
    return StageMemory(plan.index, plan.name, plan.shape.n_layers, plan.trainable_params, plan.frozen_params,
                       per_rank, acts)


def predict_recipe(recipe: Any, plans: Sequence[Any], world_size: int) -> list[StageMemory]:
    return [predict_stage(p, world_size, recipe.training) for p in plans]


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


# --------------------------------------------------------------------------- activations and FLOPs


def first_grad_layer(specs: Iterable[ParamSpec], n_layers: int) -> int:
    """Index of the first block whose input needs a gradient path (n_layers if none).

    Autograd records (and saves activations for) a block only if a trainable
    parameter sits in it or below it; embeddings count as below layer 0."""
    first = n_layers
    for s in specs:
        if not s.trainable:
            continue
        if s.name.startswith("tok_embeddings"):
            return 0
        if s.name.startswith("layers."):
            first = min(first, int(s.name.split(".")[1]))
    return first


def activation_bytes(shape: ModelShape, batch: int, seq_len: int, precision: Precision = Precision(),
                     checkpointing: bool = False, first_layer_with_grad: int = 0) -> int:
    """Estimated bytes of tensors saved for backward in one micro-batch on one rank.

    Counted from what autograd saves in torchtitan's llama3 block (measured
    with ``saved_tensors_hooks``; SDPA's flash kernel saves q, k, v, out and
    the logsumexp, never the seq x seq scores): per token, the two RMSNorm
    inputs and outputs, the flattened inputs of wq and w1, q and the attention
    output (8 dim), k and v (2 kv), and the w1/w3 outputs, silu(w1) and the w2
    input (4 ffn), all in the compute dtype. With activation checkpointing a
    block keeps only its input, and one block's full set lives during its
    recompute. Blocks below the first trainable parameter save nothing. The
    head keeps the final norm's input/output and the flattened head input
    (3 dim) and cross-entropy's fp32 log-softmax (vocab x 4 B); the token ids
    are int64. tests/test_memory.py holds it to 10% of the measured bytes."""
    tokens = batch * seq_len
    cb = BYTES[precision.compute]
    kv = shape.n_kv_heads * shape.head_dim
    per_block = tokens * (8 * shape.dim + 2 * kv + 4 * shape.ffn_hidden) * cb
    n_saving = max(0, shape.n_layers - first_layer_with_grad)
    if checkpointing:
        blocks = n_saving * tokens * shape.dim * cb + (per_block if n_saving else 0)
    else:
        blocks = n_saving * per_block
    head = tokens * (3 * shape.dim * cb + shape.vocab_size * 4 + 8)
    return blocks + head


@dataclass
class FlopCount:
    forward: int = 0
    backward_activations: int = 0  # gradients w.r.t. inputs: needed where trainable params sit below
    backward_weights: int = 0  # gradients w.r.t. trainable weights only
    recompute: int = 0  # activation checkpointing re-runs the forward of recorded blocks

    @property
    def total(self) -> int:
        return self.forward + self.backward_activations + self.backward_weights + self.recompute

    def as_dict(self) -> dict[str, int]:
        return {"forward": self.forward, "backward_activations": self.backward_activations,
                "backward_weights": self.backward_weights, "recompute": self.recompute, "total": self.total}


_BLOCK_ORDER = ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "ffn_norm", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def _block_position(inner: str) -> int:
    """Execution order of a block parameter (adapters sit with the linear they adapt)."""
    for k, prefix in enumerate(_BLOCK_ORDER):
        if inner == prefix or inner.startswith(prefix + "."):
            return k
    return len(_BLOCK_ORDER)


def flops_per_token(specs: Sequence[ParamSpec], shape: ModelShape, seq_len: int, checkpointing: bool = False) -> FlopCount:
    """Training FLOPs per token of one stage's model, counted matmul by matmul.

    A 2-D parameter W used as a matmul costs 2|W| forward. Backward costs 2|W|
    for the input gradient if any trainable parameter sits before it in the
    graph (below it in the network, or earlier in a chain such as LoRA's A
    before B), and 2|W| for the weight gradient only if W is trainable. The
    attention core (QK^T and AV, counted without the causal discount, as
    torchtitan does) costs 4 seq dim forward and twice that backward when q/k/v
    need gradients. The embedding lookup, norms and element-wise ops are not
    counted. With checkpointing, recorded blocks pay their forward again."""
    fc = FlopCount()
    blocks: dict[int, list[ParamSpec]] = {}
    emb_trainable = False
    head: list[ParamSpec] = []
    for s in specs:
        if s.name.startswith("layers."):
            blocks.setdefault(int(s.name.split(".")[1]), []).append(s)
        elif s.name.startswith("tok_embeddings"):
            emb_trainable = s.trainable
            if shape.tie_embeddings:
                head.append(s)
        else:
            head.append(s)
    grad_below = emb_trainable  # does the running activation need a gradient?
    attn_core = 4 * seq_len * shape.dim
    for j in sorted(blocks):
        block_fwd = 0
        ordered = sorted(blocks[j], key=lambda s: _block_position(s.name.split(".", 2)[2]))
        by_pos: dict[int, list[ParamSpec]] = {}
        for s in ordered:
            by_pos.setdefault(_block_position(s.name.split(".", 2)[2]), []).append(s)
        recorded = grad_below
        for pos in sorted(by_pos):
            group = by_pos[pos]
            if pos == _BLOCK_ORDER.index("attention.wo"):  # the attention core runs before wo
                block_fwd += attn_core
                if grad_below:
                    fc.backward_activations += 2 * attn_core
            chain_grad = False
            for k, s in enumerate(group):
                if len(s.shape) == 2:
                    mm = 2 * math.prod(s.shape)
                    block_fwd += mm
                    # base weight and the first adapter factor read the block input; later factors
                    # read the previous factor's output, which needs a gradient if that factor trains
                    if grad_below or (k > 1 and chain_grad):
                        fc.backward_activations += mm
                    if s.trainable:
                        fc.backward_weights += mm
                chain_grad = chain_grad or (s.trainable and k >= 1)
            if any(s.trainable for s in group):
                grad_below = True
                recorded = True
        fc.forward += block_fwd
        if checkpointing and recorded:
            fc.recompute += block_fwd
    for s in head:
        if len(s.shape) == 2 and (s.name.startswith("output") or s.name.startswith("tok_embeddings")):
            mm = 2 * math.prod(s.shape)
            fc.forward += mm
            if grad_below:
                fc.backward_activations += mm
            if s.trainable:
                fc.backward_weights += mm
    return fc


def stage_flops_per_token(plan: Any, seq_len: int, checkpointing: bool = False) -> FlopCount:
    model = plan.build()
    return flops_per_token(param_specs(model, plan.old_layers, base_param_names(plan.shape)), plan.shape,
                           seq_len, checkpointing)


# --------------------------------------------------------------------------- planner


@dataclass
class LayerInventory:
    """Parameters of the model pieces a split is made of, from meta models of the target shape.

    ``new``: a fully trainable block; ``old``: a carried block with the stage's
    PEFT applied and its dense weights frozen; ``old_bare``: carried, frozen, no
    adapter; ``emb``: embeddings + final norm + LM head."""

    shape: ModelShape
    new: list[ParamSpec]
    old: list[ParamSpec]
    emb_trainable: list[ParamSpec]
    emb_frozen: list[ParamSpec]
    peft_name: str = "none"

    @property
    def layer_params(self) -> int:
        return sum(math.prod(s.shape) for s in self.new)

    @property
    def adapter_params(self) -> int:
        return sum(math.prod(s.shape) for s in self.old if s.trainable)


def _peft_instance(peft: dict[str, Any] | None, layers: list[int], seed: int = 0):
    if not peft:
        return None
    from steptitan.recipe import options_from_dict
    from steptitan.registry import PEFT

    cls = PEFT.get(peft["method"])
    opts = options_from_dict(cls.Options, {k: v for k, v in peft.items() if k not in ("method", "layers")}, "peft")
    return cls(opts, layers, seed=seed)


def layer_inventory(shape: ModelShape, peft: dict[str, Any] | None = None) -> LayerInventory:
    """Build the per-piece inventories once (a 1-block meta model with and without the PEFT)."""
    one = shape.replace(n_layers=1)
    base = base_param_names(one)
    model = build_model(one)
    new = [s for s in param_specs(model, set(), base) if s.name.startswith("layers.")]
    emb = [s for s in param_specs(model, set(), base) if not s.name.startswith("layers.")]
    old_model = build_model(one)
    method = _peft_instance(peft, [0])
    if method is not None:
        method.apply(old_model)
    for name, p in old_model.named_parameters():
        if name in base and name.startswith("layers."):
            p.requires_grad_(False)
    old = [s for s in param_specs(old_model, {0}, base) if s.name.startswith("layers.")]
    frozen_emb = [ParamSpec(s.name, s.shape, False, s.group) for s in emb]
    return LayerInventory(shape, new, old, emb, frozen_emb, peft["method"] if peft else "none")


@dataclass
class SplitResult:
    layers: tuple[int, ...]  # n_i: layers added per stage (stage 0 = the first model)
    per_stage: list[dict[str, int]]  # rank-0 (largest shard) model-state bytes per stage
    trainable: list[int]
    activations: list[int]

    @property
    def peak_model_states(self) -> int:
        return max(s["model_states"] for s in self.per_stage)

    @property
    def peak_total(self) -> int:
        return max(s["model_states"] + a for s, a in zip(self.per_stage, self.activations))


def compositions(total: int, parts: int, min_part: int = 1) -> Iterable[tuple[int, ...]]:
    """Every ordered split of ``total`` into ``parts`` parts of at least ``min_part``."""
    if parts == 1:
        if total >= min_part:
            yield (total,)
        return
    for cuts in itertools.combinations(range(1, total), parts - 1):
        sizes = [b - a for a, b in zip((0,) + cuts, cuts + (total,))]
        if all(s >= min_part for s in sizes):
            yield tuple(sizes)


def _scaled(specs: list[ParamSpec], copies: int) -> list[tuple[ParamSpec, int]]:
    return [(s, copies) for s in specs]


def split_memory(inv: LayerInventory, layers: Sequence[int], world_size: int = 1,
                 precision: Precision = Precision(), optimizer: OptimizerSpec = OptimizerSpec(),
                 freeze_embeddings_after: int | None = None, batch: int = 8, seq_len: int = 128,
                 checkpointing: bool = False, position: str = "upper") -> SplitResult:
    """Per-stage rank-0 bytes of one split. Stage i trains n_i new blocks and carries
    N_{i-1} old blocks with the PEFT (exactly what the recipe ``schedule_recipe`` writes builds).

    Rank 0 always holds the largest dim-0 chunk, so its bytes are the peak.
    ``freeze_embeddings_after``: stage index from which embeddings and head are frozen (None = never)."""
    per_stage, trainable, acts = [], [], []
    n_old = 0
    for i, n_new in enumerate(layers):
        frozen_emb = freeze_embeddings_after is not None and i >= freeze_embeddings_after
        emb = inv.emb_frozen if frozen_emb else inv.emb_trainable
        totals = dict.fromkeys(MEMORY_KEYS, 0)
        for specs, copies in ((inv.new, n_new), (inv.old, n_old), (emb, 1)):
            if copies == 0:
                continue
            one = model_state_bytes(specs, world_size, 0, precision, optimizer)
            for k in MEMORY_KEYS:
                totals[k] += copies * one[k]
        per_stage.append(totals)
        trainable.append(n_new * inv.layer_params + n_old * inv.adapter_params
                         + (0 if frozen_emb else sum(math.prod(s.shape) for s in inv.emb_trainable)))
        shape = inv.shape.replace(n_layers=n_new + n_old)
        if not frozen_emb:
            first = 0
        elif n_old and inv.adapter_params:
            first = 0  # adapters on the bottom old block
        else:  # new blocks only: upper insertion puts them on top of the old ones
            first = n_old if position == "upper" else 0
        local_batch = batch
        acts.append(activation_bytes(shape, local_batch, seq_len, precision, checkpointing, first))
        n_old += n_new
    return SplitResult(tuple(layers), per_stage, trainable, acts)


def plan_splits(inv: LayerInventory, n_stages: int, top: int = 5, objective: str = "model_states",
                **kwargs) -> list[SplitResult]:
    """The ``top`` splits of ``inv.shape.n_layers`` into ``n_stages`` with the smallest peak.

    Ties are broken toward more layers in the first stage (more full-rank training)."""
    results = [split_memory(inv, split, **kwargs) for split in compositions(inv.shape.n_layers, n_stages)]
    key = (lambda r: (r.peak_model_states, -r.layers[0])) if objective == "model_states" else (
        lambda r: (r.peak_total, -r.layers[0]))
    return sorted(results, key=key)[:top]


def vanilla_memory(inv: LayerInventory, **kwargs) -> SplitResult:
    return split_memory(inv, (inv.shape.n_layers,), **kwargs)


@dataclass
class FitResult:
    shape: ModelShape
    params: int
    split: SplitResult | None


def largest_fitting(budget_bytes: int, base: ModelShape, n_stages: int, peft: dict[str, Any] | None,
                    dims: Sequence[int], max_layers: int = 128, head_dim: int = 64, objective: str = "total",
                    **kwargs) -> list[FitResult]:
    """For each width in ``dims``, the deepest model whose best ``n_stages`` split fits the budget.

    Peak per-rank bytes grow with depth for any fixed stage count, so a binary
    search over L finds the limit. Returns one result per width, largest model first."""
    from steptitan.model import torchtitan_ffn_hidden

    out = []
    for dim in dims:
        heads = max(1, dim // head_dim)
        shape = base.replace(dim=dim, n_heads=heads, n_kv_heads=heads,
                             ffn_hidden=torchtitan_ffn_hidden(dim, 256 if dim >= 1024 else 32, None))
        inv = layer_inventory(shape.replace(n_layers=n_stages), peft)

        def best(L: int) -> SplitResult | None:
            if L < n_stages:
                return None
            inv_l = LayerInventory(shape.replace(n_layers=L), inv.new, inv.old, inv.emb_trainable, inv.emb_frozen, inv.peft_name)
            res = plan_splits(inv_l, n_stages, top=1, objective="model_states" if objective == "model_states" else "total", **kwargs)
            return res[0] if res else None

        def fits(r: SplitResult | None) -> bool:
            return r is not None and (r.peak_model_states if objective == "model_states" else r.peak_total) <= budget_bytes

        lo, hi = n_stages - 1, max_layers
        if not fits(best(n_stages)):
            continue
        lo = n_stages
        while lo < hi:  # largest L with fits(best(L))
            mid = (lo + hi + 1) // 2
            if fits(best(mid)):
                lo = mid
            else:
                hi = mid - 1
        final = shape.replace(n_layers=lo)
        out.append(FitResult(final, final.num_params(), best(lo)))
    return sorted(out, key=lambda f: -f.params)


def schedule_recipe(shape: ModelShape, layers: Sequence[int], peft: dict[str, Any] | None, name: str = "planned",
                    steps: Sequence[int] | None = None, position: str = "upper", precision: Precision = Precision(),
                    freeze_embeddings_after: int | None = None, extra: dict[str, Any] | None = None) -> str:
    """A TOML recipe that builds the split: stage 0 has n_0 layers, stage i inserts n_i new
    layers by interpolation and puts the PEFT on the old ones."""
    steps = list(steps or [100] * len(layers))
    lines = [f"# Written by tools/plan_stages.py: a {len(layers)}-stage split {list(layers)} of {shape.n_layers} layers.",
             f'name = "{name}"', 'output_dir = "runs/{name}"', "", "[model]"]
    lines += [f"dim = {shape.dim}", f"n_layers = {layers[0]}", f"n_heads = {shape.n_heads}",
              f"n_kv_heads = {shape.n_kv_heads}", f"vocab_size = {shape.vocab_size}", f"ffn_hidden = {shape.ffn_hidden}"]
    if shape.tie_embeddings:
        lines.append("tie_embeddings = true")
    lines += ["", "[training]", f'dtype = "{precision.compute}"', f'frozen_dtype = "{precision.frozen}"']
    for key, value in (extra or {}).items():
        lines.append(f"{key} = {_toml_value(value)}")
    n_old = layers[0]
    for i, n in enumerate(layers):
        lines += ["", "[[stages]]", f'name = "stage{i}"', f"steps = {steps[i]}"]
        if i > 0:
            pos = position if n <= n_old else "uniform"
            lines.append(f'growth = {{ name = "interpolate", n_new = {n}, position = "{pos}", init = "copy" }}')
            freeze = ["old"]
            if peft:
                opts = ", ".join(f"{k} = {_toml_value(v)}" for k, v in peft.items() if k != "layers")
                lines.append(f'peft = {{ {opts}, layers = "old" }}')
            if freeze_embeddings_after is not None and i >= freeze_embeddings_after:
                freeze += ["embeddings", "head"]
            lines.append(f"freeze = {_toml_value(freeze)}")
            n_old += n
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def cast_frozen_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen parameter in ``dtype`` (on the meta model, before sharding).

    With bfloat16 this is the STEP paper's mixed-precision policy: frozen
    weights have no master copy, gradient or optimizer state, so 2 bytes each.
    FSDP2 requires one dtype only among a unit's trainable parameters, so
    mixing bf16 frozen and fp32 trainable parameters in a block is allowed."""
    if dtype == torch.float32:
        return
    replaced: dict[int, nn.Parameter] = {}  # a tied embedding/head Parameter stays one Parameter
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.requires_grad and p.dtype != dtype:
                if id(p) not in replaced:
                    replaced[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                setattr(module, name, replaced[id(p)])


__all__ = [
    "BYTES", "Precision", "PRECISIONS", "OptimizerSpec", "ParamSpec", "param_specs", "local_rows", "local_shape",
    "model_state_bytes", "predict_stage", "predict_recipe", "StageMemory", "step_paper_bytes", "activation_bytes",
    "flops_per_token", "stage_flops_per_token", "FlopCount", "layer_inventory", "LayerInventory", "split_memory",
    "plan_splits", "vanilla_memory", "largest_fitting", "schedule_recipe", "compositions", "SplitResult",
]
