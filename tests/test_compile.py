"""Compiled blocks (training.compile): compiled logits and gradients equal eager ones before and after growth.

Two trainers build the same stages from the same seeds, one with ``training.compile = true``. Stage 0
is dense; stage 1 grows it (interpolate, with an MSG mask whose value changes between forwards), puts
LoRA with a non-zero B on the old blocks and APEX on the new ones, with activation checkpointing. So
the compiled run holds blocks of four structures sharing one code object (Block.forward): a graph
reused by a block it does not fit, or a mask value baked into a graph, would change the logits.
``aot_eager`` checks graph capture and guards quickly; ``inductor`` (the default backend, generated
C++ kernels) is slow-marked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_distributed

pytestmark = pytest.mark.dist


def _recipe(out_dir: str, compile_: bool, backend: str) -> dict:
    return {
        "name": "compile", "output_dir": out_dir,
        "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 97, "ffn_hidden": 40},
        "training": {"batch_size": 2, "seq_len": 16, "activation_checkpointing": True, "compile": compile_,
                     "compile_backend": backend, "warmup_steps": 0},
        "checkpoint": {"enabled": False},
        "stages": [{"name": "s0", "steps": 1},
                   {"name": "s1", "steps": 1, "freeze": ["old"],
                    "growth": {"name": "interpolate", "n_new": 2, "position": "upper", "init": "copy", "mask_steps": 4},
                    "peft": {"method": "lora", "layers": "old", "rank": 4, "init": "uniform"},
                    "extra_peft": [{"method": "apex", "layers": "new", "score_steps": 1, "freeze_rest": False}]}],
    }


def _logits_and_grads(model, tokens):
    out = {}
    model.eval()
    with torch.no_grad():
        out["eval"] = model(tokens).detach().clone()
    model.train()
    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten()).backward()
    out["train"] = logits.detach().clone()
    for name, p in model.named_parameters():
        if p.grad is not None:
            out[f"grad {name}"] = p.grad.full_tensor().clone() if hasattr(p.grad, "full_tensor") else p.grad.clone()
            p.grad = None
    return out


def _stages(env, out_dir: str, backend: str):
    from test_memory import _RandomTokens

    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict
    from steptitan.trainer import Trainer

    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0)).to(env.device)
    results = {}
    for compiled in (False, True):
        recipe = recipe_from_dict(_recipe(f"{out_dir}/{compiled}", compiled, backend))
        plans = build_plan(recipe)
        trainer = Trainer(recipe, plans, _RandomTokens(97), env)
        small = trainer.build_stage_model(plans[0])
        seen = {"s0": _logits_and_grads(small, tokens)}
        grown = trainer.build_stage_model(plans[1], grow_from=small, prev=plans[0])
        for value in (0, 2, 4):  # MSG mask 0 (the old function), 0.5, 1
            plans[1].growth.set_step(value)
            seen[f"s1 mask step {value}"] = _logits_and_grads(grown, tokens)
        results[compiled] = seen
        trainer.metrics.close()
    return results


def _check(results, atol: float):
    eager, compiled = results[False], results[True]
    assert eager.keys() == compiled.keys()
    for stage in eager:
        assert eager[stage].keys() == compiled[stage].keys(), stage
        assert any(k.startswith("grad layers.2") for k in eager[stage]) or stage == "s0"  # new blocks train
        for key, want in eager[stage].items():
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(compiled[stage][key], want, rtol=0, atol=atol * scale,
                                       msg=lambda m, s=stage, k=key: f"{s} {k}: {m}")
    # the mask and the adapters matter: a graph that ignored either would be caught
    assert not torch.allclose(eager["s1 mask step 0"]["eval"], eager["s1 mask step 4"]["eval"])


def test_compiled_blocks_match_eager_before_and_after_growth_aot_eager(tmp_path):
    """Graph capture and guards (aot_eager runs the captured graphs op by op): exact up to float noise."""
    (results,) = run_distributed(_stages, 1, out_dir=str(tmp_path), backend="aot_eager")
    _check(results, atol=1e-6)


@pytest.mark.slow
def test_compiled_blocks_match_eager_before_and_after_growth_inductor(tmp_path):
    """The default backend: inductor's generated kernels fuse and reorder float operations."""
    (results,) = run_distributed(_stages, 1, out_dir=str(tmp_path), backend="inductor")
    _check(results, atol=2e-5)
