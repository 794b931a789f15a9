#!/usr/bin/env python
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
with ``rope_type = "llama3"``, which torchtitan always applies), and
``tie_word_embeddings`` for a tied embedding / LM head (then ``lm_head.weight``
is not stored). The tokenizer.json the run used is copied when it can be found.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from steptitan.checkpoint import CheckpointInfo, list_checkpoints, read_checkpoint
from steptitan.model import ModelShape, base_param_names, init_model_weights, model_args
from steptitan.plan import StagePlan, build_plan
from steptitan.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """The checkpoint or its recipe cannot be found or does not match."""


def find_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return read_checkpoint(path)
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found:
        raise ExportError(f"{path}: neither a steptitan checkpoint (no meta.json) nor a run folder with complete checkpoints")
    return found[-1]


def recipe_for(info: CheckpointInfo, recipe_path: str | None = None, overrides: list[str] | None = None) -> Recipe:
    """The recipe the checkpoint was trained with: --recipe, else the run folder's recipe.json / summary.json."""
    if recipe_path:
        return load_recipe(recipe_path, overrides or [])
    run_dir = info.path.parent.parent
    for name, key in (("recipe.json", None), ("summary.json", "recipe_resolved")):
        f = run_dir / name
        if f.is_file():
            data = json.loads(f.read_text())
            return recipe_from_dict(data[key] if key else data)
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
def merged_dense_state(plan: StagePlan, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fold every PEFT method into the dense weights (the plugin's exact merge) and keep only those."""
    for method in plan.peft:
        method.merge(model)
    names = base_param_names(plan.shape)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def hf_config(shape: ModelShape, dtype: str) -> dict[str, Any]:
    args = model_args(shape)
    rs = args.rope_scaling_args
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
        "max_position_embeddings": shape.max_seq_len,
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope_theta,
        # torchtitan's precompute_freqs_cis always applies llama3 frequency scaling.
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": float(rs.scaling_factor),
            "low_freq_factor": float(rs.low_freq_factor),
            "high_freq_factor": float(rs.high_freq_factor),
            "original_max_position_embeddings": int(rs.original_max_position_embeddings),
        },
        "tie_word_embeddings": shape.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": dtype,
    }


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
    try:  # the same key data.prepare_data uses for its trained BPE
        from steptitan.data import _digest, _source_fingerprint

        key = {"bpe": recipe.model.vocab_size, **_source_fingerprint(d, list(d.files))}
        p = Path(os.path.expanduser(d.cache_dir)) / "tokenizers" / _digest(key) / "tokenizer.json"
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
    (out / "config.json").write_text(json.dumps(hf_config(plan.shape, dtype), indent=1))
    tok = find_tokenizer(recipe)
    if tok is not None:
        for f in tok.parent.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy2(f, out / f.name)
    (out / "steptitan_export.json").write_text(json.dumps({
        "checkpoint": str(info.path.resolve()), "stage": info.stage, "step": info.step,
        "world_size": info.meta.get("world_size"), "merged_peft": [m.registry_name for m in plan.peft],
        "tokenizer": str(tok) if tok else None,
    }, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="steptitan export", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (stageNN-stepNNNNNN) or a run folder (its newest checkpoint)")
    p.add_argument("out", help="output folder for model.safetensors + config.json")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides (with --recipe)")
    p.add_argument("--recipe", help="the recipe TOML, when the run folder has no recipe.json / summary.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    args = p.parse_args(argv)
    if args.overrides and not args.recipe:
        p.error("key=value overrides need --recipe")
    try:
        out = export(args.checkpoint, args.out, args.recipe, args.overrides, args.dtype)
    except (ExportError, RecipeError, FileNotFoundError) as exc:
        print(f"steptitan export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}/model.safetensors and config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
