"""The benchmark's results ledger: a small JSON file of every finished run's results, kept in the repo.

Run folders (checkpoints, TensorBoard files, logs) are large and live outside the checkout; when
they are gone, the report can still be rebuilt from the ledger. An entry is used only for a run
whose resolved recipe is the one the ledger recorded (``result_key``: the recipe without its output
folder, plus the process count), so an entry can never stand in for a different run. Each entry
keeps the commit it was recorded at and the time, which the report states.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from steptitan.experiments.spec import Run, Sweep, recipe_toml, resolved_recipe

FORMAT = 1


def result_key(sweep: Sweep, run: Run) -> str:
    """What makes a run's results these results: its resolved recipe minus the output folder, and nproc."""
    data = resolved_recipe(run)
    data.pop("output_dir", None)
    text = recipe_toml(data) + f"\0nproc={sweep.nproc}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Ledger:
    """``{"format": 1, "runs": {"<sweep>/<run>": {"key", "result", "commit", "recorded"}}}``."""

    def __init__(self, path: Path | None):
        self.path = path
        self.runs: dict[str, dict[str, Any]] = {}
        self.used: list[str] = []  # entries that stood in for a missing run folder (the report says so)
        if path is not None and path.is_file():
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"{path}: ledger format {data.get('format')!r}, expected {FORMAT}")
            self.runs = data["runs"]
        self._commit: str | None = None

    def record(self, sweep: Sweep, run: Run, result: dict[str, Any]) -> None:
        """Remember a finished run's result (replacing an older entry of the same name)."""
        name = f"{sweep.name}/{run.name}"
        key = result_key(sweep, run)
        old = self.runs.get(name)
        if old is not None and old["key"] == key and old["result"] == result:
            return
        if self._commit is None:
            self._commit = _commit()
        self.runs[name] = {"key": key, "commit": self._commit, "recorded": time.strftime("%Y-%m-%d %H:%M"),
                           "result": result}

    def lookup(self, sweep: Sweep, run: Run) -> dict[str, Any] | None:
        """The recorded result of this exact run, or None (no entry, or one made with another recipe)."""
        name = f"{sweep.name}/{run.name}"
        entry = self.runs.get(name)
        if entry is None or entry["key"] != result_key(sweep, run):
            return None
        self.used.append(f"{name} (recorded {entry['recorded']} at {entry['commit']})")
        return entry["result"]

    def save(self) -> None:
        """Write the ledger, merged with what other workers sharing the file recorded meanwhile (under a lock;
        this process's entries win), through a private temporary file and one rename."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                on_disk = json.loads(self.path.read_text()).get("runs", {})
                self.runs = {**on_disk, **self.runs}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": FORMAT, "runs": dict(sorted(self.runs.items()))}, indent=1,
                                      default=float) + "\n")
            os.replace(tmp, self.path)
