"""The external example plugin (examples/growth_plugin) is discovered through the entry-point group and works."""

from __future__ import annotations

import sys

import pytest
import torch

import steptitan.registry as registry
from conftest import REPO, write_dist_info
from steptitan.registry import GROWTH
from test_growth import assert_same_function, grow, logits_pair

EXAMPLE = REPO / "examples" / "growth_plugin"


@pytest.fixture
def installed_example(tmp_path, monkeypatch):
    """What `pip install examples/growth_plugin` leaves behind: the package on sys.path and a
    dist-info folder whose entry_points.txt is the one declared in the example's pyproject.toml."""
    import tomllib

    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    entry_points = project["entry-points"][registry.ENTRY_POINT_GROUP]
    write_dist_info(tmp_path, project["name"], project["version"], entry_points)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    registry.reset_for_tests()
    yield
    GROWTH._plugins.pop("top_copies", None)
    for name in [m for m in sys.modules if m.startswith("steptitan_growth_example")]:
        sys.modules.pop(name)
    registry.reset_for_tests()


def test_example_plugin_is_not_there_without_its_metadata():
    assert "top_copies" not in GROWTH.names()


def test_example_plugin_is_discovered_planned_and_exact(installed_example):
    from steptitan.plan import build_plan, format_plan
    from steptitan.recipe import RecipeError, load_recipe

    assert "top_copies" in GROWTH.names()
    assert GROWTH.get("top_copies").__module__ == "steptitan_growth_example.top_copies"
    recipe = load_recipe(REPO / "recipes" / "step.toml", ["stages.1.growth={name: top_copies, n_new: 3, zero_out: true}"])
    plans = build_plan(recipe)
    assert plans[1].shape.n_layers == 5 and sorted(plans[1].new_layers) == [2, 3, 4]
    assert "top_copies (exact)" in format_plan(plans)
    with pytest.raises(RecipeError, match="stages.1.growth: top_copies.n_new must be >= 1"):
        build_plan(load_recipe(REPO / "recipes" / "step.toml", ["stages.1.growth={name: top_copies, n_new: 0}"]))

    op = plans[1].growth
    shape = plans[0].shape.replace(dim=16, n_heads=2, n_kv_heads=2, vocab_size=32, ffn_hidden=24, max_seq_len=16)
    small, big = grow(op, shape, 0)
    a, b = logits_pair(small, big, shape, 0)
    assert_same_function(a, b)  # zero_out: the copies start as identity blocks
    for j in (2, 3, 4):
        assert torch.equal(big.layers[str(j)].attention.wq.weight, small.layers["1"].attention.wq.weight)
