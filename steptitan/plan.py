"""StagePlan: what each stage builds, grows, adapts, freezes and trains.

``build_plan`` resolves a validated recipe into concrete shapes and plugin
instances and checks everything that needs the plugins (names, options, the
shape chain). It touches no weights: models are built on the meta device, so
``--dry-run`` can print exact parameter counts for any size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from steptitan.growth import GrowthOperator, LayerSource
from steptitan.model import ModelShape, base_param_names, build_model, count_params, layer_group_of, shape_from_config
from steptitan.optim import OptimizerPlugin, check_stage_optimizers, legacy_assignment, resolve_assignment
from steptitan.peft import PeftMethod, overrides
from steptitan.recipe import Recipe, RecipeError, StageConfig
from steptitan.schema import plugin_field, resolve_plugin


@dataclass
class StagePlan:
    index: int
    name: str
    steps: int
    lr: float
    warmup_steps: int
    shape: ModelShape
    growth: GrowthOperator | None
    sources: list[LayerSource]  # per layer of this stage's model
    peft: list[PeftMethod]
    freeze: list[str]
    trainable_params: int = 0
    frozen_params: int = 0
    optim: dict[str, OptimizerPlugin] = field(default_factory=dict)  # group -> optimizer plugin (docs/optimizers.md)

    @property
    def old_layers(self) -> set[int]:
        return {j for j, s in enumerate(self.sources) if not s.new}

    @property
    def new_layers(self) -> set[int]:
        return {j for j, s in enumerate(self.sources) if s.new}

    def layers_in(self, group: str) -> list[int]:
        if group == "all":
            return list(range(self.shape.n_layers))
        return sorted(self.old_layers if group == "old" else self.new_layers)

    def param_group(self, name: str) -> str:
        """The optimizer group of a parameter name: old, new, embeddings, head, or adapters (non-dense)."""
        if name not in self._base_names():
            return "adapters"
        return layer_group_of(name, self.old_layers)

    def _base_names(self) -> set[str]:
        if getattr(self, "_base_cache", None) is None:
            self._base_cache = base_param_names(self.shape)
        return self._base_cache

    def build(self) -> nn.Module:
        """This stage's model on meta: dense model + PEFT modules + freezing."""
        return self.build_traced()[0]

    def build_traced(self) -> tuple[nn.Module, list[list[str]]]:
        """``build()``, and per PEFT method the names of the parameters its ``apply`` added."""
        model = build_model(self.shape)
        added = []
        for method in self.peft:
            before = {n for n, _ in model.named_parameters()}
            method.apply(model)
            added.append(sorted({n for n, _ in model.named_parameters()} - before))
        apply_freeze(model, self.freeze, self.old_layers, base_param_names(self.shape))
        return model, added


def apply_freeze(model: nn.Module, groups: list[str], old_layers: set[int], base_names: set[str]) -> None:
    """Freeze the dense weights of ``groups``; adapter parameters stay trainable."""
    for name, p in model.named_parameters():
        if name in base_names and layer_group_of(name, old_layers) in groups:
            p.requires_grad_(False)


def _shape_limits() -> dict[str, int]:
    """Upper bounds for any stage's shape: the ones the recipe schema puts on [model] and training.seq_len
    (one source of truth: far above any real model, low enough that --dry-run's meta model stays fast)."""
    import dataclasses

    from steptitan.recipe import ModelConfig, TrainingConfig

    limits = {f.name: f.metadata["le"] for f in dataclasses.fields(ModelConfig) if "le" in f.metadata}
    limits["max_seq_len"] = next(f.metadata["le"] for f in dataclasses.fields(TrainingConfig) if f.name == "seq_len")
    return limits


SHAPE_LIMITS = _shape_limits()


