"""Plugin registries: growth operators, PEFT methods and optimizers.

This folder is both the registry mechanism (this file) and the home of the
built-in plugins (``growth/``, ``peft/`` and ``optim/``, one file per plugin). It installs
as ``steptitan.registry``.

A plugin is a class registered with one line::

    from steptitan.registry import GROWTH

    @GROWTH.register("my_op")
    class MyOp(GrowthOperator): ...

External packages add plugins without editing steptitan by declaring a module
in the ``steptitan.plugins`` entry-point group; importing that module runs its
``register`` lines::

    [project.entry-points."steptitan.plugins"]
    my_op = "my_package.my_op"
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any, Callable, TypeVar

ENTRY_POINT_GROUP = "steptitan.plugins"

T = TypeVar("T")


class UnknownPluginError(KeyError):
    """Raised for a name no plugin is registered under. Its message lists the known names."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class Registry:
    """A name -> plugin-class table for one kind of plugin."""

    def __init__(self, kind: str):
        self.kind = kind
        self._plugins: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@REGISTRY.register("name")``."""

        def decorator(cls: type[T]) -> type[T]:
            existing = self._plugins.get(name)
            if existing is not None and existing is not cls:
                # Re-importing the same module (e.g. under two import paths) is
                # harmless; two different classes under one name is a bug.
                if (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
                    raise ValueError(
                        f"{self.kind} plugin {name!r} is already registered by "
                        f"{existing.__module__}.{existing.__qualname__}"
                    )
            cls.registry_name = name  # type: ignore[attr-defined]
            self._plugins[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._plugins)

    def get(self, name: str) -> type:
        load_plugins()
        if name not in self._plugins:
            raise UnknownPluginError(unknown_name_message(self.kind, name, self._plugins))
        return self._plugins[name]

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._plugins


def unknown_name_message(kind: str, name: str, known: Any) -> str:
    known = sorted(known)
    msg = f"unknown {kind} {name!r}; known: {', '.join(known) if known else '(none)'}"
    close = difflib.get_close_matches(str(name), known, n=1)
    if close:
        msg += f". Did you mean {close[0]!r}?"
    return msg


GROWTH = Registry("growth operator")
PEFT = Registry("PEFT method")
OPTIM = Registry("optimizer")

_loaded = False


def load_plugins() -> None:
    """Import the built-in plugin modules and every entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for subpackage in ("growth", "peft", "optim"):
        package = importlib.import_module(f"{__name__}.{subpackage}")
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken third-party plugin must say which one
            raise ImportError(
                f"could not load steptitan plugin entry point {ep.name!r} ({ep.value}): {exc}"
            ) from exc


def reset_for_tests() -> None:
    """Forget that plugins were loaded, so a test can re-scan entry points."""
    global _loaded
    _loaded = False
