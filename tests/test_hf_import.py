"""model.init_from: start stage 0 from a Hugging Face Llama folder (steptitan/hf.py), checked against transformers.

* in process: tiny ``LlamaForCausalLM`` folders written by transformers' own ``save_pretrained``
  (plain RoPE and Llama 3 scaling, GQA, tied and untied heads) load into steptitan's model with
  transformers' logits; a steptitan export reads back as the model it was exported from
  (export -> import -> same logits);
* the recipe: shape keys come from config.json, disagreeing ones are one RecipeError each, the
  folder's tokenizer becomes data.tokenizer, broken folders are refused before any process starts;
* 2 real gloo ranks: each rank reads its FSDP2 shard rows; the gathered weights equal a 1-process load;
* end to end through torchrun and ``steptitan export``: HF folder -> 2-rank STEP run (stage 0 at
  lr 1e-30, so the weights stay bit-identical) -> export -> transformers gives the first folder's logits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_distributed, run_torchrun, wikitext_overrides



def tf():
    """transformers, imported on use: the spawned gloo workers import this module and need not pay for it."""
    return pytest.importorskip("transformers")


def save_hf_llama(folder: Path, seed: int = 0, vocab: int = 384, tie: bool = False, rope: dict | None = None,
                  kv_heads: int = 2, tokenizer: bool = True) -> torch.nn.Module:
    """A random tiny LlamaForCausalLM saved by transformers (+ a BPE tokenizer.json); returns the model."""
    transformers = tf()
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, rms_norm_eps=1e-6, tie_word_embeddings=tie, max_position_embeddings=64,
        rope_theta=500000.0 if rope else 10000.0, rope_scaling=rope)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms away from 1, so a swapped norm would show
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    model.save_pretrained(str(folder))
    if tokenizer:
        write_tokenizer(folder, vocab)
    return model


def write_tokenizer(folder: Path, vocab: int) -> None:
    from steptitan.data import stdlib_docstrings, train_bpe

    train_bpe(stdlib_docstrings()[:200], vocab, folder)


def hf_logits(model_or_folder, tokens: torch.Tensor) -> torch.Tensor:
    model = model_or_folder
    if not isinstance(model, torch.nn.Module):
        model = tf().LlamaForCausalLM.from_pretrained(str(model_or_folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def load_stage0(folder: Path, **model_keys):
    """Recipe with model.init_from -> stage-0 plan -> CPU model with the HF weights (one process)."""
    from steptitan.hf import load_hf_weights
    from steptitan.model import init_model_weights
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"init_from": str(folder), **model_keys}, "training": {"seq_len": 32},
                               "stages": [{"steps": 1}]})
    plan = build_plan(recipe)[0]
    model = plan.build()
    model.to_empty(device="cpu")
    if plan.shape.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    init_model_weights(model, plan.shape, seed=1)
    n, _ = load_hf_weights(model, folder, plan.shape)
    return recipe, plan, model.eval(), n


def assert_close(got: torch.Tensor, ref: torch.Tensor, rel: float = 2e-5) -> None:
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= rel * scale, f"max |diff| = {err:.3g} (logit scale {scale:.3g})"


@pytest.mark.parametrize("case", [
    {"tie": False, "rope": None, "kv_heads": 2},  # Llama 2 style: plain RoPE, GQA
    {"tie": True, "rope": None, "kv_heads": 4},
    {"tie": False, "kv_heads": 1, "rope": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
])
def test_a_transformers_folder_loads_with_transformers_logits(tmp_path, case):
    ref_model = save_hf_llama(tmp_path / "hf", seed=3, **case)
    recipe, plan, model, n = load_stage0(tmp_path / "hf")
    assert (plan.shape.dim, plan.shape.n_layers, plan.shape.n_kv_heads, plan.shape.ffn_hidden) == (32, 2, case["kv_heads"], 72)
    assert plan.shape.tie_embeddings == case["tie"] and recipe.model.norm_eps == 1e-6
    assert n == 2 * 9 + 2 + (0 if case["tie"] else 1)
    assert recipe.data.tokenizer == str(tmp_path / "hf")  # the folder's tokenizer, not a trained BPE
    tokens = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(tokens)
    assert_close(got, hf_logits(ref_model, tokens))


def test_export_then_import_gives_the_exported_model(tmp_path):
    """A steptitan model (random weights, LoRA merged by the export) -> export -> model.init_from -> same logits."""
    from steptitan import export as export_hf
    from steptitan.checkpoint import Checkpointer
    from steptitan.model import init_model_weights
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict, to_dict

    run = tmp_path / "run"
    recipe = recipe_from_dict({
        "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300, "ffn_hidden": 40,
                  "rope_theta": 50000.0}, "training": {"seq_len": 32}, "output_dir": str(run),
        "stages": [{"steps": 1}, {"steps": 1, "growth": {"name": "interpolate", "position": "upper"},
                                  "peft": {"method": "lora", "layers": "old", "rank": 2}, "freeze": ["old"]}]})
    plan = build_plan(recipe)[1]
    model = plan.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        init_model_weights(model, seed=5)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)

    class NoState:
        def state_dict(self):
            return {}

    Checkpointer(run / "checkpoints", 0, 1).save(1, 1, model, NoState(), NoState(), {"samples_seen": 0}, {})
    (run / "recipe.json").write_text(json.dumps(to_dict(recipe)))
    out = export_hf.export(run, tmp_path / "hf")
    write_tokenizer(out, 300)
    _, plan2, back, _ = load_stage0(out)
    assert plan2.shape == plan.shape.replace(max_seq_len=32)
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(back(tokens), model.eval()(tokens))


def test_recipe_takes_the_shape_from_config_json_and_names_every_disagreement(tmp_path):
    from steptitan.recipe import RecipeError, recipe_from_dict

    save_hf_llama(tmp_path / "hf", kv_heads=2)
    base = {"training": {"seq_len": 32}, "stages": [{"steps": 1}]}
    ok = recipe_from_dict({**base, "model": {"init_from": str(tmp_path / "hf"), "dim": 32, "n_layers": 2}})
    assert ok.model.ffn_hidden == 72 and ok.model.rope_scaling.factor == 1.0  # plain RoPE = factor 1
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({**base, "model": {"init_from": str(tmp_path / "hf"), "dim": 64, "n_kv_heads": 4},
                          "stages": [{"steps": 1, "model": {"n_layers": 3}}]})
    text = str(err.value)
    assert "model.dim = 64 but" in text and "hidden_size = 32" in text
    assert "model.n_kv_heads = 4" in text and "num_key_value_heads = 2" in text
    assert "stages.0.model.n_layers = 3" in text and "num_hidden_layers = 2" in text

    # a folder without its tokenizer, a missing folder, a foreign architecture, a truncated weights file
    save_hf_llama(tmp_path / "notok", tokenizer=False)
    with pytest.raises(RecipeError, match="has no tokenizer.json"):
        recipe_from_dict({**base, "model": {"init_from": str(tmp_path / "notok")}})
    assert recipe_from_dict({**base, "model": {"init_from": str(tmp_path / "notok")},
                             "data": {"tokenizer": str(tmp_path / "hf")}}).data.tokenizer == str(tmp_path / "hf")
    with pytest.raises(RecipeError, match="is not a folder"):
        recipe_from_dict({**base, "model": {"init_from": str(tmp_path / "nothing")}})
    shutil.copytree(tmp_path / "hf", tmp_path / "yarn")
    cfg = json.loads((tmp_path / "yarn" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    cfg.pop("rope_scaling", None)
    (tmp_path / "yarn" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RecipeError, match="RoPE type 'yarn'"):
        recipe_from_dict({**base, "model": {"init_from": str(tmp_path / "yarn")}})
    from safetensors.torch import load_file, save_file

    shutil.copytree(tmp_path / "hf", tmp_path / "cut")
    tensors = load_file(str(tmp_path / "cut" / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:16]
    save_file(tensors, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({**base, "model": {"init_from": str(tmp_path / "cut")}})
    assert "model.layers.1.mlp.up_proj.weight is missing" in str(err.value)
    assert "q_proj.weight has shape [16, 32], config.json implies [32, 32]" in str(err.value)


def _sharded_load(env, folder: str):
    from steptitan.distributed import full_tensor, shard_model
    from steptitan.hf import load_hf_weights
    from steptitan.model import init_model_weights
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"init_from": folder}, "training": {"seq_len": 32}, "stages": [{"steps": 1}]})
    plan = build_plan(recipe)[0]
    model = plan.build()
    shard_model(model, env.mesh)
    model.to_empty(device="cpu")
    init_model_weights(model, plan.shape, seed=0)
    n, nbytes = load_hf_weights(model, folder, plan.shape)
    return n, nbytes, {k: full_tensor(p.detach()).clone() for k, p in model.named_parameters()}


@pytest.mark.dist
def test_two_ranks_each_read_their_rows_and_get_the_full_model(tmp_path):
    save_hf_llama(tmp_path / "hf", kv_heads=2)
    _, _, single, _ = load_stage0(tmp_path / "hf")
    (n0, b0, full0), (n1, b1, full1) = run_distributed(_sharded_load, 2, folder=str(tmp_path / "hf"))
    assert n0 == n1 == len(dict(single.named_parameters()))
    total = sum(p.numel() * 4 for p in single.parameters())
    assert b0 < 0.75 * total and b1 < 0.75 * total  # each rank read about half (whole heads for wq/wk)
    for name, p in single.named_parameters():
        assert torch.equal(full0[name], p.detach()) and torch.equal(full1[name], p.detach()), name


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow  # ~35 s on an idle 2-core machine (two torchrun ranks, a fresh tokenization, transformers)
@pytest.mark.dist
def test_hf_folder_through_a_two_rank_run_and_export_back(tmp_path, cache_dir):
    """HF folder -> torchrun (2 ranks, stage 0 from the folder, then STEP growth) -> steptitan export ->
    transformers: the stage-0 export has the folder's logits, bos/eos ids, a generation config, files
    0644 and loads without a RoPE warning; the run tokenized with the folder's tokenizer."""
    hf_dir = tmp_path / "hf"
    ref = save_hf_llama(hf_dir, seed=11, kv_heads=2)
    run_dir = tmp_path / "run"
    (tmp_path / "cpt.toml").write_text(f"""
[model]
init_from = "{hf_dir}"   # every shape key from its config.json, data.tokenizer = its tokenizer.json
[training]
seq_len = 32
batch_size = 2
eval_batches = 1
warmup_steps = 0
lr = 1e-30   # stage 0's weights stay bit-identical: its checkpoint must be the folder's model
[[stages]]
steps = 1
[[stages]]
steps = 1
growth = {{ name = "interpolate", position = "upper" }}
peft = {{ method = "lora", layers = "old", rank = 4 }}
freeze = ["old"]
""")
    overrides = wikitext_overrides(cache_dir) + [f"output_dir={run_dir}", "data.max_chars=60000"]
    result = run_torchrun([str(tmp_path / "cpt.toml"), *overrides], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"stage 0 starts from {hf_dir}" in result.stderr
    recipe = json.loads((run_dir / "recipe.json").read_text())
    assert recipe["data"]["tokenizer"] == str(hf_dir) and recipe["model"]["dim"] == 32  # taken from the folder

    out = tmp_path / "export"
    stage0 = next((run_dir / "checkpoints").glob("stage00-*"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "steptitan", "export", str(stage0), str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mask = os.umask(0)
    os.umask(mask)
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f  # 0644 under the usual umask, not 0600
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    from tokenizers import Tokenizer

    assert eos == Tokenizer.from_file(str(hf_dir / "tokenizer.json")).token_to_id("<|endoftext|>")
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == eos and config["bos_token_id"] == eos and config["rope_scaling"] is None
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()

    check = ("import logging, sys, transformers, torch\n"
             "transformers.logging.set_verbosity_warning()\n"
             f"m = transformers.LlamaForCausalLM.from_pretrained({str(out)!r})\n"
             "print('loaded', m.generation_config.eos_token_id)\n")
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert loaded.returncode == 0 and f"loaded {eos}" in loaded.stdout, loaded.stderr[-2000:]
    assert "max_position" not in loaded.stderr and "rope" not in loaded.stderr.lower(), loaded.stderr
    tokens = torch.randint(0, 384, (3, 32), generator=torch.Generator().manual_seed(2))
    assert_close(hf_logits(out, tokens), hf_logits(ref, tokens), rel=1e-6)
