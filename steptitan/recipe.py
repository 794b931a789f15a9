"""Recipes: the typed schema, TOML loading, command-line overrides and validation.

A recipe is a TOML file whose sections map onto the dataclasses below. Trailing
``key=value`` arguments are OmegaConf dot-list overrides (``training.seq_len=64``,
``stages.1.peft.rank=16``). Everything is checked here, before any process group
starts, and every problem is reported in one ``RecipeError`` message: choices
(``Literal``) and ranges (field metadata ``ge``/``gt``/``le``/``lt``) are declared
on the fields below and checked by steptitan/schema.py, which also checks each
stage's plugin tables against the plugin's ``Options``; cross-field rules are
in ``check_values``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from steptitan.registry import GROWTH, OPTIM, PEFT
from steptitan.schema import RecipeError, build_dataclass, options_from_dict  # noqa: F401  (re-exported)


def _range(default: Any = dataclasses.MISSING, **bounds: float) -> Any:
    """A field with a range: ``_range(8, gt=0)`` is ``field(default=8, metadata={"gt": 0})``."""
    return field(default=default, metadata=bounds)


DecayType = Literal["linear", "sqrt", "cosine"]
Dtype = Literal["float32", "bfloat16"]
LayerGroup = Literal["old", "new", "embeddings", "head"]  # what ``freeze`` may name
PeftLayers = Literal["old", "new", "all"]  # which layers a PEFT method adapts
OptimGroup = Literal["default", "old", "new", "embeddings", "head", "adapters"]  # keys of an optim table
# An optim table maps a parameter group to an optimizer name or a table { name = "<optimizer>", <options> }.
OPTIM_TABLE = {"plugin": OPTIM, "key": "name", "key_what": "parameter group"}


# --------------------------------------------------------------------------- schema


@dataclass
class RopeScalingConfig:
    """Llama 3 rotary frequency scaling, which torchtitan's llama3 model always applies (its defaults here).

    ``factor = 1`` leaves every frequency unchanged: plain RoPE (Llama 2 and most other Llama-style models)."""

    factor: float = _range(8.0, gt=0)
    low_freq_factor: float = _range(1.0, gt=0)
    high_freq_factor: float = _range(4.0, gt=0)  # must be > low_freq_factor
    original_max_position_embeddings: int = _range(8192, gt=0)


@dataclass
class ModelConfig:
    """Shape of the first stage's model (later stages come from growth).

    Field names follow torchtitan's llama3 ``TransformerModelArgs``. With ``init_from``
    (a Hugging Face Llama folder) the shape keys left out are taken from its config.json
    and the ones given must agree with it (docs/huggingface.md).
    """

    # Upper bounds (plan.SHAPE_LIMITS): far above any real model, low enough that --dry-run stays quick.
    dim: int = _range(128, gt=0, le=2**20)
    n_layers: int = _range(2, gt=0, le=1024)
    n_heads: int = _range(4, gt=0, le=2**16)
    n_kv_heads: int | None = _range(None, gt=0, le=2**16)  # None = n_heads (no GQA)
    vocab_size: int = _range(2048, gt=0, le=2**31 - 1)
    ffn_hidden: int | None = _range(None, gt=0, le=2**24)  # None = torchtitan's rule from multiple_of / ffn_dim_multiplier
    multiple_of: int = _range(32, gt=0)
    ffn_dim_multiplier: float | None = _range(None, gt=0)
    norm_eps: float = _range(1e-5, gt=0)
    rope_theta: float = _range(10000.0, gt=0)
    tie_embeddings: bool = False  # one tensor for embedding table and LM head, kept through growth (docs/growth.md)
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    # A Hugging Face Llama folder (config.json + *.safetensors [+ tokenizer.json]): stage 0 starts from
    # its weights instead of a random init, and its tokenizer is data.tokenizer (continued pre-training).
    init_from: str | None = None


@dataclass
class DataConfig:
    """Where text comes from and how it is tokenized.

    Exactly one source is used: ``files`` (local txt/json/jsonl/parquet), ``hub``
    (a datasets hub name; needs network), or, when both are empty, the embedded
    ``stdlib-docs`` corpus (docstrings of the installed Python standard library).
    """

    files: list[str] = field(default_factory=list)
    hub: str | None = None  # a hub dataset name (network) or a local dataset folder; streamed either way
    hub_config: str | None = None
    hub_split: str = "train"
    text_column: str = "text"
    val_files: list[str] = field(default_factory=list)  # empty = split off val_fraction
    val_fraction: float = 0.05  # in (0, 1) unless val_files is given
    tokenizer: str | None = None  # tokenizer.json (or its folder); None = train a BPE
    cache_dir: str = "~/.cache/steptitan"
    max_chars: int = _range(0, ge=0)  # 0 = use all text; >0 truncates the corpus (quick runs)
    # Bring your own tokens (no tokenizing): a nanoGPT-style flat .bin of token ids, or a datasets folder
    # with an input_ids column; data.tokenizer must be the tokenizer that made them (README "Data")
    tokens: str | None = None
    tokens_dtype: Literal["uint16", "uint32"] = "uint16"  # element type of a .bin token file (nanoGPT: uint16)
    val_tokens: str | None = None  # validation tokens of the same kind; None = the last val_fraction of data.tokens


@dataclass
class GaloreConfig:
    """galore-torch's GaLoreAdamW options (Zhao et al. 2024, Alg. 2), used when training.optimizer = "galore"."""

    rank: int = _range(128, gt=0)  # rank of the gradient projection
    update_proj_gap: int = _range(200, gt=0)  # steps between SVDs of the gradient (T in the paper)
    scale: float = _range(0.25, gt=0)  # alpha: scale of the projected update
    targets: list[str] = field(default_factory=lambda: ["attention", "feed_forward"])  # block submodules projected


