"""Recipe parsing, overrides and every validation error of the foundation issue."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from steptitan.plan import build_plan, format_plan
from steptitan.recipe import RecipeError, apply_overrides, load_recipe, load_recipe_dict, parse_overrides, recipe_from_dict
from steptitan.train import check_data_fits, main as train_main

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