def check_shape(shape: ModelShape, where: str) -> None:
    """Types and ranges of a stage's shape (from [model], a stage's ``model`` table, or growth)."""
    import dataclasses
    import math

    errors = []
    for f in dataclasses.fields(ModelShape):
        value = getattr(shape, f.name)
        if f.type in ("int", int):
            if isinstance(value, bool) or not isinstance(value, int):
                errors.append(f"{f.name}: expected an integer, got {value!r}")
            elif not 0 < value <= SHAPE_LIMITS.get(f.name, value):
                errors.append(f"{f.name}: must be in 1..{SHAPE_LIMITS.get(f.name)}, got {value}")
        elif f.type in ("float", float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                errors.append(f"{f.name}: expected a finite number > 0, got {value!r}")
        elif f.type in ("bool", bool) and not isinstance(value, bool):
            errors.append(f"{f.name}: expected true/false, got {value!r}")
    if not errors:
        # width growth keeps head_dim fixed (fixed_head_dim), so n_heads * head_dim may differ from dim
        if shape.fixed_head_dim is not None and (shape.fixed_head_dim <= 0 or shape.fixed_head_dim % 2):
            errors.append(f"head_dim ({shape.fixed_head_dim}) must be even and > 0 (rotary embeddings)")
        elif shape.fixed_head_dim is None and (shape.dim % shape.n_heads or (shape.dim // shape.n_heads) % 2):
            errors.append(f"dim ({shape.dim}) must be a multiple of n_heads ({shape.n_heads}) with an even head dim")
        elif shape.n_heads % shape.n_kv_heads:
            errors.append(f"n_heads ({shape.n_heads}) must be divisible by n_kv_heads ({shape.n_kv_heads})")
    if errors:
        raise RecipeError(f"{where}: invalid model shape: " + "; ".join(errors))


def _plugin_options(spec: dict[str, Any], table: str, where: str) -> tuple[type, Any]:
    """(plugin class, its Options) for a stage's ``table`` (growth / peft / extra_peft), checked by the
    same schema code and field declaration (StageConfig) that recipe_from_dict uses."""
    return resolve_plugin(spec, plugin_field(StageConfig, table), where)


def build_plan(recipe: Recipe) -> list[StagePlan]:
    plans: list[StagePlan] = []
    shape = shape_from_config(recipe.model, recipe.training.seq_len)
    for i, stage in enumerate(recipe.stages):
        where = f"stages.{i}"
        growth = None
        if stage.growth:
            cls, opts = _plugin_options(stage.growth, "growth", f"{where}.growth")
            try:
                growth = cls(opts)
                new_shape = growth.target_shape(shape)
                sources = growth.layer_sources(shape)
            except ValueError as exc:
                raise RecipeError(f"{where}.growth: {exc}") from None
            if len(sources) != new_shape.n_layers:
                raise RecipeError(f"{where}.growth: operator {stage.growth['name']!r} gave {len(sources)} layer sources for {new_shape.n_layers} layers")
        else:
            new_shape = shape
            # stage 0: every layer is fresh; later stages without growth carry all layers
            sources = [LayerSource((j,), new=(i == 0)) for j in range(shape.n_layers)]
        for key, value in stage.model.items():
            if not hasattr(new_shape, key):
                raise RecipeError(f"{where}.model.{key}: unknown shape field")
            if i == 0:
                new_shape = new_shape.replace(**{key: value})
            elif getattr(new_shape, key) != value:
                how = f"growth {stage.growth['name']!r} produces" if growth else "with no growth the stage keeps"
                raise RecipeError(
                    f"inconsistent stage shapes: {where}.model.{key} = {value!r} but {how} {key} = {getattr(new_shape, key)!r}"
                )
        check_shape(new_shape, f"{where}.model" if stage.model else where)
        if i == 0 and stage.model:  # stage 0's own model table may change n_layers: sources follow, once checked
            sources = [LayerSource((j,), new=True) for j in range(new_shape.n_layers)]
        shape = new_shape

        plan = StagePlan(
            index=i,
            name=stage.name or f"stage{i}",
            steps=stage.steps,
            lr=stage.lr if stage.lr is not None else recipe.training.lr,
            warmup_steps=stage.warmup_steps if stage.warmup_steps is not None else recipe.training.warmup_steps,
            shape=shape,
            growth=growth,
            sources=sources,
            peft=[],
            freeze=list(stage.freeze),
        )
        specs = ([("peft", stage.peft)] if stage.peft else []) + [
            (f"extra_peft.{k}", s) for k, s in enumerate(stage.extra_peft)
        ]
        for key, spec in specs:
            cls, opts = _plugin_options(spec, "peft", f"{where}.{key}")
            layers = plan.layers_in(spec.get("layers", "all"))
            try:
                plan.peft.append(cls(opts, layers, seed=recipe.training.seed + 1000 * i))
            except ValueError as exc:
                raise RecipeError(f"{where}.{key}: {exc}") from None
        try:
            model, added = plan.build_traced()
        except ValueError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        for (key, spec), method, names in zip(specs, plan.peft, added):
            if names and not overrides(method, "merge"):
                raise RecipeError(
                    f"{where}.{key}: PEFT method {spec['method']!r} ({type(method).__module__}.{type(method).__qualname__}) "
                    f"adds parameters ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) but does not override "
                    f"merge(model), so what they learn would be lost at the next growth and in the export; the plugin "
                    f"must implement merge to fold them into the dense weights (docs/peft.md, \"A PEFT plugin must\")")
        plan.optim = resolve_assignment([(legacy_assignment(recipe.training), "training.optimizer"),
                                         (recipe.training.optim, "training.optim"), (stage.optim, f"{where}.optim")], shape)
        check_stage_optimizers(plan.optim, model, plan.param_group, plan.peft, recipe.checkpoint.enabled, where)
        plan.trainable_params, plan.frozen_params = count_params(model)
        if plan.trainable_params == 0:
            raise RecipeError(f"{where}: nothing is trainable (every group frozen and no adapter)")
        plans.append(plan)
    return plans


def plan_fingerprint(plans: list[StagePlan]) -> str:
    """A digest of what the checkpoints of a run depend on: every stage's shape,
    growth, PEFT methods and freezing (not step counts or LRs, which may change on resume)."""
    import dataclasses
    import hashlib
    import json

    def describe(obj) -> dict:
        return {"name": obj.registry_name, "options": dataclasses.asdict(obj.options)}

    default_rope = ModelShape.__dataclass_fields__["rope_scaling"].default

    def shape_of(shape: ModelShape) -> dict:  # torchtitan's RoPE scaling left out, so older checkpoints still resume
        d = dataclasses.asdict(shape)
        return d if tuple(d["rope_scaling"]) != default_rope else {k: v for k, v in d.items() if k != "rope_scaling"}

    stages = [{
        "shape": shape_of(p.shape),
        "growth": describe(p.growth) if p.growth is not None else None,
        "peft": [{**describe(m), "layers": m.layers} for m in p.peft],
        "freeze": sorted(p.freeze),
        # only when not all AdamW, so checkpoints of runs from before optimizer plugins still resume
        **({"optim": {g: describe(o) for g, o in sorted(p.optim.items())}}
           if any(o.registry_name != "adamw" for o in p.optim.values()) else {}),
    } for p in plans]
    return hashlib.sha256(json.dumps(stages, sort_keys=True, default=str).encode()).hexdigest()[:16]


def format_table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset(), indent: str = "") -> list[str]:
    """Text table lines; every column as wide as its widest cell, so long values never run into the next column."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return indent + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def peft_text(method: PeftMethod) -> str:
    """``lora[2L] rank=8 alpha=16``: the method, what it adapts (N layers, or the method's label) and its
    rank and alpha, then every option that differs from the method's default."""
    import dataclasses

    shown = []
    for f in dataclasses.fields(method.options):
        value = getattr(method.options, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        if f.name in ("rank", "alpha") or value != default:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else f"{value:g}" if isinstance(value, float) else str(value)
            shown.append(f"{f.name}={text}")
    return " ".join([f"{method.registry_name}[{method.label()}]", *shown])


def format_plan(plans: list[StagePlan], memory: list[Any] | None = None, vanilla: Any = None) -> str:
    """The stage table of --dry-run: shapes, growth, PEFT (with rank and alpha), freezing, parameters;
    with ``memory`` (steptitan/memory.StageMemory per stage) and ``vanilla`` (the same for the last
    stage's model trained in full) also the predicted peak model states per rank and their ratio to vanilla."""
    from steptitan.metrics import fmt_bytes

    headers = ["stage", "layers", "dim", "steps", "growth", "peft", "freeze", "trainable", "frozen"]
    if memory is not None:
        headers += ["states/rank", "vs vanilla"]
    rows, notes = [], {}
    for p in plans:
        growth = "-"
        if p.growth is not None:
            growth = p.growth.registry_name + (" (exact)" if p.growth.is_exact(plans[p.index - 1].shape) else "")
        row = [p.name, str(p.shape.n_layers), str(p.shape.dim), str(p.steps), growth,
               "; ".join(peft_text(m) for m in p.peft) or "-", ",".join(p.freeze) or "-",
               f"{p.trainable_params:,}", f"{p.frozen_params:,}"]
        if memory is not None:
            states = memory[p.index].peak_model_states
            row += [fmt_bytes(states), f"{states / vanilla.peak_model_states:.2f}x" if vanilla else "-"]
        rows.append(row)
        extra = []
        new = sorted(p.new_layers)
        if p.index > 0 and new:
            extra.append(f"new layers: {new}")
        if any(o.registry_name != "adamw" for o in p.optim.values()):
            extra.append("optimizers: " + ", ".join(f"{g} {o.registry_name}" for g, o in p.optim.items()))
        notes[len(rows)] = extra
    lines = format_table(headers, rows, right={1, 2, 3, 7, 8, 9, 10})
    out = [lines[0]]
    for k, line in enumerate(lines[1:], 1):
        out.append(line)
        out.extend("  " + text for text in notes.get(k, []))
    return "\n".join(out)
