"""The growth-operator interface and the shard-local weight copy it builds on.

A growth operator answers two questions (docs/growth.md):

* ``target_shape`` / ``layer_sources``: the grown shape and, per new layer,
  which old layers it comes from -- used by the plan and ``--dry-run`` without
  touching weights;
* ``grow``: fill a freshly built, already sharded model from the live, sharded
  model of the previous stage.

Both weights and optimizer moments go through one function,
``grow_tensors(src, dst, src_shape, kind)``, which fills named tensors of the
grown model from named tensors of the old one. ``kind`` says what the tensors
are ("weight", "exp_avg", "exp_avg_sq"), because a width expansion that splits
a weight scales its gradient the other way (docs/growth.md, "Optimizer state").

Depth growth never gathers: FSDP2 shards every parameter on dim 0 over the
same mesh, so a block of the grown model has the same local shard layout as
its source block and copying ``to_local()`` tensors is exact. FSDP2 leaves the
root module unsharded after a forward, so ``grow`` and ``carry_optimizer_state``
first return both models to their sharded state (a no-op when they are; no
collective), and the trainer does the same before ``merge``: operators, which
override ``grow_tensors``, never call ``reshard`` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar, Literal, Mapping

import torch
from torch import nn

from steptitan.distributed import local_tensor, reshard
from steptitan.metrics import log
from steptitan.model import ModelShape, base_param_names
from steptitan.optim import AdamWSliceSteps
from steptitan.schema import check_options

StatePolicy = Literal["fresh", "copy"]  # optimizer state across growth: the type of an ``optimizer_state`` option


@dataclass(frozen=True)
class LayerSource:
    """Where layer j of the grown model comes from.

    ``sources``: old layer indices (one = copy, several = mean, none = fresh
    init). ``new``: False when the layer carries a trained layer in place (the
    "old" group a STEP stage freezes), True for inserted layers.
    """

    sources: tuple[int, ...]
    new: bool


@dataclass
class NoOptions:
    pass


class GrowthOperator:
    """Base class for growth plugins. Subclasses set ``Options`` and override the methods.

    Required: ``target_shape`` and ``layer_sources``. The default ``grow_tensors``
    copies (or averages) layers following ``layer_sources``, shard-locally.
    Optional hooks the trainer calls: ``attach`` / ``set_step`` / ``merge``
    (for operators that put something on the model during training, like an
    MSG mask) and ``carry_optimizer_state`` (driven by ``options.optimizer_state``).
    """

    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""
    registry_name: ClassVar[str]

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()
        # Options built in code meet the same declared choices and ranges as a recipe's (steptitan/schema.py).
        errors = check_options(self.options, getattr(self, "registry_name", type(self).__name__))
        if errors:
            raise ValueError("; ".join(errors))

    def target_shape(self, src: ModelShape) -> ModelShape:
        raise NotImplementedError

    def layer_sources(self, src: ModelShape) -> list[LayerSource]:
        """One entry per layer of the grown model."""
        raise NotImplementedError

    def is_exact(self, src: ModelShape | None = None) -> bool:
        """True when the grown model computes exactly the old model's function."""
        return False

    def filled_units(self, src: ModelShape) -> set[str]:
        """Init units (``model.init_units``: "layers.j." and the root "") whose dense weights ``grow``
        overwrites completely, so the trainer does not draw them first (issue 23, item 7). The default,
        nothing, is always safe; an operator that copies by ``layer_sources`` knows more."""
        return set()

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def grow(self, src: nn.Module, dst: nn.Module, src_shape: ModelShape) -> None:
        """Fill ``dst``'s dense weights from ``src`` (both built and sharded; PEFT params untouched).

        Both are resharded first: after a forward FSDP2 keeps the root's parameters (embeddings, final
        norm, head) unsharded, and a shard-local copy would then meet whole tensors (issue 23, item 13)."""
        reshard(src)
        reshard(dst)
        self.grow_tensors(dense_params(src, src_shape), dense_params(dst, src_shape), src_shape, "weight")

    def grow_tensors(self, src: Mapping[str, torch.Tensor], dst: Mapping[str, torch.Tensor],
                     src_shape: ModelShape, kind: str) -> dict[str, str]:
        """Fill ``dst`` tensors (by parameter name) from ``src`` ones; return {filled dst name: main src name}.

        Tensors may be parameters or optimizer moments (``kind``), sharded or not.
        A dst name missing from the result keeps its value (fresh init / fresh state).
        """
        return copy_by_source(src, dst, self.layer_sources(src_shape))

    # ------------------------------------------------------------------ optimizer state

    @torch.no_grad()
    def carry_optimizer_state(self, src: nn.Module, src_optimizer: Any, dst: nn.Module, dst_optimizer: Any,
                              src_shape: ModelShape) -> int:
        """Seed the new optimizer's Adam moments per ``options.optimizer_state``; returns params seeded.

        "fresh" (default, STEP): nothing -- new parameters start with empty state
        and frozen ones have none. "copy": moments follow the weights through
        ``grow_tensors`` (copied, averaged, or scaled like the gradient where
        width growth splits a weight).
        """
        if not self.carries_optimizer_state() or src_optimizer is None:
            return 0
        reshard(src)  # as in ``grow``: the weights' local shards key the moments
        reshard(dst)
        return carry_adam_state(self, src, src_optimizer, dst, dst_optimizer, src_shape)

    def carries_optimizer_state(self) -> bool:
        """True when the new stage's moments are grown from the old optimizer's (``optimizer_state =
        "copy"``): the trainer then keeps the old optimizer state alive until ``carry_optimizer_state``
        has run, and the memory model counts both at the stage switch (issue 23, item 6)."""
        return getattr(self.options, "optimizer_state", "fresh") == "copy"

    # ------------------------------------------------------------------ training-time hooks

    def attach(self, model: nn.Module, src_shape: ModelShape) -> None:
        """Called on the stage's model after it is built (grown or resumed), before training."""

    def set_step(self, step: int) -> None:
        """Called before training step ``step`` (1-based) of the stage."""

    def merge(self, model: nn.Module) -> None:
        """Fold whatever ``attach`` added into the weights (function unchanged), before the next growth."""


