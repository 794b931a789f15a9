"""Optimizer plugins (registry/optim/, docs/optimizers.md): registry, memory model, growth policy, resume.

* the memory model's optimizer bytes == ``metrics.memory_breakdown`` of the live FSDP2 shards
  for every optimizer plugin, through the trainer's own build/step code, at 1 and 2 gloo ranks;
* a 2-rank run of a stage mixing AdamW (blocks) and Adam-mini (embeddings, head) resumed from a
  mid-stage checkpoint reproduces the uninterrupted run's losses bit for bit;
* each plugin's state crosses growth per its ``growth_state_policy`` (carried or fresh);
* unknown names and groups get a did-you-mean; a missing package names the pip extra.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import run_distributed
from steptitan.optim import OptimizerPlugin, resolve_assignment
from steptitan.recipe import RecipeError
from steptitan.registry import OPTIM

PACKAGES = {"adamw": None, "galore": "galore_torch", "fira": "fira", "adam_mini": "adam_mini", "apollo": "apollo_torch",
            "adamw8bit": "torchao"}


def needs(name: str):
    module = PACKAGES[name]
    missing = module is not None and importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing, reason=f"optional package {module!r} not installed (pip install 'steptitan[{OPTIM.get(name).requires}]')")


def optim_params(name: str):
    return pytest.param(name, marks=needs(name), id=name)


# --------------------------------------------------------------------------- registry and checks


def test_every_plugin_declares_the_contract():
    assert {"adamw", "galore", "fira", "adam_mini", "apollo", "adamw8bit"} <= set(OPTIM.names())
    for name in OPTIM.names():
        cls = OPTIM.get(name)
        assert cls.growth_state_policy in ("fresh", "copy") and isinstance(cls.resumable, bool)
        assert dataclasses.is_dataclass(cls.Options) and cls.description
    from steptitan.cli import list_plugins

    listing = list_plugins()
    assert "optimizers:" in listing and "adam_mini" in listing and "(pip extra: fira)" in listing


def test_a_half_implemented_plugin_is_refused_at_definition():
    with pytest.raises(TypeError, match="does not define .*state_bytes"):
        class Half(OptimizerPlugin):  # noqa: F841
            Options = dataclasses.make_dataclass("O", [])
            description, growth_state_policy, resumable, requires = "x", "fresh", True, None

            def build(self, named_params, hparams):
                return torch.optim.SGD([p for _, p in named_params], lr=hparams.lr)


def test_options_built_in_code_meet_the_same_declarations():
    """As PEFT and growth plugins (tests/test_recipe.py): an optimizer plugin built in code with options outside
    their declared range is refused with the recipe's message, not trained with."""
    galore = OPTIM.get("galore")
    with pytest.raises(ValueError, match=r"galore\.rank must be > 0, got 0"):
        galore(galore.Options(rank=0))
    assert galore(galore.Options(rank=4)).options.rank == 4


def test_unknown_names_and_groups_get_did_you_mean():
    with pytest.raises(RecipeError, match=r"unknown optimizer 'adam_mni'.*Did you mean 'adam_mini'"):
        resolve_assignment([({"embeddings": "adam_mni"}, "stages.1.optim")])
    with pytest.raises(RecipeError, match=r"stages.1.optim.embedings: unknown parameter group \(did you mean 'embeddings'"):
        resolve_assignment([({"embedings": "adamw"}, "stages.1.optim")])
    with pytest.raises(RecipeError, match=r"galore.rank must be > 0"):
        resolve_assignment([({"head": {"name": "galore", "rank": 0}}, "stages.1.optim")])


def test_assignment_layers_and_adapters_follow_default():
    a = resolve_assignment([({"default": "adamw", "embeddings": "adam_mini"}, "training.optim"),
                            ({"head": "adam_mini"}, "stages.1.optim")])
    assert {g: p.registry_name for g, p in a.items()} == {
        "old": "adamw", "new": "adamw", "embeddings": "adam_mini", "head": "adam_mini", "adapters": "adamw"}
    assert a["embeddings"] is a["head"]  # one optimizer over both groups
    b = resolve_assignment([({"embeddings": "adam_mini"}, "training.optim"), ({"default": "adam_mini"}, "stages.1.optim")])
    assert {p.registry_name for p in b.values()} == {"adam_mini"}


