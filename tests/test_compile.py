"""Compiled blocks (training.compile): compiled logits, gradients and losses equal eager ones, through growth.

Every scenario runs twice from the same seeds, eager and with ``training.compile = true``, and compares:

* ``adapted``: stage 0 is dense; stage 1 grows it (interpolate, with an MSG mask whose value changes
  between forwards), puts LoRA with a non-zero B on the old blocks and APEX on the new ones, with
  activation checkpointing. Blocks of four structures share one code object (Block.forward): a graph
  reused by a block it does not fit, or a mask value baked into a graph, would change the logits.
* ``plain``: no activation checkpointing and no PEFT: old and new blocks have the same structure and
  differ only by the mask's forward hooks on the new blocks' wo and w2. dynamo does not guard on
  module hooks by default (``skip_nnmodule_hook_guards``): the graph traced for an old block (no
  hooks) would be reused for a new one and the mask silently dropped.
* ``training``: two stages run by ``Trainer.run`` (growth with a mask, SwitchLoRA switching vectors
  every step on the old blocks, APEX scoring then expanding on the new ones): the per-step losses.

``aot_eager`` (graph capture and guards; the captured graphs run op by op) is checked to float noise in
one spawned process; ``inductor`` (the default backend, generated C++ kernels) is slow-marked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_distributed

pytestmark = pytest.mark.dist

MODEL = {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 97, "ffn_hidden": 40}


def _recipe(out_dir: str, compile_: bool, backend: str, scenario: str) -> dict:
    growth = {"name": "interpolate", "n_new": 2, "position": "upper", "init": "copy", "mask_steps": 4}
    training = {"batch_size": 2, "seq_len": 16, "compile": compile_, "compile_backend": backend, "warmup_steps": 0,
                "eval_batches": 1, "steps_per_log": 1}
    s1: dict = {"name": "s1", "steps": 1, "growth": growth}
    if scenario == "adapted":
        training["activation_checkpointing"] = True
        s1.update(freeze=["old"], peft={"method": "lora", "layers": "old", "rank": 4, "init": "uniform"},
                  extra_peft=[{"method": "apex", "layers": "new", "score_steps": 1, "freeze_rest": False}])
    elif scenario == "training":
        growth["mask_steps"] = 2
        s1.update(steps=4, freeze=["old"],
                  peft={"method": "switchlora", "layers": "old", "rank": 4, "interval0": 1.0, "freeze_steps": 1},
                  extra_peft=[{"method": "apex", "layers": "new", "score_steps": 2, "freeze_rest": False}])
    return {"name": "compile", "output_dir": out_dir, "model": MODEL, "training": training,
            "checkpoint": {"enabled": False}, "stages": [{"name": "s0", "steps": 2}, s1]}


def _logits_and_grads(model, tokens, eval_too: bool) -> dict[str, torch.Tensor]:
    out = {}
    if eval_too:  # inference mode: another graph (no autograd), which must not be mixed up with the training one
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


def _forwards(env, out_dir: str, backend: str, scenario: str, compiled: bool) -> dict:
    """Logits and gradients of stage 0, then of the grown stage 1 at MSG mask values 0, 0.5 and 1."""
    from test_memory import _RandomTokens

    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict
    from steptitan.trainer import Trainer

    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0)).to(env.device)
    recipe = recipe_from_dict(_recipe(f"{out_dir}/{scenario}-{compiled}", compiled, backend, scenario))
    plans = build_plan(recipe)
    trainer = Trainer(recipe, plans, _RandomTokens(97), env)
    small = trainer.build_stage_model(plans[0])
    seen = {"s0": _logits_and_grads(small, tokens, eval_too=True)}
    grown = trainer.build_stage_model(plans[1], grow_from=small, prev=plans[0])
    for value in (0, 2, 4):  # MSG mask 0 (the old function), 0.5, 1
        plans[1].growth.set_step(value)
        seen[f"s1 mask step {value}"] = _logits_and_grads(grown, tokens, eval_too=value == 2)
    trainer.metrics.close()
    return seen


def _training(env, out_dir: str, backend: str, compiled: bool) -> dict:
    """Trainer.run over both stages: (stage, step) -> loss, and SwitchLoRA's switch count."""
    from test_memory import _RandomTokens

    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict
    from steptitan.trainer import Trainer

    recipe = recipe_from_dict(_recipe(f"{out_dir}/training-{compiled}", compiled, backend, "training"))
    plans = build_plan(recipe)
    trainer = Trainer(recipe, plans, _RandomTokens(97), env)
    losses: dict[str, float] = {}
    log_step = trainer.log_step

    def record(plan, step, loss, *args, **kwargs):
        losses[f"s{plan.index} step {step}"] = loss
        return log_step(plan, step, loss, *args, **kwargs)

    trainer.log_step = record
    trainer.run()
    return {"losses": losses, "switches": plans[1].peft[0].switches, "apex scored": plans[1].peft[1].scored}


