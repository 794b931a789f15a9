"""A refusal costs no full start (issue 23, item 12), with real processes.

``steptitan --help``, ``steptitan <command> --help``, a recipe error found while reading the TOML and
its overrides, a launch into a folder whose lock another process holds, and a launch into a finished
run all end without importing torch or torchtitan (their import is 10-30 s on a loaded 2-core machine).
Each case runs the console script's ``main`` in a fresh interpreter through a small wrapper that
reports which of those modules got imported. The lock is held by a real other process, through the
trainer's own ``RunLock``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO

# Runs steptitan's console script in this interpreter, then writes the heavy modules it imported to $REPORT
# (also when the command leaves through SystemExit, e.g. argparse's --help).
WRAPPER = textwrap.dedent("""
    import json, os, sys
    from steptitan.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    with open(os.environ["REPORT"], "w") as fh:
        json.dump({m: m in sys.modules for m in ("torch", "torchtitan")}, fh)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
""")

HEAVY = {"torch": True, "torchtitan": True}


def steptitan(tmp: Path, *argv: str, timeout: float = 300) -> tuple[int, str, dict[str, bool] | None]:
    """(exit code, stdout + stderr, {"torch": imported?, "torchtitan": imported?} or None when the
    process left without the wrapper's report, e.g. through the launcher's os._exit)."""
    wrapper, report = tmp / "wrapper.py", tmp / f"report-{time.monotonic_ns()}.json"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPORT": str(report)}
    proc = subprocess.run([sys.executable, str(wrapper), *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    imported = json.loads(report.read_text()) if report.is_file() else None
    return proc.returncode, proc.stdout + proc.stderr, imported


def nothing_heavy(imported: dict[str, bool] | None) -> bool:
    return imported == {"torch": False, "torchtitan": False}


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- --help


COMMANDS = ["train", "prepare", "plan", "sweep", "bench", "paired", "eval", "generate", "export"]


def test_export_cli_offers_the_dtypes_export_writes():
    from steptitan.export import DTYPES
    from steptitan.export_cli import DTYPE_NAMES

    assert sorted(DTYPE_NAMES) == sorted(DTYPES)


def test_steptitan_help_imports_neither_torch_nor_torchtitan(tmp_path):
    code, out, imported = steptitan(tmp_path, "--help")
    assert code == 0 and "commands:" in out, out[-2000:]
    assert nothing_heavy(imported), imported


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_imports_neither_torch_nor_torchtitan(tmp_path, command):
    code, out, imported = steptitan(tmp_path, command, "--help")
    assert code == 0 and f"steptitan {command}" in out and "Traceback" not in out, out[-2000:]
    assert nothing_heavy(imported), (command, imported)


# --------------------------------------------------------------------------- recipe errors


def _bad_toml(tmp: Path) -> str:
    (tmp / "bad.toml").write_text("name = 'x'\n[model\ndim = 64\n")
    return str(tmp / "bad.toml")


RECIPE_ERRORS = {
    "missing file": (lambda tmp: [str(tmp / "no-such.toml")], "does not exist"),
    "not TOML": (lambda tmp: [_bad_toml(tmp)], "not valid TOML"),
    "override without =": (lambda tmp: ["recipes/step.toml", "training.lr"], "expected key=value"),
    "override past the stages": (lambda tmp: ["recipes/step.toml", "stages.5.steps=3"], "there is no stages.5"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_ERRORS))
def test_a_recipe_error_is_one_message_without_torch(tmp_path, case):
    args, said = RECIPE_ERRORS[case]
    code, out, imported = steptitan(tmp_path, "train", *args(tmp_path), f"output_dir={tmp_path / 'run'}")
    errors = [line for line in out.splitlines() if line.startswith("steptitan: error:")]
    assert code == 2 and len(errors) == 1 and said in errors[0] and "Traceback" not in out, out[-2000:]
    assert nothing_heavy(imported), imported
    assert not (tmp_path / "run").exists()  # nothing written


# --------------------------------------------------------------------------- a locked folder


# Holds the output folder's lock exactly as a running trainer does (rank 0's RunLock, kept for the
# process's lifetime), says so on stdout, and keeps it until its stdin closes.
HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    try:
        from steptitan.run_lock import RunLock  # what rundir.prepare_run_dir takes, without torch
    except ImportError:  # the code before run_lock.py existed
        from steptitan.rundir import RunLock
    lock = RunLock(Path(sys.argv[1]))
    print("holding", flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def held_folder(tmp_path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield run_dir, holder.pid
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=120)
        except subprocess.TimeoutExpired:  # a very loaded machine: the lock goes with the process anyway
            holder.kill()
            holder.wait()


@pytest.mark.parametrize("launcher", [[], ["--nproc-per-node", "2"]], ids=["one-process", "nproc-per-node"])
def test_a_launch_into_a_locked_folder_is_refused_before_torch(tmp_path, held_folder, launcher):
    run_dir, holder_pid = held_folder
    before = tree(run_dir)
    t0 = time.monotonic()
    code, out, imported = steptitan(tmp_path, "train", "recipes/step.toml", f"output_dir={run_dir}", *launcher)
    elapsed = time.monotonic() - t0
    errors = [line for line in out.splitlines() if line.startswith("steptitan: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert f"is in use by another steptitan run (pid {holder_pid} on host" in errors[0], out[-3000:]
    assert nothing_heavy(imported), imported
    assert tree(run_dir) == before  # the holder's lock file is untouched, nothing else written
    print(f"refused after {elapsed:.1f}s")


# --------------------------------------------------------------------------- a finished run


def finished_run(run_dir: Path, steps: list[int], marker: bool = True) -> None:
    """A run folder as a finished run leaves it (docs/reliability.md section 6): summary.json, recipe.json
    with the stages' steps, the run marker saying "finished", a checkpoint and a lock file nobody holds."""
    (run_dir / "checkpoints" / "stage01-step000004").mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"stages": []}))
    (run_dir / "recipe.json").write_text(json.dumps({"name": "step", "stages": [{"steps": s} for s in steps]}))
    (run_dir / ".steptitan.lock").write_text(json.dumps({"pid": 1, "host": "h", "started": "then"}))
    if marker:
        (run_dir / ".steptitan-run.json").write_text(json.dumps({"status": "finished", "finished": "2026-01-01T00:00:00"}))