class SameShape(GrowthOperator):
    """Carry every weight over unchanged (what the trainer uses for a later stage with no growth operator)."""

    registry_name = "copy"

    def target_shape(self, src: ModelShape) -> ModelShape:
        return src

    def layer_sources(self, src: ModelShape) -> list[LayerSource]:
        return [LayerSource((j,), new=False) for j in range(src.n_layers)]

    def is_exact(self, src: ModelShape | None = None) -> bool:
        return True

    def filled_units(self, src: ModelShape) -> set[str]:
        return units_copied(self.layer_sources(src))


_base_names = lru_cache(maxsize=32)(base_param_names)  # builds a meta model: cache per shape


def dense_params(model: nn.Module, src_shape: ModelShape) -> dict[str, nn.Parameter]:
    """The dense model's own parameters of ``model`` by name, recognised by the names a model of
    ``src_shape`` has (layer index aside). PEFT additions are left out; a tied LM head appears once,
    as ``tok_embeddings.weight``."""
    base = _base_names(src_shape)
    out = {}
    for name, p in model.named_parameters():
        key = "layers.0." + name.split(".", 2)[2] if name.startswith("layers.") else name
        if key in base:
            out[name] = p
    return out


def units_copied(sources: list[LayerSource]) -> set[str]:
    """The init units ``copy_by_source`` fills: the root (by name) and every layer with a source."""
    return {""} | {f"layers.{j}." for j, s in enumerate(sources) if s.sources}


