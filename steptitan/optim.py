"""Optimizers: the ``OptimizerPlugin`` contract, the container that runs several as one, and AdamWSliceSteps.

An optimizer plugin (registry/optim/, one file each, docs/optimizers.md)
builds a ``torch.optim.Optimizer`` over a set of named parameters and tells
the memory model how many state bytes it keeps per parameter shard. A stage
assigns a plugin per parameter group (old, new, embeddings, head, adapters);
``StageOptimizers`` runs the resulting optimizers (over disjoint parameter
sets) as one for the trainer, the LR schedule, clipping and DCP checkpoints.

AdamW with per-row / per-column step counts (for SwitchLoRA, docs/peft.md):
SwitchLoRA (arXiv 2406.06564) resets the Adam state of one row of A or
one column of B when that vector is switched, *including its step count*, so
the bias correction (1 - beta^t) restarts for that vector alone. torch's
AdamW keeps one scalar ``step`` per parameter, and no maintained optimizer
library we checked (torch.optim, torchao, bitsandbytes, pytorch-optimizer,
peft) keeps step counts per slice, so this file is a small AdamW of our own.

``step_dims`` maps a parameter to the dimension whose slices count steps
separately: 0 = one count per row (lora_A, shape r x in), 1 = one count per
column (lora_B, shape out x r). Every other parameter keeps torch's scalar
``step`` and gets exactly torch's AdamW update (Loshchilov & Hutter 2019,
Algorithm 2, as in ``torch.optim.AdamW``).

Under FSDP2 the parameter and its moments are DTensors sharded on dim 0; the
step counts are DTensors too (sharded like the parameter when they count rows,
replicated when they count columns), so DCP saves, loads and reshards them
like any other optimizer state. The update itself works on local shards.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torchtitan.components.lr_scheduler import LRSchedulersContainer
from torchtitan.components.optimizer import OptimizersContainer

from steptitan.distributed import local_tensor
from steptitan.recipe import OptimGroup
from steptitan.schema import check_options

GROWTH_STATE_POLICIES = ("fresh", "copy")


@dataclass(frozen=True)
class OptimizerHParams:
    """The run's optimizer hyperparameters ([training] lr, beta1/beta2, eps, weight_decay; a stage's lr)."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float


@dataclass
class NoOptions:
    pass


class OptimizerPlugin:
    """Base class of optimizer plugins. A subclass must define every item below; a missing one is
    a TypeError when the class is defined, so a plugin cannot be half-implemented:

    * ``Options``: a dataclass of its recipe options (``NoOptions`` if none), validated by the
      recipe's schema checker, and by ``__init__`` when built in code (use ``Literal`` and field
      metadata ``ge``/``gt`` for ranges);
    * ``description``: one line for ``steptitan list-plugins``;
    * ``growth_state_policy``: "copy" if its per-parameter state is Adam's ``step`` /
      ``exp_avg`` / ``exp_avg_sq`` shaped like the parameter (growth may then carry it when the
      growth operator's ``optimizer_state = "copy"``), "fresh" if the state restarts after growth;
    * ``resumable``: False if DCP cannot save and restore its state exactly (the plan is then
      refused while checkpointing is on);
    * ``requires``: the pip extra that installs its package (None for torch-only plugins) and
      ``imports``: the modules it needs, checked by ``check_available``;
    * ``build(named_params, hparams)``: a ``torch.optim.Optimizer`` over those parameters;
    * ``state_bytes(name, local_shape, global_shape, world_size, step_slices)``: the optimizer
      state bytes one rank holds for one trainable parameter (its FSDP2 dim-0 shard has
      ``local_shape``). The memory model (steptitan/memory.py) asks this; it must equal what
      ``metrics.memory_breakdown`` measures, or say in its docstring how far off it can be.

    Optional (defaults: nothing beyond the state): ``refresh_bytes(named_shapes, world_size, rank)``,
    the peak transient bytes its step allocates on ``rank`` beyond the state (counted among the
    memory model's overheads), and ``step_flops(named_shapes, world_size, rank)``, the FLOPs per step
    on ``rank`` beyond element-wise updates by kind; ``named_shapes`` are (name, global shape) of its
    trainable parameters in the order the optimizer is built with.
    """

    Options: ClassVar[type]
    description: ClassVar[str]
    growth_state_policy: ClassVar[str]
    resumable: ClassVar[bool]
    requires: ClassVar[str | None]
    imports: ClassVar[tuple[str, ...]] = ()
    registry_name: ClassVar[str]
    _CONTRACT: ClassVar[tuple[str, ...]] = ("Options", "description", "growth_state_policy", "resumable", "requires")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        missing = [a for a in cls._CONTRACT if not hasattr(cls, a)]
        missing += [m for m in ("build", "state_bytes") if getattr(cls, m) is getattr(OptimizerPlugin, m)]
        if missing:
            raise TypeError(f"optimizer plugin {cls.__qualname__} does not define {', '.join(missing)} "
                            f"(see steptitan.optim.OptimizerPlugin)")
        if cls.growth_state_policy not in GROWTH_STATE_POLICIES:
            raise TypeError(f"{cls.__qualname__}.growth_state_policy must be one of {GROWTH_STATE_POLICIES}, "
                            f"got {cls.growth_state_policy!r}")
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"{cls.__qualname__}.Options must be a dataclass")

    def __init__(self, options: Any = None, shape: Any = None):
        """``shape``: the stage's ``ModelShape`` (Adam-mini needs the head layout); None outside a stage."""
        self.options = options if options is not None else self.Options()
        # Options built in code meet the same declared choices and ranges as a recipe's (steptitan/schema.py).
        errors = check_options(self.options, getattr(self, "registry_name", type(self).__name__))
        if errors:
            raise ValueError("; ".join(errors))
        self.shape = shape

    @classmethod
    def check_available(cls) -> None:
        """ImportError naming the pip extra when the plugin's package is not installed."""
        for module in cls.imports:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ImportError(
                    f"optimizer {cls.registry_name!r} needs the {module.split('.')[0]!r} package: "
                    f"pip install 'steptitan[{cls.requires}]'") from exc

    def build(self, named_params: Sequence[tuple[str, nn.Parameter]], hparams: OptimizerHParams) -> torch.optim.Optimizer:
        raise NotImplementedError

    def state_bytes(self, name: str, local_shape: Sequence[int], global_shape: Sequence[int],
                    world_size: int = 1, step_slices: int = 1) -> int:
        raise NotImplementedError

    def refresh_bytes(self, named_shapes: Sequence[tuple[str, Sequence[int]]], world_size: int = 1,
                      rank: int = 0) -> int:
        return 0

    def step_flops(self, named_shapes: Sequence[tuple[str, Sequence[int]]], world_size: int = 1,
                   rank: int = 0) -> dict[str, int]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.registry_name, "options": dataclasses.asdict(self.options)}


