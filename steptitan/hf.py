"""Hugging Face Llama folders as a starting point: config.json -> the recipe's [model], safetensors -> stage 0.

``model.init_from = "path/to/folder"`` (docs/huggingface.md) names a folder with
``config.json`` and ``*.safetensors`` (one file, or shards with
``model.safetensors.index.json``), as ``save_pretrained`` or ``steptitan export`` write it:

* ``apply_init_from`` (steptitan/hf_config.py, re-exported here; called by ``recipe_from_dict``,
  before any process starts): the shape keys the recipe leaves out of ``[model]`` are taken from
  config.json, the ones it gives must agree with it; the folder's ``tokenizer.json`` becomes
  ``data.tokenizer`` (the token ids must be the ones the embeddings were trained on); the
  safetensors headers are checked against the shape, so a truncated or foreign folder is one
  message, not a crash.
* ``load_hf_weights`` (Trainer, stage 0 only, not on resume): every rank reads just the
  rows of each tensor that its FSDP2 dim-0 shard holds (a memory-mapped slice), converting
  q/k rows from HF's rotate-half RoPE layout to torchtitan's interleaved pairs (the inverse
  of torchtitan's ``Llama3StateDictAdapter.to_hf``, which ``steptitan export`` uses).

RoPE: torchtitan's llama3 always applies Llama 3 frequency scaling; a folder without
scaling (``rope_type = "default"``: Llama 2, TinyLlama, SmolLM ...) maps to factor 1,
which leaves every frequency unchanged. Other RoPE types, biases and other activations
are refused with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from steptitan.hf_config import (  # noqa: F401  (the recipe side, re-exported)
    HF_KEY,
    IGNORED_TENSORS,
    ROPE_DEFAULTS,
    HFError,
    apply_init_from,
    check_tensors,
    expected_tensors,
    model_keys,
    read_config,
    tensor_files,
)

_FROM_HF = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}  # torchtitan's Llama3StateDictAdapter.from_hf_map (0.2.2), without its ignored rotary buffer
_TO_HF = {v: k for k, v in _FROM_HF.items()}


def hf_name(name: str) -> str:
    """The HF name of a steptitan (torchtitan llama3) dense parameter."""
    parts = name.split(".")
    if parts[0] == "layers":
        return _TO_HF[".".join(["layers", "{}", *parts[2:]])].format(parts[1])
    return _TO_HF[name]


# --------------------------------------------------------------------------- weights


def rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """Row r of torchtitan's wq/wk is row ``rotary_rows(...)[r]`` of HF's q_proj/k_proj.

    The inverse of ``Llama3StateDictAdapter._permute``: HF keeps each head's two
    rotary halves apart (rotate-half), torchtitan interleaves them as pairs."""
    hd = rows // heads
    return torch.arange(rows).view(heads, 2, hd // 2).transpose(1, 2).reshape(rows)


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, folder: str | os.PathLike, shape: Any) -> tuple[int, int]:
    """Overwrite the dense weights of a (possibly FSDP2-sharded) stage model with an HF folder's.

    Each rank reads only the rows of its own shard (plus, for wq/wk, the rest of
    the heads those rows fall in). PEFT parameters are left alone. Returns
    (tensors loaded, bytes this rank read)."""
    from safetensors import safe_open

    from steptitan.distributed import global_rows, local_tensor
    from steptitan.model import base_param_names

    folder = Path(os.path.expanduser(str(folder)))
    files = tensor_files(folder)
    base = base_param_names(shape)
    handles: dict[Path, Any] = {}
    n = nbytes = 0
    for name, p in model.named_parameters():  # a tied LM head is listed once, as tok_embeddings.weight
        if name not in base:
            continue
        key = hf_name(name)
        if key not in files:
            raise HFError(f"{folder}: no tensor {key} for {name}")
        if files[key] not in handles:
            handles[files[key]] = safe_open(str(files[key]), "pt", device="cpu")
        piece = handles[files[key]].get_slice(key)
        if tuple(piece.get_shape()) != tuple(p.shape):
            raise HFError(f"{folder}: {key} has shape {piece.get_shape()}, the model's {name} {list(p.shape)}")
        rows = global_rows(p).cpu()
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = shape.n_heads if name.endswith("wq.weight") else shape.n_kv_heads
            rows = rotary_rows(p.shape[0], heads)[rows]
        local = local_tensor(p)
        if rows.numel():
            lo, hi = int(rows.min()), int(rows.max()) + 1
            block = piece[lo:hi]
            local.copy_(block[rows - lo].to(device=local.device, dtype=local.dtype))
            nbytes += block.numel() * block.element_size()
        n += 1
    return n, nbytes