def test_missing_package_names_the_pip_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fira(name, *args, **kwargs):
        if name == "fira" or name.startswith("fira."):
            raise ImportError("No module named 'fira'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fira)
    monkeypatch.setattr("importlib.import_module", lambda n: no_fira(n))
    with pytest.raises(ImportError, match=r"pip install 'steptitan\[fira\]'"):
        OPTIM.get("fira").check_available()


def test_non_resumable_optimizer_refused_at_plan_time_when_checkpointing():
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict

    d = _recipe_dict("/tmp/unused", {"default": "galore"}, stages=1)
    d["checkpoint"] = {"enabled": True}
    if importlib.util.find_spec("galore_torch") is None:
        pytest.skip("galore-torch not installed")
    with pytest.raises(RecipeError, match=r"stages.0.optim.*'galore' cannot be checkpointed.*checkpoint.enabled = false"):
        build_plan(recipe_from_dict(d))


def test_relora_reset_needs_adam_moments_on_its_adapters():
    """ReLoRA's reset prunes the adapters' Adam moments (exp_avg/exp_avg_sq). Adam-mini keeps m / v
    under other names and shapes, so the reset silently touched nothing: refused at plan time instead."""
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict

    relora = {"method": "relora", "layers": "old", "rank": 3, "reset_interval": 2}
    for optim, ok in (({"default": "adam_mini"}, False), ({"default": "adam_mini", "adapters": "adamw"}, True),
                      ({"default": "adamw"}, True)):
        d = _recipe_dict("/tmp/unused", optim)
        d["stages"][1]["peft"] = relora
        if ok:
            build_plan(recipe_from_dict(d))
            continue
        with pytest.raises(RecipeError, match=r"stages.1.*relora.*adapters.*'adam_mini'.*adapters = \"adamw\""):
            build_plan(recipe_from_dict(d))


# --------------------------------------------------------------------------- memory model vs measured bytes


def _recipe_dict(out_dir: str, optim: dict, stages: int = 2, checkpoint: bool = False) -> dict:
    growth = {"name": "interpolate", "n_new": 2, "position": "uniform", "init": "copy"}
    spec = [
        {"name": "s0", "steps": 2},
        {"name": "s1", "steps": 4, "growth": growth, "peft": {"method": "lora", "layers": "old", "rank": 3},
         "freeze": ["old"]},
    ][:stages]
    return {
        "name": "optim", "output_dir": out_dir,
        # dim 96 / vocab 1001 over 2 ranks: uneven shards; 4 heads of 24 rows
        "model": {"dim": 96, "n_layers": 2, "n_heads": 4, "vocab_size": 1001, "ffn_hidden": 200},
        "training": {"batch_size": 2, "seq_len": 16, "warmup_steps": 0, "optim": optim, "steps_per_log": 1,
                     "eval_batches": 1},
        "checkpoint": {"enabled": checkpoint, "interval": 2 if checkpoint else 0}, "stages": spec,
    }


MEMORY_CASES = {
    "adam_mini": {"default": "adam_mini"},
    "fira": {"default": {"name": "fira", "rank": 8, "update_proj_gap": 1}},
    "galore": {"default": {"name": "galore", "rank": 8, "update_proj_gap": 1}},
    "adamw+adam_mini": {"default": "adamw", "embeddings": "adam_mini", "head": "adam_mini"},
    # wq/wk/wv/wo 96 x 96 and w1/w3 200 x 96 projected from the right, w2 96 x 200 from the left
    "apollo": {"default": {"name": "apollo", "rank": 8, "update_proj_gap": 1}},
    # quantised or fp32 moments by the local shard (>= 4096 elements, divisible by 256): e.g. wq at 1
    # and 2 ranks, w1 at 1 rank only (9600 = 37.5 x 256 on 2), never the 1001-row embedding
    "adamw8bit": {"default": "adamw8bit"},
}


def _measure(env, recipe_dicts):
    from test_memory import _measure_and_predict

    return [r for d in recipe_dicts for r in _measure_and_predict(env, d)]


def _installed(case: str) -> bool:
    return all(PACKAGES[n] is None or importlib.util.find_spec(PACKAGES[n]) is not None for n in case.split("+"))


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2])
def test_optimizer_bytes_equal_measured(tmp_path, world):
    """Predicted optimizer-state bytes == measured, per stage and rank, for every optimizer plugin
    (one process group runs all cases); exact for every plugin at both world sizes (GaLore/Fira lay
    out their projected state per rank themselves, steptitan/lowrank.py)."""
    cases = [c for c in MEMORY_CASES if _installed(c)]
    if not cases:
        pytest.skip("no optional optimizer package installed")
    dicts = [_recipe_dict(str(tmp_path / c), MEMORY_CASES[c]) for c in cases]
    results = run_distributed(_measure, world, recipe_dicts=dicts)
    n_stages = len(results[0]) // len(cases)
    for per_rank in results:
        for k, (name, measured, predicted) in enumerate(per_rank):
            case = cases[k // n_stages]
            for key in ("params_trainable", "params_frozen", "grads"):
                assert measured[key] == predicted[key], (case, name, key)
            assert measured["optimizer"] == predicted["optimizer"], (case, name, measured, predicted)
    if len(cases) < len(MEMORY_CASES):
        pytest.skip(f"optional packages missing for {sorted(set(MEMORY_CASES) - set(cases))}; checked {cases}")


# --------------------------------------------------------------------------- exact resume, 2 ranks


def _train(env, recipe_dict):
    from test_memory import _RandomTokens

    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict
    from steptitan.trainer import Trainer

    recipe = recipe_from_dict(recipe_dict)
    trainer = Trainer(recipe, build_plan(recipe), _RandomTokens(recipe.model.vocab_size), env)
    trainer.run()
    return trainer.stage_losses


def assert_two_rank_resume_is_bit_exact(recipe_dict: dict, kept: str, dropped: str, n_losses: int) -> None:
    """Train ``recipe_dict`` on 2 ranks, delete its checkpoint ``dropped`` (as if killed after the save of
    ``kept``), train again: the resumed run resumes from ``kept`` and its stage losses equal the
    uninterrupted run's, floats compared exactly. (tests/test_optim_lowmem.py uses it too.)"""
    import shutil

    full = run_distributed(_train, 2, recipe_dict=recipe_dict)[0]
    ckpts = Path(recipe_dict["output_dir"]) / "checkpoints"
    assert (ckpts / kept).is_dir()
    shutil.rmtree(ckpts / dropped)
    resumed = run_distributed(_train, 2, recipe_dict=recipe_dict)[0]
    assert len(full) == n_losses and resumed == full  # floats compared exactly


@pytest.mark.dist
@needs("adam_mini")
def test_two_rank_resume_of_mixed_optimizers_is_bit_exact(tmp_path):
    """Stage 1 trains new blocks and LoRA adapters with AdamW and embeddings + head with Adam-mini
    (two torch optimizers in one StageOptimizers). A run resumed from its step-2 checkpoint of
    stage 1 gives the same stage-1 losses, bit for bit, as the uninterrupted run."""
    optim = {"default": "adamw", "embeddings": "adam_mini", "head": "adam_mini"}
    d = _recipe_dict(str(tmp_path / "run"), optim, checkpoint=True)
    assert_two_rank_resume_is_bit_exact(d, kept="stage01-step000002", dropped="stage01-step000004", n_losses=4)


# --------------------------------------------------------------------------- state across growth


def _grow_once(plugin_name: str, n_layers: int, n_new: int, seed: int):
    """Train a 1-step model with the plugin, grow it (interpolate, optimizer_state="copy"), and
    return (source optimizer state by name, grown optimizer state by name, layer sources)."""
    from steptitan.growth import dense_params
    from steptitan.model import ModelShape, build_model, init_model_weights
    from steptitan.optim import OptimizerHParams, build_stage_optimizers
    from steptitan.registry import GROWTH

    shape = ModelShape(dim=32, n_layers=n_layers, n_heads=2, n_kv_heads=2, vocab_size=64, ffn_hidden=64, max_seq_len=8)
    op_cls = GROWTH.get("interpolate")
    op = op_cls(op_cls.Options(n_new=n_new, position="uniform", init="copy", optimizer_state="copy"))
    hp = OptimizerHParams(1e-2, (0.9, 0.95), 1e-8, 0.1)
    plugins = resolve_assignment([({"default": plugin_name}, "test")], shape)
    torch.manual_seed(seed)
    src = build_model(shape).to_empty(device="cpu")
    with torch.no_grad():
        init_model_weights(src)
    src_opt = build_stage_optimizers(src, plugins, lambda n: "new", hp)
    tokens = torch.randint(0, 64, (2, 9))
    torch.nn.functional.cross_entropy(src(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    src_opt.step()
    big = op.target_shape(shape)
    dst = build_model(big).to_empty(device="cpu")
    with torch.no_grad():
        init_model_weights(dst)
    op.grow(src, dst, shape)
    dst_opt = build_stage_optimizers(dst, resolve_assignment([({"default": plugin_name}, "test")], big), lambda n: "new", hp)
    op.carry_optimizer_state(src, src_opt, dst, dst_opt, shape)
    src_state = {n: dict(src_opt.optimizers[0].state[p]) for n, p in dense_params(src, shape).items()}
    dst_state = {n: dict(st) for n, p in dense_params(dst, shape).items() for o in dst_opt.optimizers
                 for q, st in o.state.items() if q is p}
    return src_state, dst_state, op.layer_sources(shape)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(deadline=None, max_examples=8)
@given(plugin=st.sampled_from([n for n in ("adamw", "adam_mini", "galore", "fira", "apollo", "adamw8bit")
                               if PACKAGES[n] is None or importlib.util.find_spec(PACKAGES[n]) is not None]),
       n_layers=st.integers(1, 2), n_new=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_state_crosses_growth_per_policy(plugin, n_layers, n_new, seed):
    """"copy": every grown layer copied from one source layer starts with that layer's moments and
    step, exactly; "fresh": the grown model's optimizer holds no state before its first step."""
    src_state, dst_state, sources = _grow_once(plugin, n_layers, n_new, seed)
    if OPTIM.get(plugin).growth_state_policy == "fresh":
        assert dst_state == {}
        return
    checked = 0
    for j, source in enumerate(sources):
        if len(source.sources) != 1:
            continue
        (i,) = source.sources
        for name, state in src_state.items():
            if name.startswith(f"layers.{i}."):
                grown = dst_state[name.replace(f"layers.{i}.", f"layers.{j}.", 1)]
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(grown[key], state[key]), (plugin, name, key)
                assert float(grown["step"]) == float(state["step"])
                checked += 1
    assert checked > 0
