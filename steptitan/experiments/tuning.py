"""``steptitan bench --tune``: the same tuning budget for every row, scored on the selection slice only.

The protocol (docs/benchmark.md, "Protocol"), identical for vanilla and every row that claims a result:

1. LR: the grid ``--lr-grid`` (default 1, 2, 4, 8 x 1e-3), each LR trained with every selection seed
   (``--tune-seeds``, seeds 0..); while the best LR (lowest mean final loss on the selection slice) is at
   an edge of the grid, the grid is extended by a factor 2 beyond that edge (at most ``MAX_EXTEND`` times
   a side), so the chosen LR is inside the grid, not at its border;
2. warmup, at the best LR: the recipe's own (short, ``short``) against ~5% of the steps (``long``: 5% of
   each stage's steps with a per-stage LR schedule, 5% of all steps with one schedule for the run);
3. variants (``--tune-variants FILE``), at the best LR and warmup: named sets of overrides per row, e.g.
   vanilla's extra configurations when a STEP recipe was chosen among variants, so that both get as many
   trials (docs/benchmark.md, "Protocol" 3);
4. the chosen configuration is the lowest mean over every configuration tried.

Runs are made in rounds (every row's next configurations together, so parallel workers share a round);
a round's results decide the next. The outcome is a JSON file (``--tuned``) with every trial, which
the report reads: each row is trained with its chosen hyperparameters and shows how many trials it got.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from steptitan.experiments import runner
from steptitan.experiments.ledger import Ledger
from steptitan.experiments.spec import Run, Sweep

LR_GRID = (1e-3, 2e-3, 4e-3, 8e-3)
MAX_EXTEND = 3  # grid extensions per side before the edge is accepted (and reported as an edge)
LONG_WARMUP = 0.05  # "long" warmup: this share of the steps of each LR schedule


def warmup_overrides(row_steps: list[int], lr_schedule: str, warmup: str) -> dict[str, Any]:
    """Dotted overrides for a warmup choice: ``short`` = the recipe's own, ``long`` = 5% of each schedule."""
    if warmup == "short":
        return {}
    if warmup != "long":
        raise ValueError(f"warmup choice {warmup!r}: short or long")
    if lr_schedule == "run":
        return {"training.warmup_steps": max(1, round(LONG_WARMUP * sum(row_steps)))}
    return {f"stages.{i}.warmup_steps": max(1, round(LONG_WARMUP * n)) for i, n in enumerate(row_steps)}


def config_key(lr: float, warmup: str) -> str:
    return f"lr={lr:g},warmup={warmup}"


def next_configs(done: dict[tuple[float, str], float], grid: tuple[float, ...] = LR_GRID) -> list[tuple[float, str]]:
    """The configurations (lr, warmup) to run next, given the mean selection losses of those finished.

    Pure: the same results give the same next step, so workers sharing a folder agree on it.
    """
    lrs = sorted({lr for lr, w in done if w == "short"} | set(grid))
    missing = [(lr, "short") for lr in lrs if (lr, "short") not in done]
    if missing:
        return missing
    short = {lr: done[(lr, "short")] for lr in lrs}
    best = min(short, key=lambda lr: (short[lr], lr))
    low, high = min(grid), max(grid)
    if best == lrs[-1] and best < high * 2 ** MAX_EXTEND:
        return [(best * 2, "short")]
    if best == lrs[0] and best > low / 2 ** MAX_EXTEND:
        return [(best / 2, "short")]
    if (best, "long") not in done:
        return [(best, "long")]
    return []


Config = tuple  # (lr, warmup) or (lr, warmup, variant); variant "" = the recipe as it is


def _full(c: Config) -> tuple[float, str, str]:
    return (c[0], c[1], c[2] if len(c) > 2 else "")


def choose(done: dict[Config, float]) -> tuple[float, str, str]:
    """The configuration with the lowest mean selection loss (ties: the smaller LR, short warmup, no variant)."""
    best = min(done, key=lambda c: (done[c], _full(c)[0], _full(c)[1] != "short", _full(c)[2]))
    return _full(best)


def at_edge(done: dict[Config, float]) -> bool:
    """The chosen LR is the grid's smallest or largest (the extension limit was reached)."""
    lrs = sorted({c[0] for c in done})
    return choose(done)[0] in (lrs[0], lrs[-1])


