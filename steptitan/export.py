"""Export a steptitan checkpoint as a Hugging Face Llama folder (model.safetensors + config.json).

    steptitan export runs/step OUT_DIR                       # newest checkpoint of a run (= tools/export_hf.py)
    steptitan export runs/step/checkpoints/stage00-step000060 OUT_DIR
    steptitan export CKPT OUT_DIR --recipe recipes/step.toml key=value ...

Any stage and any rank count: the DCP checkpoint is read into one unsharded model
on the CPU (DCP reshards on load), with no process group. The stage's PEFT
adapters (LoRA, ...) are merged into the dense weights with the plugin's own
``merge`` first, so the result is a plain dense Llama. The recipe comes from the
run folder (``recipe.json``, or ``summary.json``), or from ``--recipe`` plus
overrides for runs made before ``recipe.json`` existed.

Weight names and the rotary layout are converted by torchtitan's
``Llama3StateDictAdapter.to_hf``: it permutes the rows of wq/wk from Meta's
interleaved-pair rotary layout to HF's rotate-half layout. config.json carries
rope_theta and torchtitan's llama3 rotary frequency scaling (``rope_scaling``
with ``rope_type = "llama3"``, which torchtitan always applies; null for factor 1,
plain RoPE), and ``tie_word_embeddings`` for a tied embedding / LM head (then
``lm_head.weight`` is not stored). The tokenizer.json the run used is copied when
it can be found, and its bos/eos ids go into config.json and generation_config.json.
The folder is what ``model.init_from`` reads back (steptitan/hf.py, docs/huggingface.md).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from steptitan.checkpoint import CheckpointInfo, list_checkpoints, read_checkpoint
from steptitan.model import ModelShape, base_param_names, init_model_weights, model_args
from steptitan.plan import StagePlan, build_plan
from steptitan.recipe import Recipe, load_recipe, recipe_from_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """The checkpoint or its recipe cannot be found or does not match."""


def find_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        try:
            return read_checkpoint(path)
        except ValueError as exc:  # its messages name the training key checkpoint.resume=PATH
            raise ExportError(str(exc).replace("checkpoint.resume=", "checkpoint ")) from None
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found and _checkpoints_off(path):
        raise ExportError(f"{path} was trained with checkpoint.enabled = false, so it has no checkpoint to read "
                          "(GaLore and Fira runs must train so: their optimizer state cannot be saved, docs/optimizers.md)")
    if not found:
        raise ExportError(f"{path}: neither a steptitan checkpoint (no meta.json) nor a run folder with complete checkpoints")
    return found[-1]


def _checkpoints_off(run_dir: Path) -> bool:
    """True when ``run_dir``'s resolved recipe (recipe.json) turned checkpoints off."""
    try:
        return json.loads((run_dir / "recipe.json").read_text())["checkpoint"]["enabled"] is False
    except (OSError, ValueError, KeyError, TypeError):
        return False


def recipe_for(info: CheckpointInfo, recipe_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """The recipe the checkpoint was trained with: --recipe, else the run folder's recipe.json / summary.json."""
    if recipe_path:
        return load_recipe(recipe_path, overrides or [])
    run_dir = info.path.parent.parent
    for name, key in (("recipe.json", None), ("summary.json", "recipe_resolved")):
        f = run_dir / name
        if f.is_file():
            data = json.loads(f.read_text())
            data = data[key] if key else data
            # The checkpoint holds the weights and recipe.json every shape key: an HF folder a run
            # started from (model.init_from) is not needed, and may be gone, at export time.
            if isinstance(data.get("model"), dict):
                data["model"].pop("init_from", None)
            return recipe_from_dict(data)
    raise ExportError(f"{run_dir} has no recipe.json or summary.json; pass --recipe RECIPE.toml [key=value ...]")


@torch.no_grad()
def load_stage_model(recipe: Recipe, info: CheckpointInfo) -> tuple[StagePlan, torch.nn.Module]:
    """The checkpoint's stage model, unsharded on the CPU, adapters not yet merged."""
    import torch.distributed.checkpoint as dcp

    plans = build_plan(recipe)
    if info.stage >= len(plans):
        raise ExportError(f"checkpoint {info.path.name} is stage {info.stage} but the recipe has {len(plans)} stages")
    plan = plans[info.stage]
    model = plan.build()  # dense model + PEFT modules, on meta
    model.to_empty(device="cpu")
    if plan.shape.tie_embeddings:  # to_empty gives each of the two names its own new tensor
        model.output.weight = model.tok_embeddings.weight
    init_model_weights(model)  # computes the rotary buffer; every parameter is then overwritten
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(info.path), no_dist=True)
    except Exception as exc:  # missing keys / shape mismatch: the recipe is not the checkpoint's
        raise ExportError(f"cannot load {info.path} into stage {info.stage} of the recipe: {exc}".splitlines()[0]) from exc
    model.load_state_dict(state["model"])
    extra = torch.load(info.path / "extra-rank0.pt", weights_only=False)
    for i, method in enumerate(plan.peft):
        method.load_state_dict(extra.get("peft", {}).get(str(i), {}))
    return plan, model


@torch.no_grad()
def load_merged_model(recipe: Recipe, info: CheckpointInfo) -> tuple[StagePlan, torch.nn.Module]:
    """The checkpoint's stage model with every PEFT method merged by its own ``merge``: the function
    ``export`` writes, and what ``generate`` samples. Merging, not the adapted forward, is what makes
    a method's loaded state take effect without ``init_weights`` (APEX's unit selection: issue 23)."""
    plan, model = load_stage_model(recipe, info)
    for method in plan.peft:
        method.merge(model)
    return plan, model


