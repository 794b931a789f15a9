"""Recipes: the typed schema, TOML loading, command-line overrides and validation.

A recipe is a TOML file whose sections map onto the dataclasses below. Trailing
``key=value`` arguments are OmegaConf dot-list overrides (``training.steps=40``,
``stages.1.peft.rank=16``). Everything is checked here, before any process group
starts, and every problem is reported in one ``RecipeError`` message.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


class RecipeError(ValueError):
    """A recipe (or its overrides) is invalid. The message says what and where."""


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """Shape of the first stage's model (later stages come from growth).

    Field names follow torchtitan's llama3 ``TransformerModelArgs``.
    """

    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    vocab_size: int = 2048
    ffn_hidden: int | None = None  # None = torchtitan's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False


@dataclass
class DataConfig:
    """Where text comes from and how it is tokenized.

    Exactly one source is used: ``files`` (local txt/json/jsonl/parquet), ``hub``
    (a datasets hub name; needs network), or, when both are empty, the embedded
    ``stdlib-docs`` corpus (docstrings of the installed Python standard library).
    """

    files: list[str] = field(default_factory=list)
    hub: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    text_column: str = "text"
    val_files: list[str] = field(default_factory=list)  # empty = split off val_fraction
    val_fraction: float = 0.05
    tokenizer: str | None = None  # tokenizer.json (or its folder); None = train a BPE
    cache_dir: str = "~/.cache/steptitan"
    max_chars: int = 0  # 0 = use all text; >0 truncates the corpus (quick runs)


@dataclass
class GaloreConfig:
    """galore-torch's GaLoreAdamW options (Zhao et al. 2024, Alg. 2), used when training.optimizer = "galore"."""

    rank: int = 128  # rank of the gradient projection
    update_proj_gap: int = 200  # steps between SVDs of the gradient (T in the paper)
    scale: float = 0.25  # alpha: scale of the projected update
    targets: list[str] = field(default_factory=lambda: ["attention", "feed_forward"])  # block submodules projected


@dataclass
class TrainingConfig:
    steps_per_log: int = 10
    batch_size: int = 8  # sequences per rank per micro-batch
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 1e-3
    min_lr_factor: float = 0.1
    warmup_steps: int = 10
    decay_type: str = "cosine"  # linear | sqrt | cosine (torchtitan's LR schedule)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    seed: int = 0
    dtype: str = "float32"  # FSDP2 compute dtype: float32 | bfloat16 (master weights stay fp32)
    frozen_dtype: str = "float32"  # storage dtype of frozen weights: float32 | bfloat16 (STEP's policy: 2 B per frozen param)
    optimizer: str = "adamw"  # adamw | galore (galore-torch GaLoreAdamW on block linears; extra "galore")
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    activation_checkpointing: bool = False
    eval_interval: int = 0  # 0 = only at stage ends
    eval_batches: int = 8  # per rank; 0 = the whole validation split
    deterministic: bool = False
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    # Reliability (docs/reliability.md).
    skip_nonfinite: int = 0  # 0 = stop at the first NaN/inf loss; N > 0 = drop such steps' updates, at most N per run
    heartbeat_timeout_s: float = 60.0  # a rank silent this long is declared failed and every rank exits (0 = off)
    collective_timeout_s: float = 600.0  # process-group timeout: the last line of defence for a stuck collective


@dataclass
class CheckpointConfig:
    enabled: bool = True
    interval: int = 0  # steps; 0 = only at stage ends
    keep_last: int = 0  # 0 = keep all
    resume: str = "auto"  # auto | never | <path to a checkpoint folder>


@dataclass
class StageConfig:
    """One stage of a schedule.

    ``growth`` is ``{name = "<operator>", <options>...}``; absent means "same
    shape as the previous stage". ``peft`` is ``{method = "<name>", layers =
    "old" | "new" | "all", <options>...}``. ``freeze`` lists layer groups whose
    weights get no gradient: old, new, embeddings, head.
    """

    steps: int = 0
    name: str = ""
    lr: float | None = None  # None = training.lr
    warmup_steps: int | None = None  # None = training.warmup_steps
    model: dict[str, Any] = field(default_factory=dict)  # expected shape (checked against growth)
    growth: dict[str, Any] = field(default_factory=dict)
    peft: dict[str, Any] = field(default_factory=dict)
    extra_peft: list[dict[str, Any]] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs/{name}"
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stages: list[StageConfig] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(os.path.expanduser(self.output_dir.format(name=self.name)))


LAYER_GROUPS = ("old", "new", "embeddings", "head")
PEFT_LAYER_CHOICES = ("old", "new", "all")

# --------------------------------------------------------------------------- generic dict -> dataclass


