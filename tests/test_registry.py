"""Registry: registration, names(), unknown names, entry-point discovery of external plugins."""

from __future__ import annotations

import sys
import textwrap

import pytest

import steptitan.registry as registry
from conftest import write_dist_info
from steptitan.registry import GROWTH, PEFT, Registry, UnknownPluginError


def test_register_names_get():
    reg = Registry("widget")

    @reg.register("alpha")
    class Alpha:
        pass

    @reg.register("beta")
    class Beta:
        pass

    assert reg.names() == ["alpha", "beta"]
    assert reg.get("alpha") is Alpha and Alpha.registry_name == "alpha"
    assert "beta" in reg and "gamma" not in reg


def test_unknown_name_lists_known_and_suggests():
    reg = Registry("widget")
    reg.register("interpolate")(type("A", (), {}))
    reg.register("stack")(type("B", (), {}))
    with pytest.raises(UnknownPluginError) as exc:
        reg.get("interpolat")
    msg = str(exc.value)
    assert "unknown widget 'interpolat'" in msg and "known: interpolate, stack" in msg
    assert "Did you mean 'interpolate'?" in msg
    with pytest.raises(UnknownPluginError, match="known: interpolate, stack$"):
        reg.get("zzzz")


def test_two_classes_under_one_name_is_an_error():
    reg = Registry("widget")
    reg.register("x")(type("A", (), {}))
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x")(type("B", (), {}))


def test_builtin_plugins_are_discovered():
    assert "interpolate" in GROWTH.names()
    assert "lora" in PEFT.names()


@pytest.fixture
def external_plugin(tmp_path, monkeypatch):
    """An installed-looking distribution whose entry point registers a growth operator."""
    pkg = tmp_path / "ext_steptitan_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from steptitan.growth import GrowthOperator, LayerSource
        from steptitan.registry import GROWTH

        @dataclass
        class Options:
            extra: int = 1

        @GROWTH.register("ext_append")
        class AppendLayers(GrowthOperator):
            Options = Options
            description = "external test plugin: append copies of the last layer"

            def target_shape(self, src):
                return src.replace(n_layers=src.n_layers + self.options.extra)

            def layer_sources(self, src):
                old = [LayerSource((i,), new=False) for i in range(src.n_layers)]
                return old + [LayerSource((src.n_layers - 1,), new=True)] * self.options.extra
    """))
    write_dist_info(tmp_path, "ext-steptitan-plugin", "0.1", {"ext_append": "ext_steptitan_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reset_for_tests()
    yield
    GROWTH._plugins.pop("ext_append", None)
    sys.modules.pop("ext_steptitan_plugin", None)
    registry.reset_for_tests()


def test_entry_point_plugin_is_discovered_and_usable(external_plugin):
    from conftest import REPO
    from steptitan.plan import build_plan
    from steptitan.recipe import load_recipe

    assert "ext_append" in GROWTH.names()
    recipe = load_recipe(REPO / "recipes" / "step.toml", ["stages.1.growth={name: ext_append, extra: 3}"])
    plans = build_plan(recipe)
    assert plans[1].shape.n_layers == 5 and sorted(plans[1].new_layers) == [2, 3, 4]


def test_broken_entry_point_names_the_plugin(tmp_path, monkeypatch):
    write_dist_info(tmp_path, "broken-plugin", "0.1", {"broken": "no_such_module_xyz"})
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.reset_for_tests()
    try:
        with pytest.raises(ImportError, match="entry point 'broken'"):
            GROWTH.names()
    finally:
        registry.reset_for_tests()