@torch.no_grad()
def copy_by_source(src: Mapping[str, torch.Tensor], dst: Mapping[str, torch.Tensor],
                   sources: list[LayerSource]) -> dict[str, str]:
    """Depth growth on local shards: non-layer tensors by name, layer j from ``sources[j]``.

    Several sources are averaged in place in the destination, so no temporary
    is allocated and nothing is communicated.
    """
    filled = {}
    for name, t in dst.items():
        if name.startswith("layers."):
            _, j, rest = name.split(".", 2)
            names = [f"layers.{i}.{rest}" for i in sources[int(j)].sources]
        else:
            names = [name]
        if not names or any(n not in src for n in names):
            continue  # fresh init (or, for moments, fresh state: the source had none)
        out = local_tensor(t)
        out.copy_(local_tensor(src[names[0]]))
        for n in names[1:]:
            out.add_(local_tensor(src[n]))
        if len(names) > 1:
            out.div_(len(names))
        filled[name] = names[0]
    return filled


ZEROED = ("attention.wo.weight", "feed_forward.w2.weight")  # the identity trick's two matrices


# --------------------------------------------------------------------------- depth growth with exact modes


@dataclass
class DepthOptions:
    """Options every depth operator shares (interpolate, stack)."""

    zero_out: bool = False  # exact mode: zero new blocks' attention.wo and feed_forward.w2 (identity blocks)
    mask_steps: int = field(default=0, metadata={"ge": 0})  # MSG-style mask: scale new blocks' branches by min(1, step / mask_steps); 0 = off
    optimizer_state: StatePolicy = "fresh"  # copy = new layers take their source layers' Adam moments


class DepthGrowth(GrowthOperator):
    """Depth growth by ``layer_sources``, with the identity trick and an MSG-style mask as exact modes."""

    def __init__(self, options=None):
        super().__init__(options)
        self.mask = BranchMask(self.options.mask_steps) if self.options.mask_steps else None

    def is_exact(self, src: ModelShape | None = None) -> bool:
        """Identity new blocks keep the function only if the old blocks all stay, in order (a
        layer-source list may drop or reorder them); without ``src`` that part is assumed."""
        if not (self.options.zero_out or self.options.mask_steps):
            return False
        return src is None or [s.sources for s in self.layer_sources(src) if not s.new] == [(i,) for i in range(src.n_layers)]

    def filled_units(self, src: ModelShape) -> set[str]:
        return units_copied(self.layer_sources(src))  # zero_out writes zeros into copied or drawn blocks alike

    def new_layers(self, src_shape: ModelShape) -> list[int]:
        return [j for j, s in enumerate(self.layer_sources(src_shape)) if s.new]

    def grow_tensors(self, src, dst, src_shape, kind):
        filled = copy_by_source(src, dst, self.layer_sources(src_shape))
        if self.options.zero_out:
            for j in self.new_layers(src_shape):
                for rest in ZEROED:
                    name = f"layers.{j}.{rest}"
                    if name not in dst:
                        continue
                    if kind == "weight":
                        local_tensor(dst[name]).zero_()
                    filled.pop(name, None)  # a zeroed weight starts with fresh Adam state
        return filled

    def attach(self, model: nn.Module, src_shape: ModelShape) -> None:
        if self.mask is not None:
            self.mask.attach(model, self.new_layers(src_shape))

    def set_step(self, step: int) -> None:
        if self.mask is not None:
            self.mask.set_step(step)

    def merge(self, model: nn.Module) -> None:
        if self.mask is not None:
            self.mask.fold(model)


