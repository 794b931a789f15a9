#!/usr/bin/env python
"""Run a sweep of steptitan recipes: every combination of some recipe keys, one torchrun at a time.

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

``python tools/sweep.py SWEEP.toml`` runs every run that has not finished, one at a
time, each in ``<out>/<run name>/`` (the name is built from the run's axis values,
hydra style: ``position=upper,seed=0``). It is resumable: finished runs (a
``summary.json``) are skipped, a run that died is started again with the same
command, which resumes from its newest checkpoint (``checkpoint.resume=auto``), or
from scratch when it had none. A failing run does not stop the sweep; failures are
listed at the end with the tail of their logs (``<out>/_logs/<run>.log``). At the
end ``results.csv``, ``results.md``, ``loss_curves.png`` and ``<metric>_by_axis.png``
are written to ``<out>`` (and ``--report-dir``).

``--write-commands FILE`` writes one launch command per run instead of running
them (``--template`` wraps each, e.g. an ``sbatch --wrap`` line). See docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODES = ("grid", "zip")
SWEEP_KEYS = {"name", "recipe", "nproc", "mode", "seeds", "metric", "output_dir", "template", "set", "axes", "when", "runs",
              "torchrun_args"}
LOG_TAIL_LINES = 25


class SweepError(ValueError):
    """The sweep file is invalid; the message says what and where."""


# --------------------------------------------------------------------------- the sweep file


@dataclass
class Run:
    """One run of the sweep: its name, its values on the axes, and the full override list."""

    name: str
    values: dict[str, Any]  # axis key (and "training.seed") -> value; what names the run
    overrides: dict[str, Any]  # every dotted key this run sets (base set + axes + when + run set)
    label: str = ""

    def override_args(self) -> list[str]:
        return [f"{k}={format_value(v)}" for k, v in self.overrides.items()]


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
    runs: list[Run] = field(default_factory=list)


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


def format_value(value: Any) -> str:
    """The override text that OmegaConf parses back to ``value`` (checked, not assumed)."""
    from steptitan.recipe import parse_overrides

    if isinstance(value, str):
        text = value
        if _parses_to(text, value, parse_overrides):
            return text
    text = _yaml_flow(value)
    if not _parses_to(text, value, parse_overrides):
        raise SweepError(f"value {value!r} cannot be written as a key=value override")
    return text


def _yaml_flow(value: Any) -> str:
    """YAML flow syntax (what OmegaConf parses override values with); strings double-quoted, escaped."""
    if isinstance(value, str):
        # printable ASCII stays; everything else as \UXXXXXXXX (YAML double-quoted escapes)
        return '"' + "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else
                             ("\\" + c if c in '"\\' else f"\\U{ord(c):08x}") for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml_flow(str(k))}: {_yaml_flow(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _parses_to(text: str, value: Any, parse_overrides) -> bool:
    try:
        ((_, parsed),) = parse_overrides([f"k={text}"])
    except Exception:
        return False
    return parsed == value and type(parsed) is type(value)


def _short_keys(keys: list[str]) -> dict[str, str]:
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


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def run_name(values: dict[str, Any], label: str = "") -> str:
    """Folder name from the axis values, hydra style: ``position=upper,rank=8,seed=0``."""
    short = _short_keys(list(values))
    parts = ([label] if label else []) + [f"{short[k]}={_value_text(v)}" for k, v in values.items()]
    name = ",".join(parts) or "base"
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > 120:  # file systems cap names at 255 bytes; keep it readable and unique
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def _resolve_recipe(raw: str, sweep_path: Path) -> Path:
    for base in (sweep_path.parent, Path.cwd(), REPO):
        candidate = (base / raw).resolve()
        if candidate.is_file():
            return candidate
    raise SweepError(f"{sweep_path}: recipe {raw!r} not found (looked beside the sweep file, in the working directory and the repo)")


def load_sweep(path: str | os.PathLike, output_dir: str | None = None) -> Sweep:
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
    out = output_dir or data.get("output_dir") or f"runs/sweeps/{name}"
    sweep = Sweep(
        name=name, path=path.resolve(), recipe=_resolve_recipe(str(data["recipe"]), path), nproc=nproc, mode=mode,
        seeds=list(seeds), metric=str(data.get("metric", "final_val_loss")), output_dir=Path(out).resolve(),
        template=str(data.get("template", "{command}")), torchrun_args=[str(a) for a in data.get("torchrun_args", [])],
        axes=axes,
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
        runs.append(Run(run_name(values, label), values, overrides, label))
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"{sweep.path}: several runs would share the folder name(s) {dupes}; give explicit runs distinct labels")
    return runs


# --------------------------------------------------------------------------- run state on disk


def run_dir(sweep: Sweep, run: Run) -> Path:
    return sweep.output_dir / run.name


def logs_dir(sweep: Sweep) -> Path:
    return sweep.output_dir / "_logs"


def read_state(sweep: Sweep, run: Run) -> dict[str, Any]:
    path = logs_dir(sweep) / f"{run.name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_state(sweep: Sweep, run: Run, state: dict[str, Any]) -> None:
    path = logs_dir(sweep) / f"{run.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def run_fingerprint(sweep: Sweep, run: Run) -> str:
    """What makes a run this run: the base recipe's text and every override (names show only the axes)."""
    text = sweep.recipe.read_text() + "\0" + "\0".join(run.override_args()) + f"\0nproc={sweep.nproc}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_status(sweep: Sweep, run: Run) -> str:
    """finished | stale (finished with another recipe/overrides) | resume (has a checkpoint) | restart (died before one) | new."""
    folder = run_dir(sweep, run)
    recorded = read_state(sweep, run).get("fingerprint")
    if folder.exists() and recorded and recorded != run_fingerprint(sweep, run):
        return "stale"
    if (folder / "summary.json").is_file():
        return "finished"
    ckpts = folder / "checkpoints"
    if ckpts.is_dir() and any((c / "meta.json").is_file() for c in ckpts.iterdir()):
        return "resume"
    if folder.exists() and any(folder.iterdir()):
        return "restart"
    return "new"


