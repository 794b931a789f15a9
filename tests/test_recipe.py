"""Recipe parsing, overrides and every validation error of the foundation issue."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from conftest import REPO
from steptitan.data import check_data_fits
from steptitan.plan import build_plan, format_plan
from steptitan.recipe import RecipeError, load_recipe, load_recipe_dict, parse_overrides, recipe_from_dict
from steptitan.train import main as train_main

STEP = REPO / "recipes" / "step.toml"


def step_dict(*overrides: str) -> dict:
    return load_recipe_dict(STEP, list(overrides))


def error_of(data: dict) -> str:
    with pytest.raises(RecipeError) as exc:
        build_plan(recipe_from_dict(data))
    return str(exc.value)


def test_shipped_recipes_parse_and_plan():
    for path in sorted((REPO / "recipes").glob("*.toml")):
        plans = build_plan(load_recipe(path))
        assert plans and all(p.trainable_params > 0 for p in plans), path


def test_overrides_are_typed_and_index_lists():
    recipe = load_recipe(STEP, ["training.seq_len=64", "stages.1.peft.rank=16", "stages.1.steps=7",
                                "data.files=[a.txt,b.txt]", "training.lr=3e-4", "name=other"])
    assert recipe.training.seq_len == 64
    assert recipe.stages[1].peft["rank"] == 16 and recipe.stages[1].steps == 7
    assert recipe.data.files == ["a.txt", "b.txt"]
    assert recipe.training.lr == pytest.approx(3e-4)
    assert recipe.run_dir == Path("runs/other")
    assert build_plan(recipe)[1].peft[0].options.rank == 16


def test_override_can_add_a_new_option_to_a_plugin_table():
    recipe = load_recipe(STEP, ["stages.1.growth.position=upper", "stages.1.growth.n_new=1"])
    plans = build_plan(recipe)
    assert plans[1].shape.n_layers == 3 and sorted(plans[1].new_layers) == [2]


@pytest.mark.parametrize("bad", ["training.steps", "=3", "a..b=1", "training lr=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(RecipeError, match="override"):
        parse_overrides([bad])


def test_unknown_key_suggests_close_match():
    msg = error_of(step_dict("training.learning_rat=0.1"))
    assert "training.learning_rat: unknown key" in msg
    msg = error_of(step_dict("training.batchsize=4"))
    assert "did you mean 'batch_size'" in msg


def test_unknown_plugin_lists_known_names():
    msg = error_of(step_dict("stages.1.growth.name=interpolat"))
    assert "unknown growth operator 'interpolat'" in msg and "interpolate" in msg and "Did you mean 'interpolate'" in msg
    msg = error_of(step_dict("stages.1.peft.method=lorra"))
    assert "unknown PEFT method 'lorra'" in msg and "lora" in msg


def test_unknown_plugin_option_is_reported_with_its_path():
    msg = error_of(step_dict("stages.1.peft.rnk=4"))
    assert "stages.1.peft.rnk: unknown key" in msg and "rank" in msg


def test_inconsistent_stage_shapes():
    msg = error_of(step_dict("stages.1.model={n_layers: 5}"))
    assert "inconsistent stage shapes" in msg and "n_layers" in msg
    data = step_dict()
    data["stages"][1].pop("growth")
    data["stages"][1]["model"] = {"n_layers": 4}
    assert "inconsistent stage shapes" in error_of(data)


@pytest.mark.parametrize("value", [None, "4", 2.5, True, 0])
def test_a_bad_stage0_model_value_is_a_recipe_error_not_a_crash(value):
    # stage 0's own model table replaces [model]: a non-integer n_layers once crashed build_plan (TypeError)
    data = step_dict()
    data["stages"][0]["model"] = {"n_layers": value}
    assert "stages.0.model: invalid model shape: n_layers" in error_of(data)


@pytest.mark.parametrize("override,needle", [
    ("stages.0.steps=0", "stages.0.steps: must be > 0"),
    ("stages.1.steps=-3", "stages.1.steps: must be > 0"),
    ("model.dim=130", "must be divisible by model.n_heads"),
    ("model.n_kv_heads=3", "must be divisible by model.n_kv_heads"),
    ("training.batch_size=0", "training.batch_size: must be > 0"),
    ("training.dtype=fp16", "training.dtype"),
    ("training.seq_len=abc", "training.seq_len: expected an integer"),
    ("stages.1.freeze=[olde]", "unknown layer group 'olde'"),
    ("stages.1.peft.layers=older", "stages.1.peft.layers"),
])
def test_value_errors(override, needle):
    assert needle in error_of(step_dict(override))


def test_errors_are_collected_into_one_message():
    msg = error_of(step_dict("training.batch_size=0", "model.dim=130"))
    assert "batch_size" in msg and "divisible" in msg and msg.startswith("invalid recipe")


def test_seq_len_larger_than_data_can_fill():
    recipe = load_recipe(STEP, ["training.seq_len=512"])
    with pytest.raises(RecipeError, match="larger than the validation data can fill"):
        check_data_fits(recipe, train_tokens=100_000, val_tokens=300)
    with pytest.raises(RecipeError, match="fewer than one step needs"):
        check_data_fits(recipe, train_tokens=513 * 3, val_tokens=10_000)
    check_data_fits(recipe, train_tokens=100_000, val_tokens=10_000)


def test_cli_reports_one_clear_error_and_exit_code_2(capsys, tmp_path):
    rc = train_main([str(STEP), "training.lr=-1", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("steptitan: error:") and "training.lr: must be > 0" in err
    assert "Traceback" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nlr=1")
    assert train_main([str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert train_main([str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dry_run_prints_plan_with_param_counts(capsys):
    assert train_main([str(STEP), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "interpolate" in out and "lora[2L]" in out and "trainable" in out
    plans = build_plan(load_recipe(STEP))
    # stage 1: old layers frozen (their dense weights), adapters + new layers + embeddings/head trainable
    p0, p1 = plans
    layer = p0.shape.layer_params()
    assert p1.frozen_params == 2 * layer
    assert p1.trainable_params > p0.trainable_params  # two new layers + adapters replace two old layers
    assert f"{p1.frozen_params:,}" in format_plan(plans)


# ----------------------------------------------------------------------------- the schema: choices, ranges, one pass


def schema_error(data: dict) -> list[str]:
    """The lines of the RecipeError that recipe_from_dict raises (before any plan is built)."""
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(data)
    return str(exc.value).splitlines()


def test_errors_of_every_section_and_plugin_table_arrive_in_one_pass():
    data = step_dict("training.decay_type=cosin", "stages.1.peft.rank=0", "stages.1.growth.position=uper",
                     "data.max_chars=-5", "checkpoint.keep_last=-1")
    data["stages"].append({"name": "third", "steps": 10, "growth": {"name": "stack", "growth_factor": 0, "mask_stepz": 1},
                           "extra_peft": [{"method": "momentum_reset", "scope": "optimiser"}]})
    lines = [line.strip() for line in schema_error(data)]
    assert lines[0] == "invalid recipe:"
    assert sorted(lines[1:]) == sorted([
        "training.decay_type: must be one of linear, sqrt, cosine, got 'cosin' (did you mean 'cosine'?)",
        "data.max_chars: must be >= 0, got -5",
        "checkpoint.keep_last: must be >= 0, got -1",
        "stages.1.growth: interpolate.position must be one of uniform, upper, lower, got 'uper' (did you mean 'upper'?)",
        "stages.1.peft: lora.rank must be > 0, got 0",
        "stages.2.growth.mask_stepz: unknown key (did you mean 'mask_steps'?); known keys: growth_factor, layers, "
        "mask_steps, name, optimizer_state, zero_out",
        "stages.2.growth: stack.growth_factor must be >= 1, got 0",
        "stages.2.extra_peft.0: momentum_reset.scope must be one of adapters, optimizer, got 'optimiser' "
        "(did you mean 'optimizer'?)",
    ])


@pytest.mark.parametrize("override, line", [
    ("training.dtype=bfloat61", "training.dtype: must be one of auto, float32, bfloat16, got 'bfloat61' (did you mean 'bfloat16'?)"),
    ("training.backend=glo", "training.backend: must be one of auto, gloo, nccl, got 'glo' (did you mean 'gloo'?)"),
    ("stages.1.freeze=[old,embedings]", "stages.1.freeze.1: unknown layer group 'embedings' (did you mean 'embeddings'?); "
                                        "must be one of old, new, embeddings, head"),
    ("stages.1.peft.layers=ol", "stages.1.peft.layers: must be one of old, new, all, got 'ol' (did you mean 'old'?)"),
    ("stages.1.peft.init=kaimin", "stages.1.peft: lora.init must be one of kaiming, gaussian, uniform, pissa, got 'kaimin' "
                                  "(did you mean 'kaiming'?)"),
    ("stages.1.growth.optimizer_state=cpy", "stages.1.growth: interpolate.optimizer_state must be one of fresh, copy, "
                                            "got 'cpy' (did you mean 'copy'?)"),
])
def test_a_wrong_choice_gets_the_choices_and_a_did_you_mean(override, line):
    assert line in [x.strip() for x in schema_error(step_dict(override))]


@pytest.mark.parametrize("override, line", [
    ("training.min_lr_factor=1.5", "training.min_lr_factor: must be in [0, 1], got 1.5"),
    ("training.beta2=1", "training.beta2: must be in [0, 1), got 1.0"),
    ("training.seed=-1", "training.seed: must be >= 0, got -1"),
    ("training.seed=4294967296", "training.seed: must be in [0, 4294967295], got 4294967296"),
    ("training.collective_timeout_s=0", "training.collective_timeout_s: must be > 0, got 0.0"),
    ("training.heartbeat_timeout_s=700000", "training.heartbeat_timeout_s: must be in [0, 604800], got 700000.0"),
    ("model.dim=2097152", "model.dim: must be in (0, 1048576], got 2097152"),
    ("model.n_kv_heads=0", "model.n_kv_heads: must be > 0, got 0"),
    ("stages.1.warmup_steps=-1", "stages.1.warmup_steps: must be >= 0, got -1"),
    ("training.galore.scale=0", "training.galore.scale: must be > 0, got 0.0"),
    ("stages.1.peft.dropout=1", "stages.1.peft: lora.dropout must be in [0, 1), got 1.0"),
    ("stages.1.growth.mask_steps=-2", "stages.1.growth: interpolate.mask_steps must be >= 0, got -2"),
])
def test_declared_ranges_are_checked(override, line):
    assert line in [x.strip() for x in schema_error(step_dict(override))]


def test_a_stage_without_steps_is_refused_and_a_resume_path_is_accepted():
    data = step_dict("checkpoint.resume=/some/run/checkpoints/stage01-step000060")
    del data["stages"][0]["steps"]
    assert "stages.0.steps: must be > 0, got 0 (not set)" in [x.strip() for x in schema_error(data)]
    assert load_recipe(STEP, ["checkpoint.resume=never"]).checkpoint.resume == "never"
    assert load_recipe(STEP, ["checkpoint.resume=runs/x"]).checkpoint.resume == "runs/x"


def test_a_rejected_field_does_not_trigger_cross_field_rules():
    # n_heads='x' keeps its default (4) for the cross-field rules, which must then stay quiet
    # about it rather than report "dim must be divisible by n_heads" for a value nobody wrote.
    lines = schema_error(step_dict("model.n_heads=x", "model.dim=130"))
    assert [x.strip() for x in lines[1:]] == ["model.n_heads: expected an integer, got 'x'"]


def test_options_built_in_code_meet_the_same_declarations():
    from steptitan.registry import GROWTH, PEFT

    interpolate = GROWTH.get("interpolate")
    with pytest.raises(ValueError, match=r"interpolate\.position must be one of uniform, upper, lower, got 'uper' "
                                         r"\(did you mean 'upper'\?\)"):
        interpolate(interpolate.Options(position="uper"))
    relora = PEFT.get("relora")
    with pytest.raises(ValueError, match=r"relora\.prune_ratio must be in \[0, 1\], got 2"):
        relora(relora.Options(prune_ratio=2), [0])


def test_a_new_plugin_kind_gets_choices_and_ranges_with_no_code_of_its_own():
    """What a plugin declares is enforced by the schema alone: a plugin with no __init__ checks."""
    from steptitan.peft import PeftMethod
    from steptitan.registry import PEFT

    @dataclass
    class ProbeOptions:
        mode: Literal["fast", "exact"] = "fast"
        every: int = field(default=1, metadata={"ge": 1, "le": 10})

    @PEFT.register("schema_probe")
    class Probe(PeftMethod):
        Options = ProbeOptions

    try:
        data = step_dict("stages.1.extra_peft=[{method: schema_probe, mode: exakt, every: 11}]")
        assert [x.strip() for x in schema_error(data)[1:]] == [
            "stages.1.extra_peft.0: schema_probe.mode must be one of fast, exact, got 'exakt' (did you mean 'exact'?)",
            "stages.1.extra_peft.0: schema_probe.every must be in [1, 10], got 11",
        ]
        recipe = load_recipe(STEP, ["stages.1.extra_peft=[{method: schema_probe, mode: exact, every: 10}]"])
        assert recipe.stages[1].extra_peft == [{"method": "schema_probe", "mode": "exact", "every": 10}]
    finally:
        PEFT._plugins.pop("schema_probe", None)


@pytest.mark.parametrize("key", ["stages.5.steps", "stages.2.steps", "stages.2"])
def test_an_override_past_the_last_stage_names_how_many_stages_there_are(key):
    with pytest.raises(RecipeError, match=r"there is no stages\.[25]: stages has 2 entries \(stages\.0 \.\. stages\.1\)"):
        load_recipe_dict(STEP, [f"{key}=3"])


def test_the_help_example_is_a_valid_override(capsys):
    import re

    from steptitan.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    example = re.search(r"dot-list: ([^)]*)\)", help_text).group(1).split()
    assert example and all("=" in item for item in example)
    recipe = load_recipe(STEP, example)  # raises RecipeError if a key or value is invalid
    assert build_plan(recipe)


def test_optimizer_tables_are_checked_in_the_same_pass():
    lines = [x.strip() for x in schema_error(step_dict(
        "stages.1.optim={embedings: adam_mini, head: {name: galore, rank: 0}, old: adamx}", "training.lr=0"))]
    assert lines[1:] == [
        "training.lr: must be > 0, got 0.0",
        "stages.1.optim.embedings: unknown parameter group (did you mean 'embeddings'?); "
        "known: default, old, new, embeddings, head, adapters",
        "stages.1.optim.head: galore.rank must be > 0, got 0",
        "stages.1.optim.old: unknown optimizer 'adamx'; known: adam_mini, adamw, adamw8bit, apollo, fira, galore. Did you mean 'adamw'?",
    ]
