"""The PEFT-plugin contract (steptitan/peft.py, docs/peft.md "A PEFT plugin must / may").

Throwaway plugins are registered for one test and removed again:

* a method whose ``apply`` adds parameters but keeps the inherited no-op ``merge`` is refused
  by ``build_plan`` (a RecipeError naming the method and the stage), one that overrides
  ``merge`` is accepted, and a method without ``Options`` gets the empty default;
* every hook the core calls is declared on the base class with its default (the ``--dry-run``
  ``label``, which lora_embed overrides);
* through the real ``Trainer`` (one gloo rank, FSDP2): the optimizer-step hooks run around
  every step that is taken and neither runs on a step skipped for a non-finite loss
  (STEPTITAN_INJECT_NAN); ``lr_factor`` gets the same 1-based step as ``ctx.step``; and every
  weight-touching hook sees a resharded model (every parameter a DTensor shard).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_distributed
from steptitan.peft import PeftMethod, StepContext
from steptitan.registry import PEFT

SHAPE = {"dim": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 64, "ffn_hidden": 48}


class AddsScaleNoMerge(PeftMethod):
    """Adds one trainable scalar per adapted block and forgets ``merge``."""

    description = "test plugin: adds parameters, no merge"

    def apply(self, model: nn.Module) -> None:
        for j in self.layers:
            model.layers[str(j)].register_parameter("test_scale", nn.Parameter(torch.ones((), device="meta")))


class AddsScaleWithMerge(AddsScaleNoMerge):
    description = "test plugin: adds parameters, merges them"

    def merge(self, model: nn.Module) -> None:
        pass  # the test only checks that the plan accepts a method that overrides merge


class NoParameters(PeftMethod):
    """No Options, no parameters, no merge: everything inherited."""

    description = "test plugin: adds nothing"


@pytest.fixture
def register():
    names = []

    def add(name: str, cls: type) -> None:
        PEFT.register(name)(cls)
        names.append(name)

    yield add
    for name in names:
        PEFT._plugins.pop(name, None)


def _recipe(method: str, **extra) -> dict:
    return {"name": "contract", "output_dir": "/tmp/unused", "model": dict(SHAPE),
            "training": {"batch_size": 2, "seq_len": 8, "warmup_steps": 0},
            "checkpoint": {"enabled": False},
            "stages": [{"name": "s0", "steps": 2, "peft": {"method": method, "layers": "all", **extra}}]}


def test_the_dry_run_label_is_a_hook_declared_on_the_base_class():
    """Issue 13: every hook the core calls is declared on PeftMethod with its default, none looked up by
    name; the --dry-run label defaults to the number of adapted layers, and lora_embed overrides it."""
    from steptitan.peft import overrides
    from steptitan.plan import peft_text

    assert NoParameters(layers=[0, 2]).label() == "2L"
    lora_embed = PEFT.get("lora_embed")
    method = lora_embed(lora_embed.Options(), [])
    assert overrides(method, "label") and method.label() == "emb+head"
    assert peft_text(method).startswith("lora_embed[emb+head] ")


def test_a_method_that_adds_parameters_must_override_merge(register):
    from steptitan.plan import build_plan
    from steptitan.recipe import RecipeError, recipe_from_dict

    register("test_no_merge", AddsScaleNoMerge)
    register("test_with_merge", AddsScaleWithMerge)
    register("test_no_params", NoParameters)
    with pytest.raises(RecipeError) as exc:
        build_plan(recipe_from_dict(_recipe("test_no_merge")))
    msg = str(exc.value)
    assert "stages.0.peft" in msg and "'test_no_merge'" in msg and "merge" in msg and "layers.0.test_scale" in msg
    (plan,) = build_plan(recipe_from_dict(_recipe("test_with_merge")))
    (bare,) = build_plan(recipe_from_dict(_recipe("test_no_params")))  # no parameters: no merge needed
    assert plan.trainable_params == bare.trainable_params + SHAPE["n_layers"]  # one scalar per block
    assert dataclasses.fields(bare.peft[0].options) == ()  # the default Options: an empty dataclass
    from steptitan.cli import list_plugins

    assert "  test_no_params " in list_plugins()  # listed too (issue 11: an AttributeError without Options)


# --------------------------------------------------------------------------- through the trainer


class CountingHooks(PeftMethod):
    """Records every hook call, the step lr_factor last served, and whether the model was sharded."""

    description = "test plugin: counts hook calls"
    log: list[tuple] = []

    @staticmethod
    def sharded(model: nn.Module) -> bool:
        from torch.distributed.tensor import DTensor

        return all(isinstance(p, DTensor) for p in model.parameters())

    def init_weights(self, model: nn.Module) -> None:
        self.log.append(("init_weights", None, self.sharded(model)))

    def lr_factor(self, step: int) -> float:
        self.log.append(("lr_factor", step, None))
        return 1.0

    def before_optimizer_step(self, ctx: StepContext) -> None:
        self.log.append(("before", ctx.step, self.sharded(ctx.model)))

    def after_optimizer_step(self, ctx: StepContext) -> None:
        self.log.append(("after", ctx.step, self.sharded(ctx.model)))

    def merge(self, model: nn.Module) -> None:
        self.log.append(("merge", None, self.sharded(model)))


class _RandomTokens:
    def __init__(self, vocab: int):
        rng = np.random.default_rng(0)
        self._tokens = {s: rng.integers(0, vocab, size=5_000).astype(np.uint16) for s in ("train", "val")}

    def tokens(self, split: str) -> np.ndarray:
        return self._tokens[split]


def _train_with_counting_hooks(env, out_dir: str) -> list[tuple]:
    from pathlib import Path

    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict
    from steptitan.trainer import Trainer

    os.environ["STEPTITAN_INJECT_NAN"] = "0:2"  # stage 0, step 2: a non-finite loss, skipped
    PEFT.register("test_counting_hooks")(CountingHooks)
    recipe = recipe_from_dict({
        "name": "hooks", "output_dir": out_dir, "model": dict(SHAPE),
        "training": {"batch_size": 2, "seq_len": 8, "warmup_steps": 0, "skip_nonfinite": 1, "eval_batches": 1},
        "checkpoint": {"enabled": False},
        "stages": [{"name": "s0", "steps": 4, "peft": {"method": "test_counting_hooks", "layers": "all"}},
                   {"name": "s1", "steps": 1}],  # no growth: s0's methods are merged into the carried model
    })
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(recipe, build_plan(recipe), _RandomTokens(SHAPE["vocab_size"]), env)
    trainer.run()
    assert trainer.skipped_steps == 1
    return list(CountingHooks.log)


@pytest.mark.dist
def test_optimizer_step_hooks_skip_nonfinite_steps_and_lr_factor_is_one_based(tmp_path):
    (log,) = run_distributed(_train_with_counting_hooks, 1, out_dir=str(tmp_path / "run"))
    calls = [(name, step) for name, step, _ in log if name != "lr_factor"]
    assert calls == [("init_weights", None), ("before", 1), ("after", 1), ("before", 3), ("after", 3),
                     ("before", 4), ("after", 4), ("merge", None)]
    # every weight-touching hook saw this rank's shards (the trainer resharded; merge follows an eval forward)
    assert all(sharded for name, _, sharded in log if name != "lr_factor")
    # lr_factor(k) is computed for optimizer step k: the last call before each step's hooks names that step
    last_factor = None
    for name, step, _ in log:
        if name == "lr_factor":
            last_factor = step
        elif name == "before":
            assert last_factor == step
    assert [step for name, step, _ in log if name == "lr_factor"] == [1, 2, 3, 4, 5]
