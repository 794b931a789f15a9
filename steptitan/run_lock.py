"""The run folder's lock and finished marker, with the standard library alone (no torch).

A launch into a folder whose lock another run holds, or into a finished run, is refused from the raw
recipe (TOML + overrides) before torch, torchtitan and the stage plans are imported -- seconds, not
the 30-40 s of a full start on a loaded machine (docs/reliability.md section 6). steptitan/rundir.py
builds the rest of the folder rules (reuse, overwrite, resume) on these pieces.

The lock is an exclusive ``flock`` held by rank 0 from ``prepare_run_dir`` to the end of the run.
The early check only *probes* it (``lock_holder``: a shared ``flock`` taken and dropped at once, on an
existing lock file, creating nothing); the real start still takes the exclusive lock, so two launches
racing past the probe are still decided by the lock, exactly as before. ``RunLock`` retries for a
moment before refusing, so a probe that happens to hold its shared lock at that instant never turns
the real start away.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steptitan.recipe import Recipe, run_dir_path
from steptitan.schema import RecipeError

LOCK_NAME = ".steptitan.lock"
MARKER_NAME = ".steptitan-run.json"
# A probe holds its shared lock for microseconds; a run holds its lock for hours. RunLock waits this long
# for a probe to drop it before it calls the folder busy.
PROBE_GRACE_S = 1.0


class RunDirError(RecipeError):
    """The output folder cannot be used; found before any process group starts (exit code 2)."""


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def read_marker(run_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((run_dir / MARKER_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


# --------------------------------------------------------------------------- the lock


def _in_use_message(run_dir: Path, holder: str) -> str:
    try:
        info = json.loads(holder)
        who = f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        who = "a process that has not written its details yet"
    return (f"output folder {run_dir} is in use by another steptitan run ({who}); wait for it "
            f"to finish or stop it, or choose another name= / output_dir=")


class RunLock:
    """An exclusive ``flock`` on ``<run>/.steptitan.lock`` held until the process exits.

    The kernel drops the lock when the holder dies, however it dies, so a
    stale lock file never blocks a later run.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's info stays
        except OSError as exc:
            raise RunDirError(f"cannot write to output folder {run_dir}: {exc.strerror} "
                              f"(is it read-only?); choose another output_dir=") from None
        deadline = time.monotonic() + PROBE_GRACE_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:  # maybe another launch's probe (lock_holder): it lets go at once
                    time.sleep(0.02)
                    continue
                holder = os.pread(self.fd, 4096, 0).decode(errors="replace")
                os.close(self.fd)
                raise RunDirError(_in_use_message(run_dir, holder)) from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now()})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, info.encode(), 0)

    def release(self) -> None:
        os.close(self.fd)  # closing the only descriptor drops the flock


def lock_holder(run_dir: Path) -> str | None:
    """The "in use by another steptitan run (pid ...)" message when a process holds the folder's lock, else None.

    Creates and writes nothing: no lock file (or no folder) means no run holds it. The shared lock
    taken here conflicts only with a run's exclusive one and is dropped at once (see RunLock's grace).
    """
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no such file or folder, or unreadable: prepare_run_dir decides (and says why)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _in_use_message(run_dir, os.pread(fd, 4096, 0).decode(errors="replace"))
    except OSError:  # a file system without flock: leave it to the real start
        return None
    finally:
        os.close(fd)  # drops the shared lock, if taken
    return None


# --------------------------------------------------------------------------- the finished marker


def finished_text(run_dir: Path, name: str, overwrite: bool, stage_steps: list[int]) -> str | None:
    """"already finished" text when ``run_dir`` holds this finished run (and overwrite is off), else None.

    Every rank calls this (a cheap read): under torchrun every rank must leave
    on its own, since a rank that exits 0 does not make torchrun stop its peers.
    """
    if overwrite or not (run_dir / "summary.json").is_file():
        return None
    marker = read_marker(run_dir)
    # No marker: a folder finished by a steptitan older than the marker (summary.json is written at a run's end
    # only). A marker saying "running" beside a summary.json: a finished run trained on (longer), then stopped.
    if marker is not None and marker.get("status") != "finished":
        return None
    if _stage_steps(run_dir) != stage_steps:
        return None  # the same run asked to train longer (or shorter): resume from its checkpoints instead
    when = (marker or {}).get("finished") or "before its run marker existed"
    return (f"run {name!r} in {run_dir} already finished ({when}); "
            f"summary.json and the logs are left untouched. Pass overwrite=true to train it again from scratch, "
            f"or delete summary.json to re-run its last stage end from the newest checkpoint")


def _stage_steps(run_dir: Path) -> list[int] | None:
    """Steps per stage of the recipe the finished run was trained with (its recipe.json), None if unreadable."""
    try:
        return [int(stage["steps"]) for stage in json.loads((run_dir / "recipe.json").read_text())["stages"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- from the raw recipe


@dataclass(frozen=True)
class RunFolder:
    """What the folder checks need from a recipe: its name, folder, ``overwrite`` and steps per stage."""

    name: str
    run_dir: Path
    overwrite: bool
    stage_steps: list[int]


def run_folder_of(data: dict[str, Any]) -> RunFolder | None:
    """The folder facts of a raw recipe dict (``load_recipe_dict``: TOML + overrides), before validation.

    None when one of them is missing or not of its type: the early checks are then skipped and the
    full validation reports the problem, so nothing is refused here that the typed recipe would not say.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe) if f.name in ("name", "output_dir", "overwrite")}
    values = {key: data.get(key, default) for key, default in defaults.items()}
    if not (isinstance(values["name"], str) and isinstance(values["output_dir"], str)
            and isinstance(values["overwrite"], bool)):
        return None
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        return None
    steps = [s.get("steps") for s in stages]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in steps):
        return None
    try:
        run_dir = run_dir_path(values["name"], values["output_dir"])
    except (KeyError, IndexError, ValueError, AttributeError):  # a bad format string: the full check says so
        return None
    return RunFolder(values["name"], run_dir, values["overwrite"], steps)