def tune(rows: list[Any], seeds: list[int], make_sweep: Callable[[list[Run]], Sweep], ledger: Ledger,
         collect: Callable[[Sweep, Ledger], dict], evals: int, grid: tuple[float, ...] = LR_GRID,
         progress: bool = True, rerun_stale: bool = False, poll_s: float = 30.0, record_only: bool = False,
         on_trials: Callable[[dict], None] | None = None,
         variants: dict[str, dict[str, dict[str, Any]]] | None = None) -> dict[str, Any] | None:
    """Run the protocol for every row; return ``{row: {"chosen", "overrides", "trials", ...}}``.

    ``record_only``: run nothing; record the finished runs in the ledger and return None if the protocol
    is not complete (so a session can end mid-way and the next go on from the ledger). ``on_trials``
    gets ``{row: {(lr, warmup, variant): {seed: loss}}}`` after every round (and at a record-only stop).
    ``variants``: ``{row: {name: overrides}}`` tried at each row's best LR and warmup (phase 3)."""
    from steptitan.recipe import recipe_from_dict
    from steptitan.experiments.spec import resolved_recipe

    schedule = {}
    for row in rows:
        probe = Run("probe", {}, row.overrides, recipe=row.path, base_dir=Path.cwd())
        schedule[row.name] = recipe_from_dict(resolved_recipe(probe)).training.lr_schedule
    variants = variants or {}
    done: dict[str, dict[tuple[float, str, str], dict[int, float]]] = {row.name: {} for row in rows}

    def hparams(row: Any, lr: float, warmup: str, variant: str = "") -> dict[str, Any]:
        return {"training.lr": lr, **warmup_overrides(row.steps, schedule[row.name], warmup),
                **(variants.get(row.name, {})[variant] if variant else {})}

    def next_of(row: Any) -> list[tuple[float, str, str]]:
        means = {c: statistics.fmean(v.values()) for c, v in done[row.name].items() if len(v) == len(seeds)}
        base = {c[:2]: m for c, m in means.items() if not c[2]}
        todo = [(lr, w, "") for lr, w in next_configs(base, grid)]
        if todo or not base:
            return todo
        lr, warmup, _ = choose(base)
        return [(lr, warmup, v) for v in variants.get(row.name, {}) if (lr, warmup, v) not in means]

    while True:
        round_runs = []
        for row in rows:
            for lr, warmup, variant in next_of(row):
                label = f"{row.name},{config_key(lr, warmup)}" + (f",variant={variant}" if variant else "")
                for seed in seeds:
                    round_runs.append(row.run("tune", seed, hparams(row, lr, warmup, variant), evals, label=label))
        if not round_runs:
            break
        sweep = make_sweep(round_runs)
        while True:
            if not record_only:
                result = runner.run_sweep(sweep, progress=progress, rerun_stale=rerun_stale)
                if result["failed"]:
                    names = ", ".join(run.name for run, _ in result["failed"])
                    raise RuntimeError(f"tuning runs failed: {names}; see their logs under {sweep.output_dir}")
            finished = collect(sweep, ledger)
            ledger.save()  # after every look: a session may end before the round does
            if sum(len(v) for v in finished.values()) == len(round_runs):
                break
            if record_only:
                _absorb(done, finished)
                if on_trials:
                    on_trials(done)
                return None
            time.sleep(poll_s)  # runs held by another worker sharing the folder
        _absorb(done, finished)
        if on_trials:
            on_trials(done)
    out = {}
    for row in rows:
        means = {c: statistics.fmean(v.values()) for c, v in done[row.name].items()}
        lr, warmup, variant = choose(means)
        out[row.name] = {
            "chosen": {"lr": lr, "warmup": warmup, "variant": variant}, "overrides": hparams(row, lr, warmup, variant),
            "variants": variants.get(row.name, {}),
            "lr_schedule": schedule[row.name], "at_edge": at_edge(means), "n_configs": len(means),
            "n_runs": sum(len(v) for v in done[row.name].values()), "seeds": seeds,
            "trials": [{"lr": c[0], "warmup": c[1], "variant": c[2], "losses": {str(s): x for s, x in sorted(v.items())},
                        "mean": statistics.fmean(v.values())} for c, v in sorted(done[row.name].items())],
        }
    return out


def _absorb(done: dict[str, dict], finished: dict[str, dict]) -> None:
    """Add finished tuning runs ({"row,lr=..,warmup=..": {seed: summary}}) to ``done``."""
    for label, by_seed in finished.items():
        name, lr_part, warm_part, *rest = label.split(",")
        cfg = (float(lr_part.split("=")[1]), warm_part.split("=")[1], rest[0].split("=", 1)[1] if rest else "")
        for seed, summary in by_seed.items():
            done[name].setdefault(cfg, {})[int(seed)] = summary["final_val_loss"]


def trials_table(done: dict[str, dict[tuple[float, str, str], dict[int, float]]]) -> list[str]:
    """Markdown: every finished trial (row, LR, warmup, selection seeds, mean selection loss), the best per
    row marked. Selection-slice losses: a record of the choices, never a reported result."""
    lines = ["| row | LR | warmup | variant | selection losses by seed | mean | |", "|---|---|---|---|---|---|---|"]
    for name, trials in done.items():
        complete = {c: v for c, v in trials.items() if v}
        best = min(complete, key=lambda c: (statistics.fmean(complete[c].values()), c[0])) if complete else None
        for (lr, warmup, variant), losses in sorted(complete.items()):
            by_seed = ", ".join(f"{s}: {x:.4f}" for s, x in sorted(losses.items()))
            mark = "best so far" if (lr, warmup, variant) == best else ""
            lines.append(f"| {name} | {lr_label(lr)} | {warmup} | {variant or '-'} | {by_seed} | "
                         f"{statistics.fmean(losses.values()):.4f} | {mark} |")
    return lines


def read_variants(path: str | None) -> dict[str, dict[str, dict[str, Any]]]:
    """``--tune-variants``: ``{row: {name: {dotted key: value}}}`` from a TOML file ({} without one)."""
    if not path:
        return {}
    import tomllib

    data = tomllib.loads(Path(path).read_text())
    for row, named in data.items():
        if not isinstance(named, dict) or not all(isinstance(v, dict) for v in named.values()):
            raise ValueError(f"{path}: [{row}] must hold NAME = {{ 'dotted.key' = value }} tables")
        for name in named:
            if "," in name or "=" in name:
                raise ValueError(f"{path}: variant name {name!r} may not contain ',' or '='")
    return data


def read_tuned(path: Path) -> dict[str, Any]:
    """The tuning file's rows ({} when there is none)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("rows", {})


def write_tuned(path: Path, rows: dict[str, Any], meta: dict[str, Any]) -> None:
    """Merge ``rows`` into the tuning file (other rows kept), atomically."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    data = {**old, **meta, "rows": {**old.get("rows", {}), **rows}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def lr_label(lr: float) -> str:
    """1e-3 multiples as the issue writes them: 0.004 -> '4e-3'."""
    k = lr / 1e-3
    return f"{k:g}e-3" if math.isclose(k, round(k, 3)) else f"{lr:g}"
