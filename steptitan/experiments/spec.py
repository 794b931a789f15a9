"""Sweep files: parse and expand them into runs, each with its resolved recipe (paths anchored, written as TOML).

A sweep file (TOML) names a base recipe, overrides for every run and the axes::

    name = "insertion_position"
    recipe = "../recipes/step.toml"     # relative to this file (or to the working directory)
    nproc = 2                           # torchrun processes per run
    mode = "grid"                       # grid: cartesian product of the axes | zip: i-th values together
    seeds = [0, 1]                      # optional: every combination once per training.seed
    metric = "final_val_loss"           # the bar chart's metric (a results column)

    [set]                               # overrides for every run (dotted keys)
    training.seq_len = 64

    [axes]                              # one list of values per dotted key
    stages.1.growth.position = ["upper", "lower", "uniform"]

    [[when]]                            # per-run overrides: runs whose values match get `set`
    match = { "stages.1.growth.position" = "lower" }
    set = { "stages.1.lr" = 1e-3 }

    [[runs]]                            # explicit extra runs (list mode when there are no axes)
    label = "no-growth"
    set = { "stages.1.growth" = {} }

Relative paths (docs/sweeps.md, "Paths"): a path key written in the base recipe is relative to the
recipe file's folder; one written in the sweep file is relative to the sweep file's folder. Both are
made absolute in the run's resolved recipe, and training runs with the sweep file's folder as its
working directory, so nothing a recipe names lands in the steptitan checkout.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from steptitan.recipe import RecipeError

MODES = ("grid", "zip")
SWEEP_KEYS = {"name", "recipe", "nproc", "mode", "seeds", "metric", "output_dir", "template", "set", "axes", "when", "runs",
              "torchrun_args"}
# Recipe keys that hold file-system paths: anchored to the folder of the file that wrote them.
PATH_KEYS = ("data.files", "data.val_files", "data.tokenizer", "data.cache_dir", "checkpoint.resume", "output_dir",
             "model.init_from")
NOT_PATHS = {"checkpoint.resume": ("auto", "never")}


class SweepError(ValueError):
    """The sweep file is invalid; the message says what and where."""


@dataclass
class Run:
    """One run: its name, its values on the axes, its base recipe and every override it sets."""

    name: str
    values: dict[str, Any]  # axis key (and "training.seed") -> value; what names the run
    overrides: dict[str, Any]  # every dotted key this run sets (base set + axes + when + run set)
    label: str = ""
    recipe: Path = Path()  # the base recipe file
    base_dir: Path = Path()  # relative paths among the overrides are relative to this folder

    def override_args(self) -> list[str]:
        """``key=value`` text, for people (``--list``); launches use the resolved TOML, not this."""
        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in self.overrides.items()]


@dataclass
class Sweep:
    name: str
    path: Path
    recipe: Path
    nproc: int
    mode: str
    seeds: list[int]
    metric: str
    output_dir: Path
    template: str
    torchrun_args: list[str]
    axes: dict[str, list[Any]]
    workdir: Path  # the working directory of every run: the sweep file's folder
    runs: list[Run] = field(default_factory=list)


# --------------------------------------------------------------------------- names


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"stages": {"1": {"lr": 1}}}`` -> ``{"stages.1.lr": 1}``: TOML dotted keys and quoted keys mean the same.

    A non-empty table is a level of keys; anything else (a list, a scalar, an empty table) is a value.
    """
    out: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest unique dotted suffix of each key: stages.1.growth.position -> position."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        out[key] = suffix
    return out


def value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def run_name(values: dict[str, Any], label: str = "") -> str:
    """Folder name from the axis values, hydra style: ``position=upper,rank=8,seed=0``."""
    short = short_keys(list(values))
    parts = ([label] if label else []) + [f"{short[k]}={value_text(v)}" for k, v in values.items()]
    name = ",".join(parts) or "base"
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > 120:  # file systems cap names at 255 bytes; keep it readable and unique
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


# --------------------------------------------------------------------------- the sweep file


def _resolve_recipe(raw: str, sweep_path: Path) -> Path:
    from steptitan import __file__ as package_file

    checkout = Path(package_file).resolve().parents[1]
    for base in (sweep_path.parent, Path.cwd(), checkout):
        candidate = (base / os.path.expanduser(raw)).resolve()
        if candidate.is_file():
            return candidate
    raise SweepError(f"{sweep_path}: recipe {raw!r} not found (looked beside the sweep file, in the working directory "
                     f"and the steptitan checkout)")