@dataclass
class TrainingConfig:
    steps_per_log: int = _range(10, gt=0)
    batch_size: int = _range(8, gt=0, le=1_000_000)  # sequences per rank per micro-batch
    grad_accum: int = _range(1, gt=0)
    seq_len: int = _range(128, gt=0, le=1_000_000)
    lr: float = _range(1e-3, gt=0)
    min_lr_factor: float = _range(0.1, ge=0, le=1)  # the schedule decays to lr * min_lr_factor
    warmup_steps: int = _range(10, ge=0)
    decay_type: DecayType = "cosine"  # torchtitan's LR schedule after warmup
    # "stage": every stage warms up and decays on its own steps (a restart per stage); "run": one warmup
    # (the first stage's) and one decay over all stages' steps, each stage taking its slice of it
    lr_schedule: Literal["stage", "run"] = "stage"
    weight_decay: float = 0.1
    beta1: float = _range(0.9, ge=0, lt=1)
    beta2: float = _range(0.95, ge=0, lt=1)
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    seed: int = _range(0, ge=0, le=2**32 - 1)  # numpy's default_rng rejects negative seeds
    # FSDP2 compute dtype (master weights stay fp32); auto = bfloat16 on CUDA (flash attention, tensor
    # cores), float32 on the CPU (docs/gpu.md)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    frozen_dtype: Dtype = "float32"  # storage dtype of frozen weights (STEP's policy: bfloat16, 2 B per frozen param)
    optimizer: Literal["adamw", "galore"] = "adamw"  # galore = galore-torch GaLoreAdamW on block linears (extra "galore")
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    # Optimizer per parameter group for every stage (docs/optimizers.md): { default = "adamw",
    # embeddings = "adam_mini", head = { name = "galore", rank = 64 } }; groups default, old, new,
    # embeddings, head, adapters (adapters follow default). A stage's optim overrides it.
    optim: dict[OptimGroup, str | dict[str, Any]] = field(default_factory=dict, metadata=OPTIM_TABLE)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each transformer block (torchtitan's per-block compile; docs/gpu.md)
    compile_backend: str = "inductor"  # torch.compile backend (torchtitan's compile.backend); aot_eager to debug
    # Gradient accumulation: "last" reduce-scatters once per step (FSDP2's set_requires_gradient_sync(False)
    # on the other micro-batches, which keep unsharded fp32 gradients of the trainable weights meanwhile);
    # "every" reduce-scatters after every micro-batch (less memory, grad_accum x the gradient traffic)
    grad_sync: Literal["last", "every"] = "last"
    eval_interval: int = _range(0, ge=0)  # 0 = only at stage ends
    eval_batches: int = _range(8, ge=0)  # eval set = the first eval_batches x batch_size validation blocks, split across ranks (the same at any world size); 0 = the whole split
    # the last stage's final evaluation: None = eval_batches; 0 = the whole validation split (the benchmark's
    # report slice). Its per-block losses go to summary.json (final_val_block_losses) for a bootstrap over blocks.
    final_eval_batches: int | None = _range(None, ge=0)
    deterministic: bool = False
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto = nccl on CUDA, gloo on CPU
    # Reliability (docs/reliability.md). Timeouts are at most one week (604800 s; datetime.timedelta must not overflow).
    skip_nonfinite: int = _range(0, ge=0)  # 0 = stop at the first NaN/inf loss; N > 0 = drop such steps' updates, at most N per run
    heartbeat_timeout_s: float = _range(60.0, ge=0, le=604800)  # a rank silent this long is declared failed and every rank exits (0 = off)
    collective_timeout_s: float = _range(600.0, gt=0, le=604800)  # process-group timeout: the last line of defence for a stuck collective


@dataclass
class ParallelConfig:
    """Data-parallel layout, with torchtitan's names and meaning (docs/scale-out.md).

    ``dp_shard`` ranks shard every parameter (FSDP2); ``dp_replicate`` copies of
    that shard group each train on their own data and all-reduce gradients
    (HSDP: ``fully_shard`` over a 2-D (replicate, shard) mesh). -1 means "fill":
    world size / the other degree. The default (1, -1) is one flat shard group
    over every rank, plain FSDP2. Per-rank memory follows ``dp_shard``, not the
    world size.
    """

    # Ranges are in check_values: ">= 1, or -1" does not fit one ge/gt bound.
    dp_replicate: int = 1  # 1 = no replication; -1 = world size / dp_shard
    dp_shard: int = -1  # -1 = world size / dp_replicate (torchtitan's default)


@dataclass
class CheckpointConfig:
    enabled: bool = True
    interval: int = _range(0, ge=0)  # steps; 0 = only at stage ends
    keep_last: int = _range(0, ge=0)  # 0 = keep all
    resume: Literal["auto", "never"] | str = "auto"  # auto | never | <path to a checkpoint folder>


@dataclass
class MetricsConfig:
    """Experiment trackers (rank 0 writes them) and stage-end samples; README "Read the logs"."""

    tensorboard: bool = True  # <output_dir>/tb: scalars, the resolved recipe as text + hparams, samples
    # Weights & Biases through torchtitan's WandBLogger (pip extra "wandb"); files in <output_dir>/wandb.
    # WANDB_MODE=offline needs no account (`wandb sync` uploads later); a resumed run continues the same W&B run.
    wandb: bool = False
    wandb_project: str | None = None  # None = $WANDB_PROJECT, else "steptitan"
    wandb_name: str | None = None  # None = $WANDB_RUN_NAME, else the recipe's name
    wandb_entity: str | None = None  # None = $WANDB_TEAM, else your default entity
    # Text sampled from the model at every stage end, printed and logged to the trackers, to judge a
    # run by eye ([] = off). Same sampler as `steptitan generate` (steptitan/generate.py).
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = _range(32, gt=0, le=4096)  # new tokens per prompt
    sample_temperature: float = _range(0.8, ge=0, le=100)  # 0 = greedy
    sample_top_k: int = _range(50, ge=0)  # 0 = sample from the whole vocabulary


@dataclass
class PeftHead:
    """The keys of a ``peft`` / ``extra_peft`` table that belong to the stage, not to the method's Options."""

    layers: PeftLayers = "all"


@dataclass
class StageConfig:
    """One stage of a schedule.

    ``growth`` is ``{name = "<operator>", <options>...}``; absent means "same
    shape as the previous stage". ``peft`` is ``{method = "<name>", layers =
    "old" | "new" | "all", <options>...}``. ``freeze`` lists layer groups whose
    weights get no gradient: old, new, embeddings, head. The plugin tables are
    checked against the named plugin's ``Options`` in the same pass as the rest.
    """

    steps: int = _range(0, gt=0)  # required: the default 0 is rejected
    name: str = ""
    lr: float | None = _range(None, gt=0)  # None = training.lr
    warmup_steps: int | None = _range(None, ge=0)  # None = training.warmup_steps
    model: dict[str, Any] = field(default_factory=dict)  # expected shape (checked against growth)
    growth: dict[str, Any] = field(default_factory=dict, metadata={"plugin": GROWTH, "key": "name"})
    peft: dict[str, Any] = field(default_factory=dict, metadata={"plugin": PEFT, "key": "method", "head": PeftHead})
    extra_peft: list[dict[str, Any]] = field(default_factory=list, metadata={"plugin": PEFT, "key": "method", "head": PeftHead})
    freeze: list[LayerGroup] = field(default_factory=list, metadata={"what": "layer group"})
    # optimizer per parameter group in this stage, over [training].optim (docs/optimizers.md)
    optim: dict[OptimGroup, str | dict[str, Any]] = field(default_factory=dict, metadata=OPTIM_TABLE)


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs/{name}"
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stages: list[StageConfig] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return run_dir_path(self.name, self.output_dir)


def run_dir_path(name: str, output_dir: str) -> Path:
    """The run folder: ``output_dir`` with ``{name}`` filled in and ``~`` expanded (also read from a raw recipe)."""
    return Path(os.path.expanduser(output_dir.format(name=name)))


# --------------------------------------------------------------------------- loading and overrides


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are YAML-typed (``16`` -> int, ``[8,32]`` -> list)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected key=value (for example training.lr=3e-4)")
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


def _check_indices(data: Any, key: str, value: Any) -> None:
    """An override that indexes past the end of a list (``stages.5.steps`` with 3 stages) names the list's length."""
    node, parts = data, key.split(".")
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            try:
                index = int(part)
            except ValueError:
                return  # OmegaConf reports a non-integer index itself
            if not -len(node) <= index < len(node):  # negative indices count from the end, as in Python
                where = ".".join(parts[:depth])
                raise RecipeError(f"override {key}={value!r}: there is no {where}.{index}: {where} has {len(node)} "
                                  f"entr{'y' if len(node) == 1 else 'ies'}"
                                  + (f" ({where}.0 .. {where}.{len(node) - 1})" if node else ""))
            node = node[index]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dot-list overrides to a plain recipe dict (lists are indexed: ``stages.1.steps``)."""
    cfg = OmegaConf.create(data)
    for key, value in parse_overrides(overrides):
        _check_indices(OmegaConf.to_container(cfg), key, value)
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
    """Typed recipe from a plain dict: types, choices, ranges, every plugin table's options (the
    plugins are resolved from the registry) and the cross-field rules, all reported in one RecipeError.
    What needs the built plan (the shape chain) or the data is checked later."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a table, got {type(data).__name__}")
    errors: list[str] = []
    rejected: set[str] = set()  # paths whose values were rejected; they hold defaults now
    if isinstance(data.get("model"), dict) and data["model"].get("init_from"):
        from steptitan.hf_config import apply_init_from  # the shape (and tokenizer) of an HF folder

        data = apply_init_from(data, errors)
    recipe = build_dataclass(Recipe, data, "", errors, rejected)
    errors.extend(check_values(recipe, rejected))
    if errors:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(errors))
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    return recipe_from_dict(load_recipe_dict(path, overrides))