def repo_path(path: Path) -> str:
    """A path relative to the repo root when inside it (commands run from the repo root), else absolute."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def launch_command(sweep: Sweep, run: Run, status: str = "new", python: str | None = None) -> list[str]:
    """``torchrun --standalone`` (a free rendezvous port per run) with the run's overrides; run from the repo root."""
    launcher = [python, "-m", "torch.distributed.run"] if python else ["torchrun"]
    args = [*launcher, "--standalone", f"--nproc_per_node={sweep.nproc}", *sweep.torchrun_args,
            "-m", "steptitan.train", repo_path(sweep.recipe), *run.override_args(),
            f"output_dir={format_value(repo_path(run_dir(sweep, run)))}"]
    if status in ("restart", "stale"):  # nothing (valid) to resume: start afresh
        args.append("overwrite=true")
    return args


def validate_run(sweep: Sweep, run: Run) -> str | None:
    """Recipe + plan checks in this process (no data, no processes): a typo fails fast, not after a launch."""
    from steptitan.plan import build_plan
    from steptitan.recipe import RecipeError, load_recipe

    try:
        build_plan(load_recipe(sweep.recipe, run.override_args()))
    except RecipeError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------- running


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the sweep dies (even by SIGKILL); torchrun then stops its workers."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(pgid: int, grace_s: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM a run's process group, then SIGKILL what is left after ``grace_s``.

    ``proc`` (the group leader, our child) is polled so it is reaped: a zombie
    still counts as a member of its group.
    """
    if not _group_alive(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class SweepLock:
    """One sweep process per output folder; a stale lock (dead pid) is taken over."""

    def __init__(self, folder: Path):
        self.path = folder / "sweep.lock"

    def __enter__(self) -> "SweepLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid():
            try:
                os.kill(pid, 0)
                raise SweepError(f"another sweep (pid {pid}) is running in {self.path.parent.parent}; wait for it or kill it")
            except ProcessLookupError:
                pass
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


class Interrupted(Exception):
    pass


def execute(sweep: Sweep, run: Run, status: str, log_path: Path) -> tuple[int, float]:
    """Launch one run, log its output, return (exit code, wall seconds). SIGTERM/SIGINT stop it too."""
    state = read_state(sweep, run)
    old = state.get("pgid")
    if old and _group_alive(old):  # a previous sweep was killed: its run may still be shutting down
        stop_group(old)
    cmd = launch_command(sweep, run, status, python=sys.executable)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {status}: {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
    state.update(pgid=proc.pid, status="running", attempts=state.get("attempts", 0) + 1, command=cmd,
                 fingerprint=run_fingerprint(sweep, run))
    if status == "stale":
        state.update(attempts=1, wall_s=0.0)
    write_state(sweep, run, state)

    def forward(signum, frame):  # stop the run's whole process group, then unwind the sweep
        stop_group(proc.pid, proc=proc)
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    except Interrupted:
        proc.wait()
        state.update(status="interrupted", wall_s=state.get("wall_s", 0.0) + time.perf_counter() - t0, pgid=None)
        write_state(sweep, run, state)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    wall = time.perf_counter() - t0
    state.update(status="finished" if code == 0 else "failed", returncode=code, pgid=None,
                 wall_s=state.get("wall_s", 0.0) + wall)
    write_state(sweep, run, state)
    return code, wall


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def run_sweep(sweep: Sweep, only: list[str] | None = None, progress: bool = True,
              rerun_stale: bool = False) -> dict[str, list[tuple[Run, str]]]:
    """Run every unfinished run once; returns {"skipped", "done", "failed"} lists of (run, detail).

    A stale run (its folder was made with another base recipe or other overrides) is
    an error unless ``rerun_stale``: then it is started again from scratch.
    """
    from tqdm import tqdm

    runs = [r for r in sweep.runs if not only or any(re.search(p, r.name) for p in only)]
    report: dict[str, list[tuple[Run, str]]] = {"skipped": [], "done": [], "failed": []}
    todo = []
    for run in runs:
        status = run_status(sweep, run)
        if status == "finished":
            report["skipped"].append((run, "finished earlier"))
        elif status == "stale" and not rerun_stale:
            raise SweepError(f"run folder {run_dir(sweep, run)} was made with another base recipe or other overrides; "
                             f"pass --rerun-stale to start such runs afresh, or use another --out")
        else:
            todo.append((run, status))
    print(f"sweep {sweep.name}: {len(runs)} runs, {len(report['skipped'])} finished earlier, {len(todo)} to run "
          f"({sweep.nproc} proc(s) each) -> {sweep.output_dir}", flush=True)
    logs_dir(sweep).mkdir(parents=True, exist_ok=True)
    with SweepLock(logs_dir(sweep)):
        bar = tqdm(total=len(todo), unit="run", disable=not progress, dynamic_ncols=True, file=sys.stderr)
        try:
            for run, status in todo:
                bar.set_postfix_str(run.name)
                log_path = logs_dir(sweep) / f"{run.name}.log"
                problem = validate_run(sweep, run)
                if problem is not None:
                    log_path.write_text(f"invalid recipe for this run:\n{problem}\n")
                    write_state(sweep, run, {**read_state(sweep, run), "status": "failed", "returncode": 2})
                    report["failed"].append((run, "invalid recipe"))
                    bar.update(1)
                    continue
                status = run_status(sweep, run)  # recheck: an old run may have finished while we waited
                tqdm.write(f"[{run.name}] {status} ...", file=sys.stderr)
                code, wall = execute(sweep, run, status, log_path)
                if code == 0 and run_status(sweep, run) == "finished":
                    report["done"].append((run, f"{status}, {wall:.1f}s"))
                else:
                    report["failed"].append((run, f"exit code {code}"))
                tqdm.write(f"[{run.name}] {'ok' if code == 0 else f'FAILED (exit {code})'} in {wall:.1f}s", file=sys.stderr)
                bar.update(1)
        finally:
            bar.close()
    return report


def print_report(sweep: Sweep, report: dict[str, list[tuple[Run, str]]]) -> None:
    print(f"sweep {sweep.name}: {len(report['done'])} run now, {len(report['skipped'])} skipped (finished earlier), "
          f"{len(report['failed'])} failed")
    for run, detail in report["failed"]:
        log_path = logs_dir(sweep) / f"{run.name}.log"
        print(f"\n--- FAILED: {run.name} ({detail}); log {log_path}; last lines:")
        print(log_tail(log_path))


# --------------------------------------------------------------------------- results


def stage_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return summary.get("stages", [])


def collect_results(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per run: axis values, status, final val loss/ppl, per-stage peak memory, tokens/s, wall time."""
    rows = []
    for run in sweep.runs:
        row: dict[str, Any] = {"run": run.name}
        if run.label:
            row["label"] = run.label
        row.update(run.values)
        state = read_state(sweep, run)
        path = run_dir(sweep, run) / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else None
        row["status"] = "finished" if summary else state.get("status", "not run")
        if summary:
            stages = stage_rows(summary)
            row["final_val_loss"] = summary.get("final_val_loss")
            row["final_val_ppl"] = summary.get("final_val_ppl")
            for s in stages:
                row[f"stage{s['index']}_val_loss"] = s.get("val_loss")
            for s in stages:
                row[f"stage{s['index']}_peak_model_states_MiB"] = s.get("peak_model_state_bytes", 0) / 2**20
                row[f"stage{s['index']}_peak_rss_MiB"] = s.get("peak_rss_bytes", 0) / 2**20
            train_wall = sum(s.get("wall_s", 0.0) for s in stages)
            tokens = sum(s.get("tokens_per_s", 0.0) * s.get("wall_s", 0.0) for s in stages)
            row["tokens_per_s"] = tokens / train_wall if train_wall else None
            row["train_wall_s"] = train_wall
        row["wall_s"] = state.get("wall_s")  # the whole launch (startup, data, eval, checkpoints) over all attempts
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for k in row:
            if k not in cols:
                cols.append(k)
    return cols


