"""tools/export_hf.py: steptitan checkpoints -> Hugging Face Llama folders, checked against transformers.

* property test: random shapes (GQA, tied embeddings, rope_theta, norm eps), random weights and
  LoRA adapters, a stage-1 checkpoint written in-process; the exported folder loaded with
  ``LlamaForCausalLM`` gives the steptitan model's logits (float32, tight tolerance);
* end to end: a real 2-rank STEP run; its exported stage-1 model matches the unmerged
  steptitan model on random tokens AND reproduces the validation loss the 2-rank trainer
  logged; the same run's TensorBoard events are read back per stage.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_torchrun, wikitext_overrides

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from steptitan import export as export_hf  # noqa: E402  (tools/export_hf.py is a wrapper over it)
from steptitan import export_cli  # noqa: E402  (the command line of steptitan export / tools/export_hf.py)


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def load_warnings(folder: Path) -> list[str]:
    """The warnings transformers logs while loading ``folder`` (its library logger does not propagate,
    so a handler goes on it directly)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def assert_logits_equal(hf: torch.Tensor, ref: torch.Tensor) -> None:
    # float32 through two implementations (complex vs rotate-half RoPE, merged vs unmerged LoRA):
    # differences are rounding, ~1e-6 of the logit scale.
    scale = max(1.0, ref.abs().max().item())
    err = (hf - ref).abs().max().item()
    assert err <= 2e-5 * scale, f"max |hf - steptitan| = {err:.3g} (logit scale {scale:.3g})"


class _NoState:
    def state_dict(self):
        return {}


@st.composite
def shapes(draw):
    n_kv = draw(st.sampled_from([1, 2, 4]))
    n_heads = n_kv * draw(st.sampled_from([1, 2]))
    return {
        "dim": n_heads * draw(st.sampled_from([4, 8, 16])), "n_layers": draw(st.integers(1, 3)), "n_heads": n_heads,
        "n_kv_heads": n_kv, "vocab_size": draw(st.integers(16, 300)), "ffn_hidden": draw(st.integers(4, 64)),
        "rope_theta": draw(st.sampled_from([100.0, 10000.0, 500000.0])), "norm_eps": draw(st.sampled_from([1e-5, 1e-6])),
        "tie_embeddings": draw(st.booleans()),
    }


