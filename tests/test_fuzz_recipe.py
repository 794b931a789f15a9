"""A hypothesis fuzzer over the recipe schema (issue 7, "hostile recipes").

Each example starts from recipes/step.toml and applies 1-6 random mutations,
then a list of random command-line overrides:

* wrong types (strings, lists, tables, None, booleans where numbers go, ...);
* missing keys (any key deleted, including ``growth.name`` / ``peft.method``)
  and unknown keys (at any depth, including inside plugin tables);
* negative, zero, huge (2^31, 2^63, 1e30) and non-finite (nan, inf) numbers;
* inconsistent stage chains (stage shapes that growth does not produce,
  growth on the first stage, stages dropped/duplicated/swapped/emptied);
* unknown plugins (random growth / PEFT names);
* bad override syntax (no ``=``, empty or dotted-wrong keys, unparsable
  values, OmegaConf interpolations and ``???``, indices out of range).

Property: the recipe either validates and plans (``build_plan`` succeeds and
every stage trains something) or fails with ONE ``RecipeError`` whose message
is non-empty and carries no traceback -- and no process group exists either way.

Example count: 1000 in the default ("ci") hypothesis profile, the profile's own
count under any other profile (``HYPOTHESIS_PROFILE=dev`` -> 10).
Run ``python -m pytest tests/test_fuzz_recipe.py --hypothesis-show-statistics``
to see how often each mutation kind and outcome occurred.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from hypothesis import event, given, settings
from hypothesis import strategies as st

from conftest import REPO
from steptitan.plan import build_plan, format_plan
from steptitan.recipe import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    RecipeError,
    StageConfig,
    TrainingConfig,
    apply_overrides,
    load_recipe_dict,
    recipe_from_dict,
    to_dict,
)

FUZZ_EXAMPLES = 1000 if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci" else settings.default.max_examples
BASE = load_recipe_dict(REPO / "recipes" / "step.toml")

GROWTH_KEYS = ["name", "n_new", "position", "after", "init", "zero_out"]
PEFT_KEYS = ["method", "layers", "rank", "alpha", "dropout", "targets", "init"]


def _known_paths() -> list[str]:
    paths = ["name", "output_dir", "overwrite"]
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("training", TrainingConfig),
                         ("checkpoint", CheckpointConfig)):
        paths += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    for i in range(3):
        paths += [f"stages.{i}.{f.name}" for f in dataclasses.fields(StageConfig)]
        paths += [f"stages.{i}.growth.{k}" for k in GROWTH_KEYS]
        paths += [f"stages.{i}.peft.{k}" for k in PEFT_KEYS]
        paths += [f"stages.{i}.model.{k}" for k in ("n_layers", "dim", "n_heads", "vocab_size")]
    return paths


PATHS = _known_paths()
WORDS = ["interpolate", "lora", "old", "new", "all", "embeddings", "head", "cosine", "bfloat16", "float32",
         "auto", "never", "gloo", "uniform", "upper", "lower", "copy", "mean", "random", "kaiming", "wq", ""]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from([-1, 0, 1, 1000, 2**31, 2**63, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, 1e-308]),
    st.text(max_size=10),
    st.sampled_from(WORDS),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=5)
key_names = st.one_of(st.sampled_from(["dimm", "n_layer", "lr_", "steps ", "Rank", "méthode", "1", ""]), st.text(max_size=8))

mutations = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(PATHS), values),  # wrong types, bad numbers
    st.tuples(st.just("delete"), st.sampled_from(PATHS)),  # missing keys
    st.tuples(st.just("unknown"), st.sampled_from(["", "model", "data", "training", "checkpoint", "stages.0",
                                                    "stages.1", "stages.1.growth", "stages.1.peft"]), key_names, values),
    st.tuples(st.just("chain"), st.sampled_from(["drop", "dup", "swap", "empty", "grow0", "shape"]),
              st.integers(0, 2), st.integers(-2, 40)),  # inconsistent stage chains
    st.tuples(st.just("plugin"), st.integers(0, 2), st.sampled_from(["growth", "peft", "extra_peft"]),
              st.one_of(st.text(max_size=10), st.sampled_from(["interpolate", "lora", "Lora", "interp", "stack"]))),
)

override_keys = st.one_of(st.sampled_from(PATHS + ["stages.5.steps", "stages.-1.steps", "model.dim.x", "stages",
                                                   "training", "a..b", ".x", "x.", "a b", "stages.1.peft.rank"]),
                          st.text(max_size=8))
override_values = st.one_of(
    st.sampled_from(["1", "-1", "0", "1e30", "nan", "inf", "true", "null", "[1,2]", "[1,2", "{a: 1}", "{a:",
                     "???", "${oc.env:HOME}", "${missing}", "'x'", "\"", "[[]]", "{}", "[]", "interpolate",
                     "{name: nonexistent}", "{method: lora, rank: -1}", "", "3.5", "0x10", "1_000"]),
    st.text(max_size=8),
)
overrides = st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values),
              st.text(max_size=16)),  # anything at all, e.g. no '=' or an empty key
    max_size=3,
)


# --------------------------------------------------------------------------- applying mutations


def _walk(data: dict, parts: list[str]) -> Any:
    """The container holding ``parts[-1]``, or None when the path does not lead anywhere."""
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {}) if part not in node or isinstance(node[part], (dict, list)) else None
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
        if not isinstance(node, (dict, list)):
            return None
    return node


def _set(data: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = _walk(data, parts)
    if isinstance(node, dict):
        node[parts[-1]] = value
    elif isinstance(node, list) and parts[-1].isdigit() and int(parts[-1]) < len(node):
        node[int(parts[-1])] = value


def _delete(data: dict, path: str) -> None:
    parts = path.split(".")
    node = _walk(data, parts)
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def mutate(data: dict, mutation: tuple) -> None:
    kind = mutation[0]
    stages = data.get("stages")
    if kind == "set":
        _set(data, mutation[1], copy.deepcopy(mutation[2]))
    elif kind == "delete":
        _delete(data, mutation[1])
    elif kind == "unknown":
        prefix, key, value = mutation[1], mutation[2], mutation[3]
        _set(data, f"{prefix}.{key}" if prefix else key, copy.deepcopy(value))
    elif kind == "chain" and isinstance(stages, list):
        what, i, n = mutation[1:]
        if what == "drop" and i < len(stages):
            stages.pop(i)
        elif what == "dup" and i < len(stages):
            stages.insert(i, copy.deepcopy(stages[i]))
        elif what == "swap" and len(stages) > 1:
            stages[0], stages[-1] = stages[-1], stages[0]
        elif what == "empty":
            stages.clear()
        elif what == "grow0" and stages and isinstance(stages[0], dict):
            stages[0]["growth"] = {"name": "interpolate"}
        elif what == "shape" and i < len(stages) and isinstance(stages[i], dict):
            stages[i]["model"] = {"n_layers": n}
    elif kind == "plugin" and isinstance(stages, list):
        i, where, name = mutation[1:]
        if i < len(stages) and isinstance(stages[i], dict):
            if where == "growth":
                stages[i]["growth"] = {"name": name}
            elif where == "peft":
                stages[i]["peft"] = {"method": name, "layers": "old"}
            else:
                stages[i]["extra_peft"] = [{"method": name}]


def validate(data: dict, override_list: list[str]) -> str:
    """'ok' or 'error'; anything but a RecipeError propagates (and fails the test)."""
    try:
        resolved = apply_overrides(data, override_list)
        recipe = recipe_from_dict(resolved)
        plans = build_plan(recipe)
    except RecipeError as exc:
        message = str(exc)
        assert message.strip(), "empty RecipeError message"
        assert "Traceback" not in message
        return "error"
    assert plans and all(p.trainable_params > 0 for p in plans)
    assert format_plan(plans)
    check_runnable(recipe, plans)
    return "ok"


def _numbers(obj: Any):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def check_runnable(recipe, plans) -> None:
    """What a valid recipe must also satisfy for a run to start: the values the trainer feeds to
    torch/numpy/datetime without further checks."""
    options = [m.options for p in plans for m in p.peft] + [p.growth.options for p in plans if p.growth]
    for number in _numbers([to_dict(recipe), options]):
        assert math.isfinite(number), f"a valid recipe holds the non-finite number {number}"
    t = recipe.training
    torch.Generator().manual_seed(t.seed + len(plans))  # trainer: torch.manual_seed(seed + stage)
    np.random.default_rng([t.seed, 0])  # data.BlockSampler
    datetime.timedelta(seconds=t.collective_timeout_s)
    for p in plans:
        assert p.steps > 0 and p.lr > 0 and p.warmup_steps >= 0


@settings(max_examples=FUZZ_EXAMPLES, deadline=datetime.timedelta(seconds=20))
@given(st.lists(mutations, min_size=1, max_size=6), overrides)
def test_fuzzed_recipe_validates_or_fails_with_one_recipe_error(mutation_list, override_list):
    data = copy.deepcopy(BASE)
    for mutation in mutation_list:
        event(f"mutation: {mutation[0]}" + (f" {mutation[1]}" if mutation[0] == "chain" else ""))
        mutate(data, mutation)
    if override_list:
        event("with overrides")
    outcome = validate(data, override_list)
    event(f"outcome: {outcome}")
    assert not dist.is_initialized()  # validation never starts a process group


def test_fuzzer_runs_at_least_1000_examples_in_ci_profile():
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        assert FUZZ_EXAMPLES >= 1000


def test_the_base_recipe_is_valid_and_mutations_can_fail():
    """The property is not vacuous: the base validates, and known-bad mutations give RecipeErrors."""
    assert validate(copy.deepcopy(BASE), []) == "ok"
    for mutation in [("set", "model.dim", "big"), ("delete", "stages.1.growth.name"), ("unknown", "model", "dimm", 1),
                     ("chain", "grow0", 0, 0), ("chain", "shape", 1, 3), ("plugin", 1, "peft", "nope"),
                     ("set", "training.lr", math.nan), ("set", "model.n_layers", 2**63)]:
        data = copy.deepcopy(BASE)
        mutate(data, mutation)
        assert validate(data, []) == "error", mutation
    assert validate(copy.deepcopy(BASE), ["training.lr=${oc.env:NOPE_NOT_SET}"]) == "error"
    assert validate(copy.deepcopy(BASE), ["stages.7.steps=3"]) == "error"


# Independent mistakes, each with the one line it must produce (written out here, not derived from the schema).
INDEPENDENT_ERRORS = {
    "training.decay_type=cosin": "training.decay_type: must be one of linear, sqrt, cosine, got 'cosin' (did you mean 'cosine'?)",
    "training.lr=0": "training.lr: must be > 0, got 0.0",
    "training.seq_len=abc": "training.seq_len: expected an integer, got 'abc'",
    "model.norm_eps=-1": "model.norm_eps: must be > 0, got -1.0",
    "data.max_chars=-1": "data.max_chars: must be >= 0, got -1",
    "checkpoint.interval=-1": "checkpoint.interval: must be >= 0, got -1",
    "training.dimm=3": "training.dimm: unknown key; known keys: " + ", ".join(sorted(f.name for f in dataclasses.fields(TrainingConfig))),
    "stages.0.steps=0": "stages.0.steps: must be > 0, got 0",
    "stages.1.freeze=[olde]": "stages.1.freeze.0: unknown layer group 'olde' (did you mean 'old'?); must be one of old, new, embeddings, head",
    "stages.1.peft.layers=older": "stages.1.peft.layers: must be one of old, new, all, got 'older' (did you mean 'old'?)",
    "stages.1.peft.rank=0": "stages.1.peft: lora.rank must be > 0, got 0",
    "stages.1.peft.init=x": "stages.1.peft: lora.init must be one of kaiming, gaussian, uniform, pissa, got 'x'",
    "stages.1.growth.position=uper": "stages.1.growth: interpolate.position must be one of uniform, upper, lower, got 'uper' (did you mean 'upper'?)",
    "stages.1.growth.zero_out=3": "stages.1.growth.zero_out: expected true/false, got 3",
}


@settings(max_examples=min(FUZZ_EXAMPLES, 200), deadline=datetime.timedelta(seconds=20))
@given(st.sets(st.sampled_from(sorted(INDEPENDENT_ERRORS)), min_size=1))
def test_every_mistake_of_a_recipe_is_reported_in_one_pass(mistakes):
    """Any combination of mistakes, across sections and plugin tables, gives one RecipeError with
    exactly one line per mistake -- no rounds, nothing hidden behind an earlier error."""
    data = apply_overrides(copy.deepcopy(BASE), sorted(mistakes))
    try:
        recipe_from_dict(data)
    except RecipeError as exc:
        lines = str(exc).splitlines()
    else:
        raise AssertionError(f"{sorted(mistakes)} validated")
    assert lines[0] == "invalid recipe:"
    assert sorted(line.strip() for line in lines[1:]) == sorted(INDEPENDENT_ERRORS[m] for m in mistakes)