# --------------------------------------------------------------------------- cross-field checks


def check_values(recipe: Recipe, rejected: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    """Rules that tie fields together (types, choices and ranges are the schema's job).

    A rule is skipped when one of its fields was ``rejected`` by the schema: the field then
    holds its default, which would make the rule report nonsense."""
    errors: list[str] = []

    def valid(*paths: str) -> bool:
        return not any(p in rejected or any(r.startswith(p + ".") for r in rejected) for p in paths)

    m = recipe.model
    if valid("model.dim", "model.n_heads", "model.n_kv_heads"):
        if m.dim % m.n_heads:
            errors.append(f"model.dim ({m.dim}) must be divisible by model.n_heads ({m.n_heads})")
        elif (m.dim // m.n_heads) % 2:
            errors.append(f"model: head dim dim/n_heads = {m.dim // m.n_heads} must be even (rotary embeddings)")
        if m.n_kv_heads and m.n_heads % m.n_kv_heads:
            errors.append(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.n_kv_heads})")
    rs = m.rope_scaling
    if valid("model.rope_scaling") and rs.high_freq_factor <= rs.low_freq_factor:
        errors.append(f"model.rope_scaling: high_freq_factor ({rs.high_freq_factor}) must be > low_freq_factor "
                      f"({rs.low_freq_factor}) (torchtitan interpolates between them)")

    d = recipe.data
    if valid("data.val_fraction", "data.val_files") and not 0.0 < d.val_fraction < 1.0 and not d.val_files:
        errors.append(f"data.val_fraction: must be in (0, 1) when data.val_files is empty, got {d.val_fraction}")
    if sum(map(bool, (d.files, d.hub, d.tokens))) > 1:
        errors.append("data: give one of data.files, data.hub and data.tokens, not several")
    if (d.tokens or d.val_tokens) and not d.tokenizer:
        errors.append("data.tokens: needs data.tokenizer, the tokenizer that made the tokens (for its vocabulary, "
                      "end-of-text id, export and generate)")
    if d.val_tokens and not d.tokens:
        errors.append("data.val_tokens: only with data.tokens (use data.val_files for text)")

    p = recipe.parallel
    for key in ("dp_replicate", "dp_shard"):
        if valid(f"parallel.{key}") and getattr(p, key) < 1 and getattr(p, key) != -1:
            errors.append(f"parallel.{key}: must be >= 1, or -1 (fill with the rest of the world size), "
                          f"got {getattr(p, key)}")
    if valid("parallel.dp_replicate", "parallel.dp_shard") and p.dp_replicate == -1 and p.dp_shard == -1:
        errors.append("parallel: dp_replicate and dp_shard cannot both be -1 (fill); set one of them")

    if not recipe.stages and valid("stages"):
        errors.append("stages: a recipe needs at least one [[stages]] entry")
    if recipe.stages and recipe.stages[0].growth:
        errors.append("stages.0.growth: the first stage has nothing to grow from; set its shape in [model]")
    if recipe.metrics.wandb and valid("metrics.wandb"):
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            errors.append("metrics.wandb = true needs the wandb package: pip install 'steptitan[wandb]'")
    return errors


def parallel_degrees(parallel: ParallelConfig, world_size: int,
                     where: str = "the world size (torchrun's WORLD_SIZE)") -> tuple[int, int]:
    """(dp_replicate, dp_shard) for ``world_size`` ranks with -1 filled in; a RecipeError when they do not
    multiply to the world size. ``where`` names the world size in messages (e.g. "--world-size")."""
    r, s = parallel.dp_replicate, parallel.dp_shard
    if (r == -1 and s == -1) or min(r, s) < -1 or 0 in (r, s):  # check_values reports these with the recipe
        raise RecipeError(f"parallel: dp_replicate={r}, dp_shard={s} is not a layout (each >= 1, at most one -1)")
    for name, fill, other_name, other in (("dp_replicate", r, "dp_shard", s), ("dp_shard", s, "dp_replicate", r)):
        if fill == -1 and world_size % other:
            raise RecipeError(f"parallel.{name}=-1 fills the world size, but {where} is {world_size}, "
                              f"not a multiple of parallel.{other_name}={other}")
    r = world_size // s if r == -1 else r
    s = world_size // r if s == -1 else s
    if r * s != world_size:
        raise RecipeError(f"parallel.dp_replicate ({r}) x parallel.dp_shard ({s}) = {r * s} ranks, but {where} is "
                          f"{world_size}; the product must equal the world size (-1 on one of them fills it)")
    return r, s


def missing_files(recipe: Recipe) -> list[str]:
    """Input files the recipe names that do not exist (data files, the tokenizer), one message each.

    ``--dry-run`` and ``steptitan sweep --check`` report them without reading any data; at launch
    steptitan.data raises the same problem as a DataError."""
    d = recipe.data
    out = [f"data.{key}: {f!r} does not exist" for key in ("files", "val_files") for f in getattr(d, key)
           if not Path(os.path.expanduser(f)).is_file()]
    out += [f"data.{key}: {getattr(d, key)!r} does not exist" for key in ("tokens", "val_tokens")
            if getattr(d, key) and not Path(os.path.expanduser(getattr(d, key))).exists()]
    if d.tokenizer:
        tok = Path(os.path.expanduser(d.tokenizer))
        if not (tok.is_file() or (tok / "tokenizer.json").is_file()):
            out.append(f"data.tokenizer: {d.tokenizer!r} is neither a tokenizer.json nor a folder with one")
    return out


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
