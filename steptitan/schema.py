"""The schema checker: plain dicts -> typed dataclasses, every error of a recipe in one pass.

A dataclass field declares everything the checker needs (as torchtitan's
job_config does with ``Literal``):

* its type: ``int``, ``float`` (finite), ``bool``, ``str``, ``list[...]``,
  ``dict[...]``, a nested dataclass, ``X | None``;
* its choices: ``Literal["linear", "sqrt", "cosine"]`` (a wrong value gets a
  did-you-mean, like an unknown key does);
* its range, in the field's metadata: ``field(default=1, metadata={"ge": 1})``
  with any of ``ge``, ``gt``, ``le``, ``lt`` (applied to each item of a list);
* a plugin table: ``metadata={"plugin": REGISTRY, "key": "name", "head": Head}``
  on a ``dict[str, Any]`` (or ``list[dict[str, Any]]``) field. The value of ``key``
  names a plugin; the keys of the ``Head`` dataclass (e.g. PEFT's ``layers``) are
  checked against ``Head``, every other key against the plugin class's ``Options``.
  On a ``str`` the same metadata means "a plugin name"; on a typed map such as
  ``dict[Literal[...], str | dict[str, Any]]`` it applies to every value, and the
  keys are checked against the ``Literal`` (``"key_what"`` names them in errors).

Any ``Options`` dataclass of a plugin (growth, PEFT, or a registry added later)
gets the same treatment with no code of its own. Cross-field rules (``dim``
divisible by ``n_heads``) stay as code in the owner (recipe.check_values or the
plugin's ``__init__``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Iterable


class RecipeError(ValueError):
    """A recipe (or its overrides) is invalid. The message says what and where."""


INVALID = object()  # a value that failed its check; the field keeps its default so later checks can run


@dataclasses.dataclass
class _Context:
    """Where errors go and how a value error names its place.

    Recipe fields read ``training.lr: must be > 0``. Plugin options read
    ``stages.1.peft: lora.rank must be > 0`` (the table, then ``<plugin>.<option>``),
    the same text a plugin's own ``__init__`` check gives.
    """

    errors: list[str]
    bad: set[str]  # paths whose values were rejected (cross-field checks skip them)
    table: str | None = None  # path of the plugin table being checked
    label: str | None = None  # plugin name

    def at(self, path: str) -> str:
        if self.label is None:
            return f"{path}:"
        rel = path[len(self.table) + 1:] if self.table and path.startswith(self.table + ".") else path
        return f"{self.table}: {self.label}.{rel}" if self.table else f"{self.label}.{rel}"


def suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def choices_of(tp: Any) -> tuple:
    """The allowed values of a ``Literal`` annotation (for code that lists them)."""
    return typing.get_args(tp)


def range_text(meta: typing.Mapping[str, Any], value: float | None = None) -> str | None:
    """'> 0', '<= 9', 'in [0, 1)' ... from ge/gt/le/lt metadata (None when there is none). Given the
    ``value`` that failed, a value under the lower bound reads '> 0' even when there is an upper bound too
    (a cap such as batch_size <= 10^6 is noise to someone who wrote 0)."""
    low = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    high = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    below = value is not None and low is not None and (value < low[1] or (low[0] == "(" and value == low[1]))
    if low and high and not below:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
    return None


def _in_range(value: float, meta: typing.Mapping[str, Any]) -> bool:
    return (("ge" not in meta or value >= meta["ge"]) and ("gt" not in meta or value > meta["gt"])
            and ("le" not in meta or value <= meta["le"]) and ("lt" not in meta or value < meta["lt"]))


def _matches(value: Any, tp: Any, strict: bool) -> bool:
    """Does ``value`` have the shape of ``tp`` (one level deep)? Used to pick a union arm."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return value in choices if strict else any(type(value) is type(c) for c in choices)
    if dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, (list, tuple))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(tp, type) and isinstance(value, tp)