def adam_state_bytes(local_shape: Sequence[int], step_slices: int = 1, step_bytes: int = 4) -> int:
    """Two fp32 moments shaped like the shard + the step count(s) (torch AdamW: a 0-d fp32 tensor)."""
    return 8 * math.prod(local_shape) + step_bytes * step_slices


class StageOptimizers(OptimizersContainer):
    """Several torch optimizers over disjoint parameter sets of one model, driven as one.

    torchtitan's ``OptimizersContainer`` pairs model part k with optimizer k for
    ``get_optimizer_state_dict``; listing the same model once per optimizer
    gives each optimizer's state under its parameters' FQNs (disjoint sets,
    so the flattened keys never collide) and DCP saves, reshards and loads
    them like one optimizer's. ``LRSchedulersContainer`` builds one LambdaLR
    per optimizer from the same lambda: one schedule applied to all.
    ``plugins[k]`` is the plugin that built ``optimizers[k]``.
    """

    def __init__(self, model: nn.Module, optimizers: list[torch.optim.Optimizer], plugins: list[OptimizerPlugin]):
        self.optimizers = list(optimizers)
        self.plugins = list(plugins)
        self.model_parts = [model] * len(self.optimizers)
        params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("optimizers of one stage must hold disjoint parameter sets")
        self._validate_length(len(self.model_parts))
        self._post_init(params, {"lr": self.optimizers[0].param_groups[0]["lr"]})

    def growth_state_policy(self, optimizer: torch.optim.Optimizer) -> str:
        return self.plugins[self.optimizers.index(optimizer)].growth_state_policy


class StageLRSchedulers(LRSchedulersContainer):
    """One LambdaLR per optimizer of a ``StageOptimizers``, all from the same lambda and base LR.

    torchtitan saves only the first scheduler's state and loads it into every scheduler, which
    assumes every optimizer has as many param groups as the first (Adam-mini has one per
    parameter, GaLore two). The schedule position (``last_epoch``) is what differs between a run
    and its resume, so loading keeps each scheduler's own per-group lists and takes the rest."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            state = copy.deepcopy(state_dict)
            n = len(scheduler.optimizer.param_groups)
            state["base_lrs"] = list(scheduler.base_lrs)
            state["_last_lr"] = [state_dict["_last_lr"][0]] * n
            state["lr_lambdas"] = [None] * n  # plain functions are saved as None: keep ours
            scheduler.load_state_dict(state)


def step_counts_like(param: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero step counts, one per slice of ``param`` along ``dim`` (size 1 on the other dims)."""
    shape = [n if k == dim else 1 for k, n in enumerate(param.shape)]
    if not isinstance(param, DTensor):
        return torch.zeros(shape, dtype=torch.float32, device=param.device)
    # Sharded like the parameter only along the counted dim; a size-1 dim is replicated.
    placements = [p if isinstance(p, Shard) and p.dim == dim else Replicate() for p in param.placements]
    full = torch.zeros(shape, dtype=torch.float32, device=local_tensor(param).device)
    return distribute_tensor(full, param.device_mesh, placements, src_data_rank=None)