def load_sweep(path: str | os.PathLike, output_dir: str | None = None) -> Sweep:
    """Parse and expand a sweep file. ``output_dir`` (``--out``) is relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)}; known: {', '.join(sorted(SWEEP_KEYS))}")
    if "recipe" not in data:
        raise SweepError(f"{path}: needs recipe = \"<base recipe.toml>\"")
    name = str(data.get("name", path.stem))
    mode = data.get("mode", "grid")
    if mode not in MODES:
        raise SweepError(f"{path}: mode must be one of {', '.join(MODES)}, got {mode!r}")
    nproc = data.get("nproc", 1)
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc <= 0:
        raise SweepError(f"{path}: nproc must be a positive integer, got {nproc!r}")
    seeds = data.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{path}: seeds must be a list of integers, got {seeds!r}")
    axes = flatten(data.get("axes", {}))
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: axes.{key} must be a non-empty list of values, got {values!r}")
    if mode == "zip" and len({len(v) for v in axes.values()}) > 1:
        lengths = ", ".join(f"{k}: {len(v)}" for k, v in axes.items())
        raise SweepError(f"{path}: mode = \"zip\" needs axes of equal length ({lengths})")
    if seeds and "training.seed" in axes:
        raise SweepError(f"{path}: give seeds = [...] or an axis training.seed, not both")
    folder = path.resolve().parent
    # --out is relative to where the command runs; output_dir in the file to the file's folder
    out = Path(output_dir).resolve() if output_dir else folder / os.path.expanduser(
        str(data.get("output_dir", "runs/{name}")).format(name=name))
    sweep = Sweep(
        name=name, path=path.resolve(), recipe=_resolve_recipe(str(data["recipe"]), path), nproc=nproc, mode=mode,
        seeds=list(seeds), metric=str(data.get("metric", "final_val_loss")), output_dir=Path(os.path.normpath(out)),
        template=str(data.get("template", "{command}")), torchrun_args=[str(a) for a in data.get("torchrun_args", [])],
        axes=axes, workdir=folder,
    )
    sweep.runs = expand_runs(sweep, flatten(data.get("set", {})), data.get("when", []), data.get("runs", []))
    return sweep


def expand_runs(sweep: Sweep, base: dict[str, Any], when: list[dict], extra: list[dict]) -> list[Run]:
    """Axes (grid or zip) x seeds, then the explicit runs; per-run ``when`` overrides applied to all."""
    combos: list[dict[str, Any]] = []
    if sweep.axes:
        keys = list(sweep.axes)
        rows = itertools.product(*sweep.axes.values()) if sweep.mode == "grid" else zip(*sweep.axes.values())
        combos = [dict(zip(keys, row)) for row in rows]
    elif not extra:
        combos = [{}]  # no axes, no runs: the base recipe once (per seed)
    labelled: list[tuple[str, dict[str, Any], dict[str, Any]]] = [("", c, {}) for c in combos]
    for i, spec in enumerate(extra):
        if not isinstance(spec, dict) or set(spec) - {"label", "set"}:
            raise SweepError(f"{sweep.path}: runs.{i} must be a table with label and set, got {spec!r}")
        labelled.append((str(spec.get("label", f"run{i}")), {}, flatten(spec.get("set", {}))))
    if sweep.seeds:
        labelled = [(label, {**values, "training.seed": s}, own) for label, values, own in labelled for s in sweep.seeds]
    for i, rule in enumerate(when):
        if not isinstance(rule, dict) or set(rule) != {"match", "set"}:
            raise SweepError(f"{sweep.path}: when.{i} must have exactly match = {{...}} and set = {{...}}")
    runs: list[Run] = []
    for label, values, own in labelled:
        overrides = {**base, **values, **own}
        for rule in when:
            match = flatten(rule["match"])
            if all(k in overrides and overrides[k] == v for k, v in match.items()):
                overrides.update(flatten(rule["set"]))
        runs.append(Run(run_name(values, label), values, overrides, label, sweep.recipe, sweep.workdir))
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"{sweep.path}: several runs would share the folder name(s) {dupes}; give explicit runs distinct labels")
    return runs


# --------------------------------------------------------------------------- a run's resolved recipe


def anchor_path(key: str, value: Any, base_dir: Path) -> Any:
    """A relative path value of a PATH_KEYS key, made absolute against ``base_dir`` (``~`` stays for expanduser)."""
    def one(v: Any) -> Any:
        if not isinstance(v, str) or not v or v in NOT_PATHS.get(key, ()) or v.startswith("~") or os.path.isabs(v):
            return v
        return os.path.normpath(base_dir / v)

    if key not in PATH_KEYS:
        return value
    return [one(v) for v in value] if isinstance(value, list) else one(value)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data[a][b][1][c] = value`` for ``a.b.1.c`` (lists indexed by number; missing tables created).

    The same meaning as a ``key=value`` override of ``steptitan train``: a table value replaces the table.
    """
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[:i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override {key}: {'.'.join(parts[:i])} has {len(node)} entries "
                                  f"(indices 0..{len(node) - 1}), got {part!r}")
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise RecipeError(f"override {key}: {where} is inside a {type(node).__name__}, not a table")


def resolved_recipe(run: Run) -> dict[str, Any]:
    """The base recipe with its paths anchored at its own folder, then the run's overrides (anchored at base_dir)."""
    try:
        data = tomllib.loads(run.recipe.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{run.recipe}: cannot read the base recipe: {exc}") from None
    flat = flatten(data)
    for key in PATH_KEYS:
        if key in flat:
            set_dotted(data, key, anchor_path(key, flat[key], run.recipe.parent))
    for key, value in run.overrides.items():
        set_dotted(data, key, anchor_path(key, value, run.base_dir))
    return data


def recipe_toml(data: dict[str, Any]) -> str:
    """TOML text of a recipe dict, checked to read back as exactly the same dict (values and types)."""
    import tomli_w

    try:
        text = tomli_w.dumps(data)
    except TypeError as exc:  # None and other values TOML has no way to write
        raise RecipeError(f"this run's recipe cannot be written as TOML: {exc}") from None
    if tomllib.loads(text) != data:
        raise RecipeError("this run's recipe does not survive a TOML round trip")
    return text


def missing_data_files(recipe: Any) -> list[str]:
    """Data files (and a tokenizer) that a recipe names and that do not exist, as messages (recipe.missing_files)."""
    from steptitan.recipe import missing_files

    return missing_files(recipe)


def check_run(run: Run) -> str | None:
    """Recipe, stage plan and data files of one run, in this process (no data prepared, no processes)."""
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict

    try:
        recipe = recipe_from_dict(tomllib.loads(recipe_toml(resolved_recipe(run))))
        build_plan(recipe)
    except RecipeError as exc:
        return str(exc)
    missing = missing_data_files(recipe)
    return "missing data:\n  " + "\n  ".join(missing) if missing else None