@torch.no_grad()
def merged_dense_state(plan: StagePlan, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fold every PEFT method into the dense weights (the plugin's exact merge) and keep only those."""
    for method in plan.peft:
        method.merge(model)
    names = base_param_names(plan.shape)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def hf_config(shape: ModelShape, dtype: str, special: dict[str, int | None] | None = None) -> dict[str, Any]:
    """config.json of ``shape``. RoPE: torchtitan's llama3 applies Llama 3 frequency scaling with
    ``shape.rope_scaling`` (factor 1 = none: plain RoPE, ``rope_scaling`` null). HF requires
    max_position_embeddings > original_max_position_embeddings for llama3 scaling, so it is the
    scaled context (factor x original), as in Meta's Llama 3.1 configs; the sequence length the
    model was trained at is ``trained_seq_len`` in steptitan_export.json."""
    factor, low, high, original = shape.rope_scaling
    scaled = factor != 1.0
    special = special or {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.dim,
        "intermediate_size": shape.ffn_hidden,
        "num_hidden_layers": shape.n_layers,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max(shape.max_seq_len, int(original * factor)) if scaled else shape.max_seq_len,
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": float(factor),
            "low_freq_factor": float(low),
            "high_freq_factor": float(high),
            "original_max_position_embeddings": int(original),
        } if scaled else None,
        "tie_word_embeddings": shape.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": special.get("bos_token_id"),
        "eos_token_id": special.get("eos_token_id"),
        "torch_dtype": dtype,
    }


def special_token_ids(tokenizer_json: Path | None) -> dict[str, int | None]:
    """bos/eos/pad ids for config.json and generation_config.json, from the tokenizer the run used.

    eos is tokenizer_config.json's eos_token (steptitan's BPE: <|endoftext|>, the token the
    data pipeline puts between documents). A tokenizer with no bos_token gets bos = eos, as
    GPT-2: in steptitan's token stream every document follows an eos. pad = eos, so
    ``generate`` needs no pad token of its own."""
    if tokenizer_json is None:
        return {}
    from tokenizers import Tokenizer

    from steptitan.data import EOS_TOKEN

    try:
        config = json.loads((tokenizer_json.parent / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}

    def token_id(entry: Any) -> int | None:
        text = entry.get("content") if isinstance(entry, dict) else entry
        return tok.token_to_id(text) if isinstance(text, str) else None

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos = token_id(config.get("eos_token"))
    eos = token_id(EOS_TOKEN) if eos is None else eos
    bos = token_id(config.get("bos_token"))
    bos = eos if bos is None else bos
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos if eos is not None else None}


def generation_config(special: dict[str, int | None]) -> dict[str, Any]:
    return {"_from_model_config": True, **{k: v for k, v in special.items() if v is not None}}


def _readable(paths: list[Path]) -> None:
    """rw-r--r-- (under the usual umask 022) like any file a user writes: safetensors and copies of
    cache files may come out 0600, which other users of a shared model folder cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for p in paths:
        os.chmod(p, 0o666 & ~mask)


def to_hf_state(shape: ModelShape, dense: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

    hf = Llama3StateDictAdapter(model_args(shape), None).to_hf(dense)
    if shape.tie_embeddings:
        hf.pop("lm_head.weight", None)  # HF re-ties it to model.embed_tokens.weight
    return {k: v.to(dtype).contiguous() for k, v in hf.items()}


def find_tokenizer(recipe: Recipe) -> Path | None:
    """The tokenizer.json the run used, if it is still there (a given one, or the cached trained BPE)."""
    d = recipe.data
    if d.tokenizer:
        p = Path(os.path.expanduser(d.tokenizer))
        p = p if p.name == "tokenizer.json" else p / "tokenizer.json"
        return p if p.is_file() else None
    try:  # the BPE data.prepare_data trained and cached for this corpus
        from steptitan.data import trained_tokenizer_dir

        p = trained_tokenizer_dir(d, recipe.model.vocab_size) / "tokenizer.json"
    except Exception:
        return None
    return p if p.is_file() else None


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, recipe_path: str | None = None,
           overrides: list[str] | None = None, dtype: str = "float32") -> Path:
    from safetensors.torch import save_file

    info = find_checkpoint(checkpoint)
    recipe = recipe_for(info, recipe_path, overrides)
    plan, model = load_stage_model(recipe, info)
    dense = merged_dense_state(plan, model)
    hf = to_hf_state(plan.shape, dense, DTYPES[dtype])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok = find_tokenizer(recipe)
    special = special_token_ids(tok)
    (out / "config.json").write_text(json.dumps(hf_config(plan.shape, dtype, special), indent=1))
    (out / "generation_config.json").write_text(json.dumps(generation_config(special), indent=1))
    written = [out / "model.safetensors", out / "config.json", out / "generation_config.json"]
    if tok is not None:
        for f in tok.parent.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy2(f, out / f.name)
                written.append(out / f.name)
    (out / "steptitan_export.json").write_text(json.dumps({
        "checkpoint": str(info.path.resolve()), "stage": info.stage, "step": info.step,
        "world_size": info.meta.get("world_size"), "merged_peft": [m.registry_name for m in plan.peft],
        "tokenizer": str(tok) if tok else None, "trained_seq_len": recipe.training.seq_len,
    }, indent=1))
    _readable(written + [out / "steptitan_export.json"])
    return out