class AdamWSliceSteps(torch.optim.Optimizer):
    """AdamW whose step count can be per row or per column for chosen parameters."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        step_dims: dict[torch.Tensor, int] | None = None,
        foreach: bool | None = None,  # accepted for drop-in use with AdamW kwargs; unused
        **unsupported: Any,
    ):
        if unsupported:
            raise ValueError(f"AdamWSliceSteps does not support {sorted(unsupported)}")
        # Kept off ``defaults`` so it never reaches param_groups / checkpoints.
        self.step_dims = dict(step_dims or {})
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._torch_adamw_step()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None or p not in self.step_dims:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = step_counts_like(p, self.step_dims[p])
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                param, grad = local_tensor(p), local_tensor(p.grad)
                exp_avg, exp_avg_sq = local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"])
                step = local_tensor(state["step"])
                step += 1
                param.mul_(1 - lr * wd)  # decoupled weight decay
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # per-slice counts (on the device) broadcast over the other dim: no host read
                bias1 = 1 - torch.pow(beta1, step)
                bias2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
                denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
                param.addcdiv_(exp_avg / bias1, denom, value=-lr)
        return loss

    def _torch_adamw_step(self) -> None:
        """Parameters without per-slice counts go through torch's foreach AdamW, sharing this optimizer's
        ``state`` (same keys: a 0-d fp32 CPU ``step``, ``exp_avg``, ``exp_avg_sq``), so they get torch's
        update in a few fused kernels instead of a Python loop with a host read of each step count."""
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [p for p in g["params"] if p.grad is not None and p not in self.step_dims]}
                  for g in self.param_groups]
        groups = [g for g in groups if g["params"]]
        if not groups:
            return
        key = tuple(tuple(id(p) for p in g["params"]) for g in groups)
        if getattr(self, "_inner_key", None) != key:  # built once per set of parameters (it keeps no state of its own)
            self._inner, self._inner_key = torch.optim.AdamW(groups, foreach=True), key
        for mine, group in zip(self._inner.param_groups, groups):  # the LR schedule changes lr every step
            mine.update({k: group[k] for k in ("lr", "betas", "eps", "weight_decay")})
        self._inner.state = self.state  # load_state_dict replaces self.state, so share it at every step
        self._inner.step()


# --------------------------------------------------------------------------- per-group assignment

ASSIGNMENT_KEYS: tuple[str, ...] = typing.get_args(OptimGroup)  # the schema's Literal: one list of group names


def resolve_assignment(layers: list[tuple[dict[str, Any], str]], shape: Any = None) -> dict[str, OptimizerPlugin]:
    """The optimizer plugin of each parameter group (old, new, embeddings, head, adapters) of a stage.

    ``layers``: ``(assignment table, where)`` pairs from the most general ([training].optim) to
    the most specific (the stage's ``optim``); a later table's key overrides an earlier one and
    its ``default`` fills the groups no table names. A value is a plugin name or a table
    ``{name = "<plugin>", <options>}``. Adapters follow ``default`` unless named. Raises
    RecipeError (unknown group with a did-you-mean, unknown plugin, bad options).
    """
    from steptitan.recipe import RecipeError
    from steptitan.registry import OPTIM
    from steptitan.schema import resolve_plugin, suggest

    chosen: dict[str, tuple[Any, str]] = {}
    for table, where in layers:
        if not isinstance(table, dict):
            raise RecipeError(f"{where}: expected a table like {{ default = \"adamw\", embeddings = \"adam_mini\" }}, got {table!r}")
        for key, value in table.items():
            if key not in ASSIGNMENT_KEYS:
                raise RecipeError(f"{where}.{key}: unknown parameter group{suggest(str(key), ASSIGNMENT_KEYS)}; "
                                  f"known: {', '.join(ASSIGNMENT_KEYS)}")
            if key == "default":  # a more specific table's default resets the groups the earlier tables named
                chosen = {k: v for k, v in chosen.items() if k == "default"}
            chosen[key] = (value, f"{where}.{key}")
    out: dict[str, OptimizerPlugin] = {}
    built: dict[str, OptimizerPlugin] = {}  # one instance per distinct spec: groups sharing it share one optimizer
    for group in ASSIGNMENT_KEYS[1:]:
        value, where = chosen.get(group) or chosen.get("default") or ("adamw", "default")
        spec = {"name": value} if isinstance(value, str) else value
        if not isinstance(spec, dict):
            raise RecipeError(f"{where}: expected an optimizer name or a table {{ name = \"<optimizer>\", ... }}, got {value!r}")
        cls, options = resolve_plugin(dict(spec), {"plugin": OPTIM, "key": "name"}, where)
        key = repr((cls.registry_name, dataclasses.asdict(options)))
        if key not in built:
            built[key] = cls(options, shape)
        out[group] = built[key]
    return out


def legacy_assignment(training: Any) -> dict[str, Any]:
    """``training.optimizer = "galore"`` + ``[training.galore]`` (before optimizer plugins) as an assignment."""
    if getattr(training, "optimizer", "adamw") == "galore":
        return {"default": {"name": "galore", **dataclasses.asdict(training.galore)}}
    return {}


def build_stage_optimizers(model: nn.Module, plugins: dict[str, OptimizerPlugin], group_of: Any,
                           hparams: OptimizerHParams, peft_choice: tuple[type, dict[str, Any]] | None = None) -> StageOptimizers:
    """One torch optimizer per distinct plugin over its groups' trainable parameters.

    ``group_of(name)``: the group of a parameter name. ``peft_choice``: a PEFT method's own
    AdamW variant (``PeftMethod.optimizer_class``, SwitchLoRA), built for the ``adamw`` groups."""
    by_plugin: dict[int, tuple[OptimizerPlugin, list[tuple[str, nn.Parameter]]]] = {}
    for name, p in model.named_parameters():  # de-duplicates a tied embedding/head (named once, as embeddings)
        if p.requires_grad:
            plugin = plugins[group_of(name)]
            by_plugin.setdefault(id(plugin), (plugin, []))[1].append((name, p))
    optimizers, owners = [], []
    for plugin, named in by_plugin.values():
        if peft_choice is not None and plugin.registry_name == "adamw":
            cls, extra = peft_choice
            opt = cls([p for _, p in named], lr=hparams.lr, betas=hparams.betas, eps=hparams.eps,
                      weight_decay=hparams.weight_decay, foreach=True, **extra)
        else:
            opt = plugin.build(named, hparams)
        optimizers.append(opt)
        owners.append(plugin)
    return StageOptimizers(model, optimizers, owners)


def check_stage_optimizers(plugins: dict[str, OptimizerPlugin], model: nn.Module, group_of: Any,
                           peft_methods: Sequence[Any], checkpointing: bool, where: str) -> None:
    """Plan-time checks of a stage's assignment on its meta model; RecipeError on a problem.

    Only groups that have trainable parameters count: an optimizer over frozen weights never runs."""
    from steptitan.recipe import RecipeError

    used = {group_of(n) for n, p in model.named_parameters() if p.requires_grad}
    for group in sorted(used):
        plugin = plugins[group]
        name = plugin.registry_name
        try:
            plugin.check_available()
        except ImportError as exc:
            raise RecipeError(f"{where}.optim.{group}: {exc}") from None
        if checkpointing and not plugin.resumable:
            raise RecipeError(
                f"{where}.optim.{group}: optimizer {name!r} cannot be checkpointed and resumed exactly (its state "
                f"holds Python objects that DCP cannot save, docs/optimizers.md); set checkpoint.enabled = false to "
                f"train without checkpoints, or choose a resumable optimizer for this group")
    for method in peft_methods:
        adapters = plugins["adapters"]
        if method.edits_adam_state and "adapters" in used and adapters.growth_state_policy != "copy":
            raise RecipeError(
                f"{where}.peft: {method.registry_name!r} edits its adapters' Adam moments (exp_avg / exp_avg_sq), "
                f"but the adapters group's optimizer is {adapters.registry_name!r}, whose state is laid out "
                f"otherwise: its reset would change nothing. Set optim.adapters = \"adamw\" for this stage "
                f"(or training.optim.adapters)")
        if method.optimizer_class(model) is None:
            continue
        others = sorted({plugins[g].registry_name for g in used} - {"adamw"})
        if others:
            raise RecipeError(
                f"{where}.peft: {method.registry_name!r} brings its own AdamW variant (PeftMethod.optimizer_class), "
                f"which replaces adamw for every group of the stage; it cannot be combined with {', '.join(others)}")