def _suggest(name: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        sub_errors: list[str] = []
        for arg in non_none:
            trial: list[str] = []
            out = _convert(value, arg, where, trial)
            if not trial:
                return out
            sub_errors.extend(trial)
        errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return None
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table ({tp.__name__}), got {value!r}")
            return None
        return build_dataclass(tp, value, where, errors)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list, got {value!r}")
            return None
        return [_convert(v, item_tp, f"{where}.{i}", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a table, got {value!r}")
            return None
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number, got {value!r}")
            return value
        # nan/inf would pass every range check below (nan < 0 is False) and only
        # surface as a NaN loss mid-run; ints beyond float range would raise OverflowError.
        if not (abs(value) <= 1e300):
            errors.append(f"{where}: expected a finite number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build_dataclass(cls: type, data: dict[str, Any], where: str, errors: list[str]) -> Any:
    """Build ``cls`` from a plain dict, recording unknown keys and type errors in ``errors``."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            errors.append(f"{path}: unknown key{_suggest(str(key), known)}; known keys: {', '.join(sorted(known))}")
            continue
        kwargs[key] = _convert(value, hints[key], path, errors)
    try:
        return cls(**{k: v for k, v in kwargs.items()})
    except TypeError as exc:  # only reachable for dataclasses with required fields
        errors.append(f"{where or cls.__name__}: {exc}")
        return None


def options_from_dict(options_cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a plugin's options dataclass, raising one RecipeError on problems."""
    errors: list[str] = []
    out = build_dataclass(options_cls, data, where, errors)
    if errors:
        raise RecipeError("\n".join(errors))
    return out


# --------------------------------------------------------------------------- loading and overrides


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are YAML-typed (``16`` -> int, ``[8,32]`` -> list)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected key=value (for example training.steps=40)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")) or any(c.isspace() for c in key):
            raise RecipeError(f"override {item!r}: {key!r} is not a dotted key like training.lr")
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]))["v"]  # type: ignore[index]
        except Exception as exc:
            raise RecipeError(f"override {item!r}: cannot parse value {raw!r}: {exc}") from None
        parsed.append((key, value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dot-list overrides to a plain recipe dict (lists are indexed: ``stages.1.steps``)."""
    cfg = OmegaConf.create(data)
    for key, value in parse_overrides(overrides):
        try:
            # A table value replaces the table (stages.1.growth={name: stack}),
            # so options of the previous plugin do not linger.
            OmegaConf.update(cfg, key, value, merge=not isinstance(value, dict), force_add=True)
        except Exception as exc:
            raise RecipeError(f"override {key}={value!r}: {exc}".splitlines()[0]) from None
    return OmegaConf.to_container(cfg)  # type: ignore[return-value]


def load_recipe_dict(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    return apply_overrides(data, overrides or [])


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Typed recipe from a plain dict, with schema and value checks (no plugin/data checks)."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a table, got {type(data).__name__}")
    errors: list[str] = []
    recipe = build_dataclass(Recipe, data, "", errors)
    if not errors:
        errors.extend(check_values(recipe))
    if errors:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(errors))
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    return recipe_from_dict(load_recipe_dict(path, overrides))


# --------------------------------------------------------------------------- value checks


def _positive(errors: list[str], where: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_values(recipe: Recipe) -> list[str]:
    """Range and consistency checks that need no plugin and no data."""
    errors: list[str] = []
    m = recipe.model
    for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of"):
        _positive(errors, f"model.{name}", getattr(m, name))
    _positive(errors, "model.n_kv_heads", m.n_kv_heads)
    _positive(errors, "model.ffn_hidden", m.ffn_hidden)
    if m.dim > 0 and m.n_heads > 0 and m.dim % m.n_heads:
        errors.append(f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads})")
    elif m.dim > 0 and m.n_heads > 0 and (m.dim // m.n_heads) % 2:
        errors.append(f"model: head dim dim/n_heads = {m.dim // m.n_heads} must be even (rotary embeddings)")
    if m.n_kv_heads and m.n_heads > 0 and m.n_heads % m.n_kv_heads:
        errors.append(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    if m.norm_eps <= 0:
        errors.append(f"model.norm_eps: must be > 0, got {m.norm_eps}")
    if m.vocab_size > 2**31 - 1 or m.dim > 2**20 or m.n_layers > 1024:
        errors.append("model: dimensions are implausibly large (vocab_size < 2^31, dim <= 2^20, n_layers <= 1024; building the plan must stay quick)")

    t = recipe.training
    for name in ("batch_size", "grad_accum", "seq_len", "steps_per_log", "eval_batches"):
        _positive(errors, f"training.{name}", getattr(t, name), allow_zero=name == "eval_batches")
    _positive(errors, "training.lr", t.lr)
    _positive(errors, "training.warmup_steps", t.warmup_steps, allow_zero=True)
    _positive(errors, "training.eval_interval", t.eval_interval, allow_zero=True)
    if not 0.0 <= t.min_lr_factor <= 1.0:
        errors.append(f"training.min_lr_factor: must be in [0, 1], got {t.min_lr_factor}")
    if t.decay_type not in ("linear", "sqrt", "cosine"):
        errors.append(f"training.decay_type: {t.decay_type!r} is not one of linear, sqrt, cosine{_suggest(t.decay_type, ('linear', 'sqrt', 'cosine'))}")
    if t.dtype not in ("float32", "bfloat16"):
        errors.append(f"training.dtype: {t.dtype!r} is not one of float32, bfloat16{_suggest(t.dtype, ('float32', 'bfloat16'))}")
    if t.frozen_dtype not in ("float32", "bfloat16"):
        errors.append(f"training.frozen_dtype: {t.frozen_dtype!r} is not one of float32, bfloat16")
    if t.optimizer not in ("adamw", "galore"):
        errors.append(f"training.optimizer: {t.optimizer!r} is not one of adamw, galore{_suggest(t.optimizer, ('adamw', 'galore'))}")
    _positive(errors, "training.galore.rank", t.galore.rank)
    _positive(errors, "training.galore.update_proj_gap", t.galore.update_proj_gap)
    _positive(errors, "training.galore.scale", t.galore.scale)
    if t.backend not in ("auto", "gloo", "nccl"):
        errors.append(f"training.backend: {t.backend!r} is not one of auto, gloo, nccl")
    if not 0 <= t.seed < 2**32:  # numpy's default_rng rejects negative seeds; torch.manual_seed caps at 2^64
        errors.append(f"training.seed: must be in 0..2^32-1, got {t.seed}")
    _positive(errors, "training.skip_nonfinite", t.skip_nonfinite, allow_zero=True)
    _positive(errors, "training.heartbeat_timeout_s", t.heartbeat_timeout_s, allow_zero=True)
    _positive(errors, "training.collective_timeout_s", t.collective_timeout_s)
    for name in ("heartbeat_timeout_s", "collective_timeout_s"):
        if getattr(t, name) > 7 * 24 * 3600:  # also keeps datetime.timedelta from overflowing
            errors.append(f"training.{name}: must be <= 604800 (one week), got {getattr(t, name)}")
    if t.seq_len > 1_000_000 or t.batch_size > 1_000_000:
        errors.append("training: seq_len and batch_size must be <= 1,000,000")
    if not 0 <= t.beta1 < 1 or not 0 <= t.beta2 < 1:
        errors.append("training.beta1/beta2: must be in [0, 1)")

    d = recipe.data
    if not 0.0 < d.val_fraction < 1.0 and not d.val_files:
        errors.append(f"data.val_fraction: must be in (0, 1), got {d.val_fraction}")
    if d.files and d.hub:
        errors.append("data: give either data.files or data.hub, not both")
    _positive(errors, "data.max_chars", d.max_chars, allow_zero=True)

    c = recipe.checkpoint
    _positive(errors, "checkpoint.interval", c.interval, allow_zero=True)
    _positive(errors, "checkpoint.keep_last", c.keep_last, allow_zero=True)

    if not recipe.stages:
        errors.append("stages: a recipe needs at least one [[stages]] entry")
    for i, stage in enumerate(recipe.stages):
        where = f"stages.{i}"
        if stage.steps <= 0:
            errors.append(f"{where}.steps: must be > 0, got {stage.steps}")
        _positive(errors, f"{where}.lr", stage.lr)
        _positive(errors, f"{where}.warmup_steps", stage.warmup_steps, allow_zero=True)
        for group in stage.freeze:
            if group not in LAYER_GROUPS:
                errors.append(f"{where}.freeze: unknown layer group {group!r}{_suggest(str(group), LAYER_GROUPS)}; known: {', '.join(LAYER_GROUPS)}")
        if i == 0 and stage.growth:
            errors.append(f"{where}.growth: the first stage has nothing to grow from; set its shape in [model]")
        for j, spec in enumerate([stage.peft] + stage.extra_peft if stage.peft else stage.extra_peft):
            spec_where = f"{where}.peft" if (stage.peft and j == 0) else f"{where}.extra_peft.{j - (1 if stage.peft else 0)}"
            if "method" not in spec:
                errors.append(f"{spec_where}: needs method = \"<name>\"")
            layers = spec.get("layers", "all")
            if layers not in PEFT_LAYER_CHOICES:
                errors.append(f"{spec_where}.layers: {layers!r} is not one of {', '.join(PEFT_LAYER_CHOICES)}{_suggest(str(layers), PEFT_LAYER_CHOICES)}")
        if stage.growth and "name" not in stage.growth:
            errors.append(f"{where}.growth: needs name = \"<operator>\"")
    return errors


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