class BranchMask:
    """MSG-style growth mask (Yao et al., "Masked Structural Growth", arXiv 2305.02869; methods.md [unsure]).

    The residual branches of the new blocks are multiplied by m: a block
    computes h = x + m * attn(norm(x)); out = h + m * ffn(norm(h)). m = 0 at
    growth time, so the grown model is exactly the old one *whatever the new
    weights are*; m = min(1, step / steps) during training step ``step``.
    ``fold`` multiplies wo and w2 by m and removes the hooks (function unchanged).
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.value = 0.0
        self.handles: list[Any] = []
        self.modules: list[nn.Linear] = []

    def attach(self, model: nn.Module, layer_ids: list[int]) -> None:
        self.value = 0.0
        for j in layer_ids:
            block = model.layers[str(j)]
            for linear in (block.attention.wo, block.feed_forward.w2):
                self.modules.append(linear)
                self.handles.append(linear.register_forward_hook(self._scale))

    def _scale(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output if self.value == 1.0 else output * self.value

    def set_step(self, step: int) -> None:
        self.value = min(1.0, step / self.steps)

    @torch.no_grad()
    def fold(self, model: nn.Module) -> None:
        for linear in self.modules:
            local_tensor(linear.weight).mul_(self.value)
        for handle in self.handles:
            handle.remove()
        self.handles, self.modules, self.value = [], [], 1.0


# --------------------------------------------------------------------------- optimizer state


def optimizer_state_of(optimizer: Any) -> dict[torch.Tensor, dict[str, Any]]:
    """Per-parameter state of a torchtitan OptimizersContainer (or a plain torch optimizer)."""
    state: dict[torch.Tensor, dict[str, Any]] = {}
    for opt in getattr(optimizer, "optimizers", [optimizer]):
        state.update(opt.state)
    return state


@torch.no_grad()
def carry_adam_state(op: GrowthOperator, src: nn.Module, src_optimizer: Any, dst: nn.Module, dst_optimizer: Any,
                     src_shape: ModelShape) -> int:
    """Grow Adam's moments like the weights (``op.grow_tensors`` with kind exp_avg / exp_avg_sq).

    Only trainable destination parameters get state, and only when both moments
    of their source exist (a layer frozen in the previous stage has none: the
    STEP default). ``step`` is copied from the main source so bias correction
    continues where it was.
    """
    adam_like = (torch.optim.Adam, torch.optim.AdamW, AdamWSliceSteps)
    policy = getattr(dst_optimizer, "growth_state_policy", None)  # steptitan.optim.StageOptimizers: per plugin
    dst_optimizers = [o for o in getattr(dst_optimizer, "optimizers", [dst_optimizer])
                      if (policy(o) == "copy" if policy is not None else isinstance(o, adam_like))]
    if not dst_optimizers:
        # e.g. GaLore keeps moments in a projected space: nothing here maps onto it
        log.warning("optimizer_state=copy: no optimizer of this stage keeps Adam moments; new state starts fresh")
        return 0
    old_state = optimizer_state_of(src_optimizer)
    src_params = dense_params(src, src_shape)
    dst_params = {n: p for n, p in dense_params(dst, src_shape).items() if p.requires_grad}
    grown, filled = {}, {}
    for kind in ("exp_avg", "exp_avg_sq"):
        # only moments shaped like their parameter (not, e.g., GaLore's projected ones)
        src_moments = {n: old_state[p][kind] for n, p in src_params.items()
                       if kind in old_state.get(p, {}) and old_state[p][kind].shape == p.shape}
        grown[kind] = {n: torch.zeros_like(p) for n, p in dst_params.items()}
        filled[kind] = op.grow_tensors(src_moments, grown[kind], src_shape, kind)
    name_of = {id(p): n for n, p in dst_params.items()}
    seeded = 0
    for opt in dst_optimizers:  # optimizers whose plugin's growth_state_policy is "fresh" start afresh
        for group in opt.param_groups:
            for p in group["params"]:
                name = name_of.get(id(p))
                if name not in filled["exp_avg"] or name not in filled["exp_avg_sq"]:
                    continue  # fresh state: Adam initialises it at the first step
                source = old_state[src_params[filled["exp_avg"][name]]]
                step = torch.as_tensor(source["step"], dtype=torch.float32).clone()  # an int in e.g. GaLoreAdamW
                opt.state[p] = {"step": step, "exp_avg": grown["exp_avg"][name],
                                "exp_avg_sq": grown["exp_avg_sq"][name]}
                seeded += 1
    return seeded
