"""The stage-split planner: search how L layers split over K stages, by peak per-rank memory.

``plan_splits`` enumerates every K-stage split of a target model and ranks the
splits by their peak per-rank bytes, using per-layer inventories built once
from meta models (``layer_inventory``); ``largest_fitting`` answers the inverse
question (the largest model whose best split fits a budget); ``schedule_recipe``
writes a split as a recipe; ``steptitan plan`` is steptitan/planner_cli.py. The bytes come
from steptitan/memory.py and the activation estimate from steptitan/flops.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import tomli_w

from steptitan.flops import activation_bytes
from steptitan.memory import (
    MEMORY_KEYS,
    OptimizerSpec,
    ParamSpec,
    Precision,
    model_state_bytes,
    param_specs,
)
from steptitan.model import ModelShape, base_param_names, build_model

# --------------------------------------------------------------------------- split search


@dataclass
class LayerInventory:
    """Parameters of the model pieces a split is made of, from meta models of the target shape.

    ``new``: a fully trainable block; ``old``: a carried block with the stage's
    PEFT applied and its dense weights frozen; ``emb_trainable`` / ``emb_frozen``:
    embeddings + final norm + LM head (a tied pair once), trained or frozen; when
    frozen they carry the ``embed_peft`` adapters (``lora_embed``), if any."""

    shape: ModelShape
    new: list[ParamSpec]
    old: list[ParamSpec]
    emb_trainable: list[ParamSpec]
    emb_frozen: list[ParamSpec]
    peft_name: str = "none"
    embed_peft: dict[str, Any] | None = None  # e.g. {"method": "lora_embed", "rank": 16}: adapters of frozen emb/head

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


def layer_inventory(shape: ModelShape, peft: dict[str, Any] | None = None,
                    embed_peft: dict[str, Any] | None = None) -> LayerInventory:
    """Build the per-piece inventories once (a 1-block meta model with and without the PEFT).

    ``embed_peft``: a PEFT method for the frozen embeddings/head (``lora_embed``); its
    adapters join ``emb_frozen``, as a stage that freezes them and adds it builds."""
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
    emb_method = _peft_instance(embed_peft, [0])
    if emb_method is not None:
        emb_model = build_model(one)
        emb_method.apply(emb_model)
        for name, p in emb_model.named_parameters():
            if name in base and not name.startswith("layers."):  # the stage's freeze = [..., "embeddings", "head"]
                p.requires_grad_(False)
        frozen_emb = [s for s in param_specs(emb_model, set(), base) if not s.name.startswith("layers.")]
    return LayerInventory(shape, new, old, emb, frozen_emb, peft["method"] if peft else "none", embed_peft)


@dataclass
class SplitResult:
    layers: tuple[int, ...]  # n_i: layers added per stage (stage 0 = the first model)
    per_stage: list[dict[str, int]]  # rank-0 (largest shard) model-state bytes per stage
    trainable: list[int]
    activations: list[int]
    # rank-0 transient bytes of the optimizer step per stage (GaLore/Fira: a projection refresh's
    # gathered gradient + SVD factors, OptimizerPlugin.refresh_bytes)
    optimizer_refresh: list[int] = field(default_factory=list)

    @property
    def peak_model_states(self) -> int:
        return max(s["model_states"] for s in self.per_stage)

    @property
    def peak_total(self) -> int:
        refresh = self.optimizer_refresh or [0] * len(self.per_stage)
        return max(s["model_states"] + a + r for s, a, r in zip(self.per_stage, self.activations, refresh))


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


def split_memory(inv: LayerInventory, layers: Sequence[int], world_size: int = 1,
                 precision: Precision = Precision(), optimizer: OptimizerSpec = OptimizerSpec(),
                 freeze_embeddings_after: int | None = None, batch: int = 8, seq_len: int = 128,
                 checkpointing: bool = False, position: str = "upper") -> SplitResult:
    """Per-stage rank-0 bytes of one split. Stage i trains n_i new blocks and carries
    N_{i-1} old blocks with the PEFT (exactly what the recipe ``schedule_recipe`` writes builds).

    Rank 0 always holds the largest dim-0 chunk, so its bytes are the peak.
    ``freeze_embeddings_after``: stage index from which embeddings and head are frozen (None = never)."""
    per_stage, trainable, acts, refresh = [], [], [], []
    # only optimizers with transient step buffers (GaLore/Fira) need the stage's parameter list
    refreshes = optimizer.refresh_bytes(list(inv.new) + list(inv.old) + list(inv.emb_trainable), world_size, 0) > 0
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
        if refreshes:  # the stage's parameters in model order (old blocks below the new ones, then embeddings, head)
            stage_specs = [dataclasses.replace(s, name=f"layers.{k}.{s.name.split('.', 2)[2]}")
                           for k, layer in enumerate([inv.old] * n_old + [inv.new] * n_new) for s in layer]
            refresh.append(optimizer.refresh_bytes(stage_specs + list(emb), world_size, 0))
        else:
            refresh.append(0)
        trainable.append(n_new * inv.layer_params + n_old * inv.adapter_params
                         + sum(math.prod(s.shape) for s in emb if s.trainable))
        shape = inv.shape.replace(n_layers=n_new + n_old)
        if any(s.trainable and s.name.startswith("tok_embeddings") for s in emb):
            first = 0  # a trainable embedding (or its adapter) needs gradients through every block
        elif n_old and inv.adapter_params:
            first = 0  # adapters on the bottom old block
        else:  # new blocks only: upper insertion puts them on top of the old ones
            first = n_old if position == "upper" else 0
        local_batch = batch
        acts.append(activation_bytes(shape, local_batch, seq_len, precision, checkpointing, first))
        n_old += n_new
    return SplitResult(tuple(layers), per_stage, trainable, acts, refresh)


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
                    embed_peft: dict[str, Any] | None = None, **kwargs) -> list[FitResult]:
    """For each width in ``dims``, the deepest model whose best ``n_stages`` split fits the budget.

    Peak per-rank bytes grow with depth for any fixed stage count, so a binary
    search over L finds the limit. Returns one result per width, largest model first."""
    from steptitan.model import torchtitan_ffn_hidden

    out = []
    for dim in dims:
        heads = max(1, dim // head_dim)
        shape = base.replace(dim=dim, n_heads=heads, n_kv_heads=heads,
                             ffn_hidden=torchtitan_ffn_hidden(dim, 256 if dim >= 1024 else 32, None))
        inv = layer_inventory(shape.replace(n_layers=n_stages), peft, embed_peft)

        def best(L: int) -> SplitResult | None:
            if L < n_stages:
                return None
            inv_l = LayerInventory(shape.replace(n_layers=L), inv.new, inv.old, inv.emb_trainable, inv.emb_frozen,
                                   inv.peft_name, inv.embed_peft)
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
                    freeze_embeddings_after: int | None = None, extra: dict[str, Any] | None = None,
                    embed_peft: dict[str, Any] | None = None, parallel: dict[str, int] | None = None) -> str:
    """A TOML recipe that builds the split: stage 0 has n_0 layers, stage i inserts n_i new
    layers by interpolation and puts the PEFT on the old ones. From stage
    ``freeze_embeddings_after`` on, embeddings and head are frozen and carry ``embed_peft``
    (``lora_embed``) in ``extra_peft``, if given."""
    steps = list(steps or [100] * len(layers))
    model: dict[str, Any] = {"dim": shape.dim, "n_layers": layers[0], "n_heads": shape.n_heads,
                             "n_kv_heads": shape.n_kv_heads, "vocab_size": shape.vocab_size, "ffn_hidden": shape.ffn_hidden}
    if shape.tie_embeddings:
        model["tie_embeddings"] = True
    training = {"dtype": precision.compute, "frozen_dtype": precision.frozen, **(extra or {})}
    stages: list[dict[str, Any]] = []
    n_old = layers[0]
    for i, n in enumerate(layers):
        stage: dict[str, Any] = {"name": f"stage{i}", "steps": steps[i]}
        freeze = []
        if i > 0:
            pos = position if n <= n_old else "uniform"
            stage["growth"] = {"name": "interpolate", "n_new": n, "position": pos, "init": "copy"}
            if peft:
                stage["peft"] = {**{k: v for k, v in peft.items() if k != "layers"}, "layers": "old"}
            freeze = ["old"]
            n_old += n
        if freeze_embeddings_after is not None and i >= freeze_embeddings_after:
            freeze += ["embeddings", "head"]
            if embed_peft:
                stage["extra_peft"] = [{k: v for k, v in embed_peft.items() if k != "layers"}]
        if freeze or i > 0:
            stage["freeze"] = freeze
        stages.append(stage)
    doc = {"name": name, "output_dir": "runs/{name}", "model": model, "training": training,
           **({"parallel": parallel} if parallel else {}), "stages": stages}
    return (f"# Written by `steptitan plan`: a {len(layers)}-stage split {list(layers)} of {shape.n_layers} layers.\n"
            + tomli_w.dumps(doc))