@pytest.mark.parametrize("marker", [True, False], ids=["marker", "before-the-marker"])
def test_a_finished_run_is_left_alone_before_torch(tmp_path, marker):
    run_dir = tmp_path / "done"
    finished_run(run_dir, [3, 4], marker)
    before = tree(run_dir)
    code, out, imported = steptitan(tmp_path, "train", "recipes/step.toml", f"output_dir={run_dir}",
                                    "stages.0.steps=3", "stages.1.steps=4")
    assert code == 0 and "already finished" in out and "Traceback" not in out, out[-3000:]
    assert nothing_heavy(imported), imported
    assert tree(run_dir) == before


def test_a_finished_run_is_left_alone_through_the_launcher(tmp_path):
    run_dir = tmp_path / "done"
    finished_run(run_dir, [3, 4])
    before = tree(run_dir)
    code, out, imported = steptitan(tmp_path, "train", "recipes/step.toml", f"output_dir={run_dir}",
                                    "stages.0.steps=3", "stages.1.steps=4", "--nproc-per-node=2")
    assert code == 0 and out.count("already finished") == 1, out[-3000:]
    assert nothing_heavy(imported), imported
    assert tree(run_dir) == before


# --------------------------------------------------------------------------- the pieces (steptitan/run_lock.py)


def test_the_run_folder_is_read_from_the_raw_recipe_with_the_loaders_overrides(tmp_path):
    from steptitan.recipe import load_recipe_dict
    from steptitan.run_lock import run_folder_of

    raw = load_recipe_dict(REPO / "recipes/step.toml", ["name=abc", f"output_dir={tmp_path}/{{name}}/x",
                                                        "stages.1.steps=7", "overwrite=true"])
    folder = run_folder_of(raw)
    assert (folder.name, folder.run_dir, folder.overwrite, folder.stage_steps) == ("abc", tmp_path / "abc" / "x", True, [60, 7])
    # recipes/step.toml's own folder; the Recipe defaults when the TOML leaves a key out
    assert run_folder_of(load_recipe_dict(REPO / "recipes/step.toml")).run_dir == Path("runs/step")
    (tmp_path / "bare.toml").write_text("[[stages]]\nsteps = 5\n")
    bare = run_folder_of(load_recipe_dict(tmp_path / "bare.toml"))
    assert (bare.name, bare.run_dir, bare.overwrite, bare.stage_steps) == ("run", Path("runs/run"), False, [5])
    assert run_folder_of(load_recipe_dict(tmp_path / "bare.toml", ["output_dir=~/r"])).run_dir == Path.home() / "r"


@pytest.mark.parametrize("override", ["name=5", "overwrite=[1]", "stages.0.steps=1.5", "stages.0.steps=true",
                                      "output_dir={nope}", "stages=[]", "stages=3"])
def test_a_raw_value_of_the_wrong_type_leaves_the_decision_to_the_full_validation(override):
    from steptitan.recipe import load_recipe_dict
    from steptitan.run_lock import run_folder_of

    assert run_folder_of(load_recipe_dict(REPO / "recipes/step.toml", [override])) is None


def test_the_lock_probe_names_a_real_holder_and_creates_nothing(tmp_path, held_folder):
    from steptitan.run_lock import LOCK_NAME, lock_holder

    run_dir, holder_pid = held_folder
    said = lock_holder(run_dir)
    assert said is not None and f"in use by another steptitan run (pid {holder_pid} on host" in said
    assert lock_holder(tmp_path / "nowhere") is None and not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    assert lock_holder(tmp_path / "empty") is None and not (tmp_path / "empty" / LOCK_NAME).exists()


# Takes the probe's shared lock on the folder's lock file, says so, holds it for argv[2] seconds.
PROBER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(os.path.join(sys.argv[1], ".steptitan.lock"), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    print("probing", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_a_probe_at_the_moment_a_run_starts_does_not_turn_the_run_away(tmp_path):
    """Two launches racing: the second's probe holds its shared lock just when the first takes the real lock.
    The first must still get the lock (RunLock waits out a probe), and then hold it: the prober is refused."""
    from steptitan.run_lock import PROBE_GRACE_S, RunLock, lock_holder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".steptitan.lock").write_text("")
    probe_s = PROBE_GRACE_S / 4
    prober = subprocess.Popen([sys.executable, "-c", PROBER, str(run_dir), str(probe_s)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert prober.stdout.readline().strip() == "probing"
        t0 = time.monotonic()
        lock = RunLock(run_dir)  # raises RunDirError if the probe turned it away
        waited = time.monotonic() - t0
    finally:
        prober.wait(timeout=60)
    try:
        assert waited < PROBE_GRACE_S
        assert f"(pid {os.getpid()} on host" in lock_holder_from_another_process(run_dir)
    finally:
        lock.release()
    assert lock_holder(run_dir) is None


def lock_holder_from_another_process(run_dir: Path) -> str:
    code = "import sys; from pathlib import Path; from steptitan.run_lock import lock_holder; print(lock_holder(Path(sys.argv[1])))"
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, check=True,
                          timeout=120).stdout
