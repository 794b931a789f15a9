"""Hugging Face Llama folders, the recipe side: config.json -> the recipe's [model], headers checked.

``model.init_from = "path/to/folder"`` (docs/huggingface.md): ``apply_init_from`` (called by
``recipe_from_dict``, before any process starts) takes the shape keys the recipe leaves out of
``[model]`` from config.json and checks the ones it gives; the folder's ``tokenizer.json`` becomes
``data.tokenizer``; the safetensors headers are checked against the shape, so a truncated or
foreign folder is one message, not a crash. The weights are read by steptitan/hf.py, which builds
on this module and on the model; this one needs neither (the recipe imports it; issue 23, item 9).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

# config.json key of each recipe [model] key (for messages)
HF_KEY = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
          "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "ffn_hidden": "intermediate_size",
          "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "tie_embeddings": "tie_word_embeddings",
          "rope_scaling": "rope_scaling"}
ROPE_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some older HF checkpoints stored


class HFError(ValueError):
    """The folder is not a Llama model steptitan can start from; the message says why."""


def read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise HFError(f"{str(folder)!r} is not a folder (expected a Hugging Face model folder with config.json)")
    path = folder / "config.json"
    if not path.is_file():
        raise HFError(f"{str(folder)!r} has no config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise HFError(f"{path}: expected a JSON object")
    return cfg


def model_keys(cfg: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The recipe's [model] values of an HF LlamaConfig dict (transformers 4 or 5 layout)."""
    if cfg.get("model_type", "llama") != "llama":
        raise HFError(f"{where}: model_type {cfg.get('model_type')!r}; only Llama models (model_type \"llama\") can be loaded")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, want) != want:
            raise HFError(f"{where}: {key} = {cfg[key]!r}; torchtitan's llama3 has {key} = {want!r}")
    try:
        dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        out = {"dim": dim, "n_layers": int(cfg["num_hidden_layers"]), "n_heads": heads,
               "n_kv_heads": int(cfg.get("num_key_value_heads") or heads), "vocab_size": int(cfg["vocab_size"]),
               "ffn_hidden": int(cfg["intermediate_size"]), "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
               "tie_embeddings": bool(cfg.get("tie_word_embeddings", False))}
    except KeyError as exc:
        raise HFError(f"{where}: no {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise HFError(f"{where}: {exc}") from None
    if cfg.get("head_dim") not in (None, dim // heads):
        raise HFError(f"{where}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads = {dim // heads}; "
                      f"torchtitan's llama3 derives head_dim from them")
    # transformers 5 writes rope_parameters = {rope_theta, rope_type, ...}; 4.x rope_theta + rope_scaling.
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    scaling = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else params
    out["rope_theta"] = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFError(f"{where}: partial_rotary_factor {scaling['partial_rotary_factor']}; torchtitan rotates every head dim")
    if kind == "default":
        out["rope_scaling"] = {**ROPE_DEFAULTS, "factor": 1.0}  # factor 1: torchtitan's scaling changes nothing
    elif kind == "llama3":
        out["rope_scaling"] = {"factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
                               "high_freq_factor": float(scaling["high_freq_factor"]),
                               "original_max_position_embeddings": int(scaling["original_max_position_embeddings"])}
    else:
        raise HFError(f"{where}: RoPE type {kind!r}; torchtitan's llama3 supports plain RoPE and \"llama3\" scaling only")
    return out


def tensor_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (one file, an index, or every *.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {k: folder / v for k, v in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        hint = f" ({', '.join(other[:3])} found: re-save it with save_pretrained(..., safe_serialization=True))" if other else ""
        raise HFError(f"{str(folder)!r} has no *.safetensors weights{hint}")
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), "pt", device="cpu") as handle:
            out.update(dict.fromkeys(handle.keys(), f))
    return out


def expected_tensors(keys: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for recipe [model] values (after ``model_keys``)."""
    d, f, v = keys["dim"], keys["ffn_hidden"], keys["vocab_size"]
    hd = d // keys["n_heads"]
    q, kv = keys["n_heads"] * hd, keys["n_kv_heads"] * hd
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not keys["tie_embeddings"]:
        out["lm_head.weight"] = (v, d)
    for i in range(keys["n_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                    p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                    p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
                    p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    return out


def check_tensors(folder: Path, keys: dict[str, Any]) -> None:
    """The safetensors headers hold exactly the tensors of ``keys``' shape (headers only: no weights read)."""
    from safetensors import safe_open

    files = tensor_files(folder)
    expected = expected_tensors(keys)
    problems = [f"{name} is missing" for name in expected if name not in files]
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        if not path.is_file():
            problems.append(f"{path.name} (listed in the index) does not exist")
            continue
        with safe_open(str(path), "pt", device="cpu") as handle:
            for name in names:
                got = tuple(handle.get_slice(name).get_shape())
                if got != expected[name]:
                    problems.append(f"{name} has shape {list(got)}, config.json implies {list(expected[name])}")
    tied_head = ["lm_head.weight"] if keys["tie_embeddings"] else []  # some savers store the tied copy too
    extra = sorted(n for n in files if n not in expected and n not in tied_head and not n.endswith(IGNORED_TENSORS))
    if extra:
        problems.append(f"tensors a Llama of this shape does not have: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    if problems:
        raise HFError(f"{str(folder)!r}: " + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))


def _same(key: str, given: Any, hf: Any) -> bool:
    if key == "rope_scaling":
        return isinstance(given, dict) and {**ROPE_DEFAULTS, **given} == hf
    return given == hf


def apply_init_from(data: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """A copy of the recipe dict with [model] completed from ``model.init_from``'s config.json and
    ``data.tokenizer`` set to its folder; disagreements are appended to ``errors``."""
    data = copy.deepcopy(data)
    model = data["model"]
    raw = model["init_from"]
    if not isinstance(raw, str):
        return data  # the schema reports the type
    folder = Path(os.path.expanduser(raw))
    try:
        keys = model_keys(read_config(folder), f"{raw}/config.json")
    except HFError as exc:
        errors.append(f"model.init_from: {exc}")
        return data
    for table, where in ((model, "model"), (_stage0_model(data), "stages.0.model")):
        for key, value in keys.items():
            if key not in table:
                if where == "model":
                    table[key] = value
            elif not _same(key, table[key], value):
                errors.append(f"{where}.{key} = {table[key]!r} but {raw}/config.json has {HF_KEY[key]} = {value!r}; "
                              f"leave {where}.{key} out to take it from there")
    try:
        check_tensors(folder, keys)
    except HFError as exc:
        errors.append(f"model.init_from: {exc}")
    d = data.setdefault("data", {})
    if isinstance(d, dict) and not d.get("tokenizer"):
        if (folder / "tokenizer.json").is_file():
            d["tokenizer"] = raw  # the token ids the embeddings were trained on
        else:
            errors.append(f"model.init_from: {raw!r} has no tokenizer.json; continued pre-training needs the model's "
                          f"own tokenizer: put its tokenizer.json there or set data.tokenizer")
    return data


def _stage0_model(data: dict[str, Any]) -> dict[str, Any]:
    stages = data.get("stages")
    if isinstance(stages, list) and stages and isinstance(stages[0], dict) and isinstance(stages[0].get("model"), dict):
        return stages[0]["model"]
    return {}