@settings(max_examples=12)
@given(shape=shapes(), rank=st.integers(1, 4), n_new=st.integers(0, 2), seed=st.integers(0, 2**16), seq=st.integers(1, 24))
def test_export_matches_steptitan_logits_for_random_shapes(tmp_path_factory, shape, rank, n_new, seed, seq):
    from steptitan.checkpoint import Checkpointer
    from steptitan.model import init_model_weights
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict, to_dict

    n_new = min(n_new, shape["n_layers"]) or 0
    run = tmp_path_factory.mktemp("run")
    recipe = recipe_from_dict({
        "model": shape, "training": {"seq_len": 32}, "output_dir": str(run),
        "stages": [{"steps": 1}, {"steps": 1, "growth": {"name": "interpolate", "n_new": n_new, "position": "upper"},
                                  "peft": {"method": "lora", "layers": "old", "rank": rank, "alpha": 2.0 * rank},
                                  "freeze": ["old"]}],
    })
    plan = build_plan(recipe)[1]
    model = plan.build()
    model.to_empty(device="cpu")
    if shape["tie_embeddings"]:  # to_empty gives each name its own tensor
        model.output.weight = model.tok_embeddings.weight
    torch.manual_seed(seed)
    with torch.no_grad():
        init_model_weights(model)
        for name, p in model.named_parameters():  # adapters and norms away from their neutral init
            if "lora_" in name:
                p.normal_(0, 0.3)
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    Checkpointer(run / "checkpoints", 0, 1).save(1, 1, model, _NoState(), _NoState(), {"samples_seen": 0}, {})
    (run / "recipe.json").write_text(json.dumps(to_dict(recipe)))

    out = export_hf.export(run, run / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == plan.shape.n_layers and config["rope_theta"] == shape["rope_theta"]
    assert config["tie_word_embeddings"] == shape["tie_embeddings"]
    # transformers warns unless max_position_embeddings > original_max_position_embeddings (llama3 RoPE)
    assert config["max_position_embeddings"] > config["rope_scaling"]["original_max_position_embeddings"]
    assert (out / "generation_config.json").is_file()
    mask = os.umask(0)
    os.umask(mask)
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o666 & ~mask}  # not safetensors' 0600

    tokens = torch.randint(0, shape["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        ref = model(tokens)  # steptitan's model, LoRA not merged
    assert_logits_equal(hf_logits(out, tokens), ref)


# --------------------------------------------------------------------------- a real 2-rank run


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    overrides = wikitext_overrides(cache_dir) + [
        f"output_dir={run_dir}", "model.dim=64", "model.n_kv_heads=2", "training.seq_len=32", "training.batch_size=4",
        "training.steps_per_log=2", "training.warmup_steps=2", "training.eval_batches=3",
        "stages.0.steps=6", "stages.1.steps=6",
    ]
    result = run_torchrun(["recipes/step.toml", *overrides], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.dist
def test_export_of_a_two_rank_stage1_checkpoint(two_rank_run, tmp_path):
    from steptitan.data import BlockSampler, prepare_data

    out = tmp_path / "hf"
    assert export_cli.main([str(two_rank_run), str(out)]) == 0
    meta = json.loads((out / "steptitan_export.json").read_text())
    assert meta["stage"] == 1 and meta["world_size"] == 2 and meta["merged_peft"] == ["lora"]
    assert (out / "tokenizer.json").is_file()
    # bos/eos: the run's end-of-document token (its BPE has no bos, so bos = eos); pad = eos; no RoPE warning
    from tokenizers import Tokenizer

    eos = Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|endoftext|>")
    config, gen = (json.loads((out / f).read_text()) for f in ("config.json", "generation_config.json"))
    assert eos is not None and (config["bos_token_id"], config["eos_token_id"]) == (eos, eos)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (eos, eos, eos)
    assert config["rope_scaling"]["rope_type"] == "llama3"  # recipes/step.toml keeps torchtitan's llama3 RoPE scaling
    assert not [w for w in load_warnings(out) if "rope" in w.lower() or "max_position" in w], load_warnings(out)

    info = export_hf.find_checkpoint(two_rank_run)
    recipe = export_hf.recipe_for(info)
    plan, model = export_hf.load_stage_model(recipe, info)  # unmerged: LoRA B is non-zero after training
    assert max(p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n) > 0
    model.eval()
    tokens = torch.randint(0, plan.shape.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
    assert_logits_equal(hf_logits(out, tokens), ref)

    # The exported model reproduces the validation loss the 2-rank sharded trainer logged at the
    # end of stage 1 (same blocks: the first eval_batches x batch_size of the val split, whatever the world size).
    data = prepare_data(recipe.data, recipe.model.vocab_size)
    val = BlockSampler(data.tokens("val"), recipe.training.seq_len, recipe.training.seed, shuffle=False)
    n = min(recipe.training.eval_batches * recipe.training.batch_size, val.n_blocks)
    blocks = torch.stack([torch.from_numpy(val.block(g % val.n_blocks).astype("int64")) for g in range(n)])
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(blocks[:, :-1]).logits
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten(), reduction="none")
    hf_val_loss = losses.view(n, -1).mean(dim=1).mean().item()
    summary = json.loads((two_rank_run / "summary.json").read_text())
    assert hf_val_loss == pytest.approx(summary["stages"][1]["val_loss"], rel=1e-5)

    # An earlier stage exports too (stage 0: no adapters, 2 layers).
    out0 = tmp_path / "hf0"
    stage0 = two_rank_run / "checkpoints" / "stage00-step000006"
    assert export_cli.main([str(stage0), str(out0)]) == 0
    assert json.loads((out0 / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.dist
def test_tensorboard_scalars_exist_per_stage(two_rank_run):
    """Read the event files back: every stage has its losses, LR, memory per rank and a validation point."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for events in (two_rank_run / "tb").glob("events.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    stage_of = scalars["stage"]  # global step -> stage index
    assert set(stage_of.values()) == {0.0, 1.0}
    for stage in (0, 1):
        steps = {s for s, v in stage_of.items() if v == stage}
        for tag in ("loss", "lr", "grad_norm", "tokens_per_s", "memory/rank0/model_states", "memory/rank1/model_states",
                    "memory/rank0/params_trainable", "memory/rank1/optimizer", "memory/rank0/peak_rss"):
            values = [scalars[tag][s] for s in steps if s in scalars[tag]]
            assert values and all(math.isfinite(v) for v in values), (stage, tag)
        assert all(scalars["memory/rank0/model_states"][s] > 0 for s in steps)
    # Stage 1 freezes the old layers: frozen bytes appear in stage 1 only.
    frozen = scalars["memory/rank0/params_frozen"]
    assert all(frozen.get(s, 0) == 0 for s, v in stage_of.items() if v == 0)
    assert all(frozen[s] > 0 for s, v in stage_of.items() if v == 1 and s in frozen)
    # One validation point per stage end (eval_interval = 0), at the stages' last global steps.
    last_steps = sorted(max(s for s, v in stage_of.items() if v == stage) for stage in (0, 1))
    assert sorted(scalars["val/loss"]) == last_steps and sorted(scalars["val/ppl"]) == last_steps
    summary = json.loads((two_rank_run / "summary.json").read_text())
    assert [scalars["val/loss"][s] for s in last_steps] == pytest.approx([s["val_loss"] for s in summary["stages"]], rel=1e-6)
