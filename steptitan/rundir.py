"""The run folder's safety rules: one live run per folder (a lock), what may be reused, resumed or deleted.

Layout of ``<output_dir>`` (everything steptitan writes there)::

    .steptitan.lock       flock'ed by rank 0 for the run's lifetime; holds pid, host, start time
    .steptitan-run.json   the run marker: written at run start, status "running" -> "finished"
    recipe.json           the resolved recipe (tools/export_hf.py, tools/sweep.py rebuild the model from it)
    checkpoints/ tb/ summary.json

Rules (docs/reliability.md section 6), all checked before any process group starts:

* a folder with the marker but no checkpoint (an attempt that stopped early,
  e.g. on a data error) starts afresh;
* a finished run (summary.json exists and the marker says finished, or there is no marker:
  a folder of an older steptitan) is left untouched:
  ``finished_message`` makes every rank stop at once with "already finished";
* a second launch into a folder whose lock is held is refused at once, naming the holder;
  both are checked from the raw recipe before the heavy imports too (steptitan/run_lock.py);
* ``overwrite=true`` deletes only what steptitan wrote: a folder with the marker or
  with nothing but steptitan's layout; anything else is refused;
* resuming (``auto`` or an explicit ``checkpoint.resume=<path>``) requires the
  checkpoint's plan fingerprint to match this recipe's plan.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from steptitan.checkpoint import checkpoint_problem, list_checkpoints, newest_intact, read_checkpoint
from steptitan.plan import StagePlan, plan_fingerprint
from steptitan.recipe import Recipe, to_dict
# The lock and the finished marker need no torch: a launch is refused from them before the heavy imports.
from steptitan.run_lock import LOCK_NAME, MARKER_NAME, RunDirError, RunLock, finished_text, read_marker
from steptitan.run_lock import now as _now

# Names steptitan writes into a run folder (a folder holding only these is a steptitan run folder).
LAYOUT = {LOCK_NAME, MARKER_NAME, "recipe.json", "checkpoints", "tb", "wandb", "summary.json", "summary.json.tmp"}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def finished_message(recipe: Recipe) -> str | None:
    """"already finished" text when the run folder holds this finished run (and overwrite is off), else None
    (run_lock.finished_text; every rank calls it)."""
    return finished_text(recipe.run_dir, recipe.name, recipe.overwrite, [stage.steps for stage in recipe.stages])


def _foreign_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name not in LAYOUT)


def _delete_run(run_dir: Path) -> None:
    """``overwrite=true``: remove steptitan's own entries (never the lock we hold, never foreign files)."""
    foreign = _foreign_entries(run_dir)
    if read_marker(run_dir) is None and foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise RunDirError(f"overwrite=true refuses to delete {run_dir}: it is not a steptitan run folder "
                          f"(no {MARKER_NAME}, and it holds {shown}); check output_dir=, or delete it yourself")
    for entry in run_dir.iterdir():
        if entry.name in LAYOUT and entry.name != LOCK_NAME:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _check_fingerprint(theirs: str | None, plans: list[StagePlan], what: str) -> None:
    if theirs is not None and theirs != plan_fingerprint(plans):
        raise RunDirError(
            f"{what} holds checkpoints of a different stage plan (shapes, growth, PEFT or freezing differ from "
            f"this recipe's); resuming would load them into the wrong model. Choose another name= / output_dir= "
            f"or checkpoint.resume=, or pass overwrite=true")


def prepare_run_dir(recipe: Recipe, plans: list[StagePlan]) -> RunLock:
    """Rank 0, before the process group: lock the folder, apply the reuse rules, write the marker and recipe.json.

    Returns the held lock (keep it referenced for the run's lifetime).
    """
    run_dir = recipe.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output folder {run_dir} is a file, not a folder; choose another name= / output_dir=")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create output folder {run_dir}: {exc.strerror}; choose another output_dir=") from None
    lock = RunLock(run_dir)  # before looking inside: a second launch must not see a half-deleted folder
    try:
        _apply_reuse_rules(recipe, plans)
        _write_json(run_dir / MARKER_NAME, {"status": "running", "started": _now(), "host": socket.gethostname(),
                                            "pid": os.getpid(), "plan_fingerprint": plan_fingerprint(plans)})
        # The resolved recipe beside the checkpoints: tools/export_hf.py and
        # tools/sweep.py rebuild a run's model from it, even for a dead run.
        (run_dir / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=1))
    except OSError as exc:
        lock.release()
        raise RunDirError(f"cannot write to output folder {run_dir}: {exc}; choose another output_dir=") from None
    except BaseException:
        lock.release()
        raise
    return lock


def _apply_reuse_rules(recipe: Recipe, plans: list[StagePlan]) -> None:
    run_dir = recipe.run_dir
    resume = recipe.checkpoint.resume
    if resume not in ("auto", "never"):  # an explicit checkpoint: validate it and its plan now, not after init
        try:
            info = read_checkpoint(Path(os.path.expanduser(resume)))
        except ValueError as exc:
            raise RunDirError(str(exc)) from None
        _check_fingerprint(info.meta.get("plan_fingerprint"), plans, f"checkpoint.resume={resume!r}")
    if recipe.overwrite:
        _delete_run(run_dir)
        return
    if not [p for p in run_dir.iterdir() if p.name != LOCK_NAME]:
        return
    ckpt_dir = run_dir / "checkpoints"
    has_ckpt = ckpt_dir.is_dir() and any(ckpt_dir.iterdir())
    if not has_ckpt and read_marker(run_dir) is not None and not (run_dir / "summary.json").exists():
        _delete_run(run_dir)  # our own attempt that stopped before its first checkpoint (e.g. a data error)
        return
    if has_ckpt and resume == "auto":
        found = newest_intact(ckpt_dir)
        if found is None and list_checkpoints(ckpt_dir):
            # Starting afresh would prune them as the new run saves: a file system that lost files for a while
            # (NFS, a full disk) must not cost the run. Say what is wrong with each and change nothing.
            problems = "; ".join(f"{info.path.name}: {checkpoint_problem(info)}" for info in list_checkpoints(ckpt_dir))
            raise RunDirError(
                f"every checkpoint in {ckpt_dir} is damaged ({problems}); nothing was changed. Restore the files, "
                f"pass checkpoint.resume=<a good checkpoint folder>, or overwrite=true to start afresh")
        _check_fingerprint(found.meta.get("plan_fingerprint") if found else None, plans, f"output folder {run_dir}")
    elif not (has_ckpt and resume != "never"):
        raise RunDirError(
            f"output folder {run_dir} already holds a run with no checkpoint to resume from; "
            f"choose another name= / output_dir=, or pass overwrite=true"
            if not has_ckpt else
            f"output folder {run_dir} holds checkpoints but checkpoint.resume=never; pass overwrite=true to start afresh"
        )


def mark_finished(run_dir: Path) -> None:
    """Rank 0, after summary.json is written: a re-run of this command now says "already finished"."""
    marker = read_marker(run_dir) or {}
    _write_json(run_dir / MARKER_NAME, {**marker, "status": "finished", "finished": _now()})