def _convert(value: Any, tp: Any, path: str, ctx: _Context, meta: typing.Mapping[str, Any]) -> Any:
    """Check ``value`` against the annotation ``tp`` and the field metadata; the converted value or INVALID."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for strict in (True, False):  # an exact Literal match first, so "auto" | <path> picks right
            for arm in arms:
                if _matches(value, arm, strict):
                    return _convert(value, arm, path, ctx, meta)
        ctx.errors.append(f"{path}: expected {' | '.join(type_name(a) for a in args)}, got {value!r}")
        return INVALID
    if tp is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices and any(type(value) is type(c) for c in choices):
            return value
        known = ", ".join(map(str, choices))
        hint = suggest(str(value), choices) if isinstance(value, str) else ""
        if "what" in meta:  # e.g. "unknown layer group 'olde' (did you mean 'old'?)"
            ctx.errors.append(f"{ctx.at(path)} unknown {meta['what']} {value!r}{hint}; must be one of {known}")
        else:
            ctx.errors.append(f"{ctx.at(path)} must be one of {known}, got {value!r}{hint}")
        return INVALID
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if not isinstance(value, dict):
            ctx.errors.append(f"{path}: expected a table ({tp.__name__}), got {value!r}")
            return INVALID
        return _build(tp, value, path, ctx)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            ctx.errors.append(f"{path}: expected a list, got {value!r}")
            return INVALID
        items = [_convert(v, item_tp, f"{path}.{i}", ctx, meta) for i, v in enumerate(value)]
        return INVALID if any(item is INVALID for item in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            ctx.errors.append(f"{path}: expected a table, got {value!r}")
            return INVALID
        value = {str(k): v for k, v in value.items()}
        key_tp, item_tp = typing.get_args(tp) or (str, Any)
        if item_tp is Any:  # a free-form table, or one plugin table
            if "plugin" in meta and value:  # an empty table means "none" (no growth, no PEFT)
                _check_plugin_table(value, meta, path, ctx)
            return value
        # A typed map, e.g. dict[Group, str | dict[str, Any]]: keys from a Literal, values converted
        # with the field's metadata (so a map of plugin names / plugin tables is checked entry by entry).
        keys = typing.get_args(key_tp) if typing.get_origin(key_tp) is typing.Literal else None
        out, failed = {}, False
        for k, v in value.items():
            if keys is not None and k not in keys:
                ctx.errors.append(f"{path}.{k}: unknown {meta.get('key_what', 'key')}{suggest(k, keys)}; "
                                  f"known: {', '.join(keys)}")
                failed = True
                continue
            out[k] = _convert(v, item_tp, f"{path}.{k}", ctx, meta)
            failed = failed or out[k] is INVALID
        return INVALID if failed else out
    if tp is bool:
        if not isinstance(value, bool):
            ctx.errors.append(f"{path}: expected true/false, got {value!r}")
            return INVALID
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            ctx.errors.append(f"{path}: expected an integer, got {value!r}")
            return INVALID
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            ctx.errors.append(f"{path}: expected a number, got {value!r}")
            return INVALID
        # nan/inf would pass every range check (nan < 0 is False) and only surface as a
        # NaN loss mid-run; ints beyond float range would raise OverflowError.
        if not (abs(value) <= 1e300):
            ctx.errors.append(f"{path}: expected a finite number, got {value!r}")
            return INVALID
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            ctx.errors.append(f"{path}: expected a string, got {value!r}")
            return INVALID
        if "plugin" in meta:  # a plugin name standing for its table with default options
            try:
                meta["plugin"].get(value)
            except KeyError as exc:
                ctx.errors.append(f"{path}: {exc}")
                return INVALID
        return value
    else:
        return value
    if not _in_range(value, meta):
        ctx.errors.append(f"{ctx.at(path)} must be {range_text(meta, value)}, got {value!r}")
        return INVALID
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as exc:  # a plugin's string annotation names something its module does not import
        raise TypeError(f"cannot resolve the annotations of {cls.__module__}.{cls.__qualname__}: {exc} "
                        f"(import what they name at module level)") from exc


def _build(cls: type, data: dict[str, Any], where: str, ctx: _Context, also_known: Iterable[str] = ()) -> Any:
    """``cls`` from a dict; a rejected value leaves its field at the default (recorded in ``ctx.bad``)."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    also_known = set(also_known)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key in also_known:
            continue
        if key not in fields:
            known = sorted(set(fields) | also_known)
            ctx.errors.append(f"{path}: unknown key{suggest(str(key), known)}; known keys: {', '.join(known)}")
            continue
        out = _convert(value, hints[key], path, ctx, fields[key].metadata)
        if out is INVALID:
            ctx.bad.add(path)
        else:
            kwargs[key] = out
    for name, f in fields.items():  # a default outside its own range means "required" (a stage's steps)
        if name not in data and isinstance(f.default, (int, float)) and not _in_range(f.default, f.metadata):
            path = f"{where}.{name}" if where else name
            ctx.errors.append(f"{ctx.at(path)} must be {range_text(f.metadata, f.default)}, got {f.default!r} (not set)")
            ctx.bad.add(path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        ctx.errors.append(f"{where or cls.__name__}: {exc}")
        return INVALID


def _check_plugin_table(spec: dict[str, Any], meta: typing.Mapping[str, Any], where: str,
                        ctx: _Context) -> tuple[type, Any] | None:
    """A ``{key = "<plugin>", <head keys>, <options>}`` table: its plugin name, head and the plugin's
    Options. Returns (plugin class, options), or None after recording the problems in ``ctx``."""
    registry, key, head = meta["plugin"], meta["key"], meta.get("head")
    head_keys = [f.name for f in dataclasses.fields(head)] if head else []
    if head:
        _build(head, {k: v for k, v in spec.items() if k in head_keys}, where, ctx)
    if key not in spec:
        ctx.errors.append(f"{where}: needs {key} = \"<{registry.kind}>\"; known: {', '.join(registry.names())}")
        return None
    name = spec[key]
    if not isinstance(name, str):  # a list/table here would reach the registry's dict lookup
        ctx.errors.append(f"{where}.{key}: expected a plugin name (a string), got {name!r}")
        return None
    try:
        cls = registry.get(name)
    except KeyError as exc:  # UnknownPluginError: lists the known names, with a did-you-mean
        ctx.errors.append(f"{where}.{key}: {exc}")
        return None
    n_errors = len(ctx.errors)
    options = _build(cls.Options, {k: v for k, v in spec.items() if k != key and k not in head_keys}, where,
                     _Context(ctx.errors, ctx.bad, table=where, label=name), also_known=[key, *head_keys])
    return (cls, options) if len(ctx.errors) == n_errors else None


# --------------------------------------------------------------------------- public entry points


def build_dataclass(cls: type, data: dict[str, Any], where: str, errors: list[str],
                    bad: set[str] | None = None, label: str | None = None) -> Any:
    """Build ``cls`` from a plain dict, appending every problem to ``errors`` (none raised).

    ``label`` (a plugin name) makes value errors read ``<where>: <label>.<option> must be ...``.
    Paths of rejected values are added to ``bad``.
    """
    ctx = _Context(errors, bad if bad is not None else set(), table=where if label else None, label=label)
    return _build(cls, data, where, ctx)


def options_from_dict(options_cls: type, data: dict[str, Any], where: str, label: str | None = None) -> Any:
    """Build a plugin's options dataclass, raising one RecipeError listing every problem."""
    errors: list[str] = []
    out = build_dataclass(options_cls, data, where, errors, label=label)
    if errors:
        raise RecipeError("\n".join(errors))
    return out


def check_options(options: Any, label: str) -> list[str]:
    """Problems of an already built options dataclass (types, choices, ranges), e.g. ``stack.growth_factor
    must be >= 1, got 0``. Plugin base classes call it so options built in code are held to the schema too."""
    errors: list[str] = []
    ctx = _Context(errors, set(), table=None, label=label)
    hints = _hints(type(options))
    for f in dataclasses.fields(options):
        _convert(getattr(options, f.name), hints[f.name], f.name, ctx, f.metadata)
    return errors


def plugin_field(cls: type, name: str) -> typing.Mapping[str, Any]:
    """The plugin-table metadata of field ``name`` of ``cls`` (e.g. ``plugin_field(StageConfig, "peft")``)."""
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)


def resolve_plugin(spec: dict[str, Any], meta: typing.Mapping[str, Any], where: str) -> tuple[type, Any]:
    """(plugin class, its Options) from a plugin table declared by field metadata ``meta``
    (see ``plugin_field``); one RecipeError listing every problem."""
    errors: list[str] = []
    out = _check_plugin_table(spec, meta, where, _Context(errors, set()))
    if out is None:
        raise RecipeError("\n".join(errors))
    return out