def _all(env, out_dir: str, backend: str, scenarios: tuple[str, ...]) -> dict:
    out = {}
    for scenario in scenarios:
        for compiled in (False, True):
            if scenario == "training":
                out[scenario, compiled] = _training(env, out_dir, backend, compiled)
            else:
                out[scenario, compiled] = _forwards(env, out_dir, backend, scenario, compiled)
    return out


def _check_forwards(eager: dict, compiled: dict, atol: float) -> None:
    assert eager.keys() == compiled.keys()
    for stage in eager:
        assert eager[stage].keys() == compiled[stage].keys(), stage
        assert any(k.startswith("grad layers.2") for k in eager[stage]) or stage == "s0"  # new blocks train
        for key, want in eager[stage].items():
            scale = max(1.0, want.abs().max().item())
            torch.testing.assert_close(compiled[stage][key], want, rtol=0, atol=atol * scale,
                                       msg=lambda m, s=stage, k=key: f"{s} {k}: {m}")
    # the mask matters: a graph that ignored it would be caught
    assert not torch.allclose(eager["s1 mask step 0"]["train"], eager["s1 mask step 4"]["train"])


def _check_training(eager: dict, compiled: dict, rtol: float) -> None:
    assert eager["switches"] > 0 and eager["apex scored"]  # SwitchLoRA switched, APEX selected and expanded
    assert compiled["switches"] == eager["switches"] and compiled["apex scored"]
    assert len(eager["losses"]) == 6 and eager["losses"].keys() == compiled["losses"].keys()
    for key, want in eager["losses"].items():
        assert compiled["losses"][key] == pytest.approx(want, rel=rtol, abs=0), key


SCENARIOS = ("adapted", "plain", "training")


@pytest.fixture(scope="module")
def aot_eager(tmp_path_factory):
    (results,) = run_distributed(_all, 1, out_dir=str(tmp_path_factory.mktemp("compile")), backend="aot_eager",
                                 scenarios=SCENARIOS)
    return results


def test_compiled_adapted_blocks_match_eager_through_growth_aot_eager(aot_eager):
    """LoRA (old blocks), APEX and the MSG mask (new blocks), activation checkpointing: float noise only."""
    _check_forwards(aot_eager["adapted", False], aot_eager["adapted", True], atol=1e-6)


def test_compiled_plain_blocks_keep_the_growth_mask_aot_eager(aot_eager):
    """Same-structure old and new blocks, no activation checkpointing: the new blocks' mask hooks are kept."""
    _check_forwards(aot_eager["plain", False], aot_eager["plain", True], atol=1e-6)


def test_compiled_training_matches_eager_with_switchlora_and_apex_aot_eager(aot_eager):
    """Trainer.run through growth: SwitchLoRA switching, APEX scoring and expansion, the mask ramp."""
    _check_training(aot_eager["training", False], aot_eager["training", True], rtol=1e-5)


@pytest.mark.slow
def test_compiled_blocks_match_eager_through_growth_inductor(tmp_path):
    """The default backend: inductor's generated kernels fuse and reorder float operations."""
    (results,) = run_distributed(_all, 1, out_dir=str(tmp_path), backend="inductor", scenarios=SCENARIOS)
    for scenario in ("adapted", "plain"):
        _check_forwards(results[scenario, False], results[scenario, True], atol=2e-5)
    _check_training(results["training", False], results["training", True], rtol=1e-4)