def _fmt(value: Any, column: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if column.endswith(("_MiB", "wall_s")):
            return f"{value:,.1f}"
        if column == "tokens_per_s":
            return f"{value:,.0f}"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    return _value_text(value)


def write_tables(rows: list[dict[str, Any]], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    csv_path, md_path = folder / "results.csv", folder / "results.md"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _value_text(v) if isinstance(v, (dict, list, bool)) else v for k, v in row.items()})
    short = _short_keys([c for c in cols if "." in c])
    header = [short.get(c, c) for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), c) for c in cols) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def read_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one scalar from a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(tb_dir.glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                points[e.step] = e.value  # a resumed run logs some steps twice; keep the last
    return sorted(points.items())


def plot_results(sweep: Sweep, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """loss_curves.png (train loss per run, val loss markers) and <metric>_by_axis.png (bars per axis value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, run in enumerate(sweep.runs):
        tb = run_dir(sweep, run) / "tb"
        loss = read_scalars(tb, "loss")
        if not loss:
            continue
        color = f"C{i % 10}"
        ax.plot(*zip(*loss), color=color, lw=1.2, label=run.name)
        val = read_scalars(tb, "val/loss")
        if val:
            ax.plot(*zip(*val), "o", color=color, ms=5)
    stage = read_scalars(run_dir(sweep, sweep.runs[0]) / "tb", "stage") if sweep.runs else []
    for (s0, v0), (s1, v1) in zip(stage, stage[1:]):
        if v1 != v0:
            ax.axvline(s1, color="grey", ls=":", lw=1)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("training loss (lines), validation loss (dots)")
    ax.set_title(f"sweep {sweep.name}: loss curves")
    if ax.lines:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = folder / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # one panel per axis; explicit runs are grouped by label; seeds alone only if nothing else varies
    axes = list(sweep.axes) + (["label"] if any("label" in r for r in rows) else [])
    axes = axes or (["training.seed"] if sweep.seeds else [])
    metric = sweep.metric
    if axes and any(isinstance(r.get(metric), (int, float)) for r in rows):
        short = _short_keys([a for a in axes])
        fig, axs = plt.subplots(1, len(axes), figsize=(4.5 * len(axes), 4), squeeze=False)
        for ax, key in zip(axs[0], axes):
            groups: dict[str, list[float]] = {}
            for r in rows:
                if isinstance(r.get(metric), (int, float)) and key in r:
                    groups.setdefault(_value_text(r[key]), []).append(float(r[metric]))
            labels = list(groups)
            means = [sum(v) / len(v) for v in groups.values()]
            ax.bar(labels, means, color=[f"C{i}" for i in range(len(labels))], alpha=0.6)
            for i, values in enumerate(groups.values()):  # every run as a dot: the spread over the other axes/seeds
                ax.plot([i] * len(values), values, "k.", ms=6)
            lo, hi = min(min(v) for v in groups.values()), max(max(v) for v in groups.values())
            pad = (hi - lo) * 0.5 or abs(hi) * 0.02 or 0.1
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_xlabel(short.get(key, key))
            ax.set_ylabel(metric)
        fig.suptitle(f"sweep {sweep.name}: {metric}\n(bar = mean, dots = single runs)", fontsize=10)
        fig.tight_layout()
        path = folder / f"{metric}_by_axis.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report_results(sweep: Sweep, extra_dir: Path | None = None) -> list[Path]:
    rows = collect_results(sweep)
    written = []
    for folder in [sweep.output_dir] + ([extra_dir] if extra_dir else []):
        written.extend(write_tables(rows, folder))
        written.extend(plot_results(sweep, rows, folder))
    return written


# --------------------------------------------------------------------------- commands for clusters


def write_commands(sweep: Sweep, path: Path, template: str | None = None) -> int:
    """One line per run: ``template`` with {command}, {command_q} (shell-quoted), {name}, {run_dir}, {nproc}, {index}."""
    template = template or sweep.template
    lines = []
    for i, run in enumerate(sweep.runs):
        command = shlex.join(launch_command(sweep, run))
        lines.append(template.format(command=command, command_q=shlex.quote(command), name=run.name,
                                     run_dir=run_dir(sweep, run), nproc=sweep.nproc, index=i, sweep=sweep.name))
    text = "\n".join(lines) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)
    return len(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="sweep file (TOML)")
    p.add_argument("--out", help="output folder (default: the sweep's output_dir, else runs/sweeps/<name>)")
    p.add_argument("--only", action="append", help="run only runs whose name matches this regex (repeatable)")
    p.add_argument("--list", action="store_true", help="list the runs, their status and overrides; run nothing")
    p.add_argument("--write-commands", metavar="FILE", help="write one launch command per run to FILE ('-' = stdout); run nothing")
    p.add_argument("--template", help="line template for --write-commands, e.g. "
                   "\"sbatch --job-name={name} --wrap={command_q}\" (default: the sweep's template, else {command})")
    p.add_argument("--report-only", action="store_true", help="only (re)write the results table and plots")
    p.add_argument("--report-dir", help="also write the table and plots here (e.g. docs/sweeps/<name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--rerun-stale", action="store_true", help="re-run from scratch runs whose folder was made with "
                   "another base recipe or other overrides (default: stop with an error)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.out)
    except SweepError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for run in sweep.runs:
            print(f"{run_status(sweep, run):<9} {run.name}  {' '.join(run.override_args())}")
        return 0
    if args.write_commands:
        n = write_commands(sweep, Path(args.write_commands), args.template)
        print(f"wrote {n} launch commands to {args.write_commands}", file=sys.stderr)
        return 0
    report_dir = Path(args.report_dir) if args.report_dir else None
    if not args.report_only:
        t0 = time.perf_counter()
        try:
            report = run_sweep(sweep, args.only, progress=not args.no_progress, rerun_stale=args.rerun_stale)
        except Interrupted as exc:
            print(f"sweep: interrupted by {exc}; run the same command again to continue", file=sys.stderr)
            return 130
        except SweepError as exc:
            print(f"sweep: error: {exc}", file=sys.stderr)
            return 2
        print_report(sweep, report)
        print(f"sweep wall time: {time.perf_counter() - t0:.1f}s")
    for path in report_results(sweep, report_dir):
        print(f"wrote {path}")
    if not args.report_only and report["failed"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
