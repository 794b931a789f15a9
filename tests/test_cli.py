"""The everyday interface: ``steptitan list-plugins`` (external plugins included) and ``--dry-run``."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, write_dist_info

PLUGIN = textwrap.dedent('''
    """An external growth operator, registered through the steptitan.plugins entry-point group."""
    from dataclasses import dataclass

    from steptitan.growth import GrowthOperator
    from steptitan.registry import GROWTH


    @dataclass
    class Options:
        factor: int = 3  # how many copies of each layer


    @GROWTH.register("ext_test_repeat")
    class ExtRepeat(GrowthOperator):
        Options = Options
        description = "external test plugin: repeat every layer"
''')


def make_distribution(root: Path) -> Path:
    """An installed-looking distribution: a module plus a *.dist-info folder with an entry point."""
    (root / "ext_steptitan_plugin.py").write_text(PLUGIN)
    write_dist_info(root, "ext-steptitan-plugin", "0.1", {"repeat": "ext_steptitan_plugin"})
    return root


@pytest.fixture
def external_plugin(tmp_path, monkeypatch):
    from steptitan import registry
    from steptitan.cli import list_plugins

    assert "ext_test_repeat" not in list_plugins()  # absent until its distribution is on the path
    monkeypatch.syspath_prepend(str(make_distribution(tmp_path)))
    registry.reset_for_tests()
    yield tmp_path
    registry.GROWTH._plugins.pop("ext_test_repeat", None)
    sys.modules.pop("ext_steptitan_plugin", None)
    registry.reset_for_tests()


def test_list_plugins_shows_an_external_entry_point_plugin(external_plugin):
    from steptitan.cli import list_plugins
    from steptitan.registry import GROWTH

    out = list_plugins()
    line = next(l for l in out.splitlines() if l.strip().startswith("ext_test_repeat"))
    assert "external test plugin: repeat every layer" in line and "[external: ext_steptitan_plugin]" in line
    assert "factor = 3" in out.split("ext_test_repeat", 1)[1].split("\n  ", 2)[1]
    # built-ins are still there and marked as such
    assert "interpolate" in GROWTH.names() and "[steptitan.registry.growth.interpolate]" in out
    assert "lora" in out


def test_list_plugins_command_sees_the_entry_point(external_plugin, capsys):
    from steptitan.cli import main

    assert main(["list-plugins"]) == 0
    out = capsys.readouterr().out
    assert "ext_test_repeat" in out and "growth operators:" in out and "PEFT methods:" in out


def test_dry_run_prints_recipe_plan_and_predicted_memory(capsys):
    from steptitan.train import main

    assert main([str(REPO / "recipes" / "step.toml"), "--dry-run", "--world-size", "2", "stages.1.peft.rank=4"]) == 0
    out = capsys.readouterr().out
    assert "lora[2L] rank=4 alpha=16" in out  # the override applied, shown in the stage table
    assert "trainable" in out and "new layers:" in out  # the stage plan
    memory = out.split("predicted memory per rank, 2 rank(s)", 1)[1].splitlines()
    assert memory[1].split()[:2] == ["stage", "params"]
    assert [row.split()[0] for row in memory[2:4]] == ["small", "grown"]


def test_unknown_command_is_an_error(capsys):
    from steptitan.cli import main

    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
