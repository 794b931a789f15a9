"""Launch runs with torchrun from their resolved recipe TOML, one at a time; resume, skip and failure bookkeeping.

Each run of a sweep (or of the benchmark) is a folder ``<out>/<run name>``; its resolved recipe is
``<out>/_recipes/<name>.toml``, its output ``<out>/_logs/<name>.log`` (appended, one ``=====``
header per attempt) and its state ``<out>/_logs/<name>.json``. A run with a ``summary.json`` is
finished and skipped; a run with a checkpoint is launched again and resumes
(``checkpoint.resume=auto``); a run that died before one starts afresh. Training runs with the
sweep file's folder as working directory (docs/sweeps.md, "Paths").
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from steptitan.experiments.spec import (
    Run,
    Sweep,
    SweepError,
    recipe_toml,
    resolved_recipe,
)

LOG_TAIL_LINES = 25
# What steptitan.train prints for a bad recipe, bad data or a stopped run (train.py): the line worth showing.
ERROR_LINE = re.compile(r"^steptitan: error( on rank \d+)?: .*")


def run_dir(sweep: Sweep, run: Run) -> Path:
    return sweep.output_dir / run.name


def logs_dir(sweep: Sweep) -> Path:
    return sweep.output_dir / "_logs"


def recipe_path(sweep: Sweep, run: Run) -> Path:
    return sweep.output_dir / "_recipes" / f"{run.name}.toml"


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


def run_recipe_text(sweep: Sweep, run: Run) -> str:
    """The run's resolved recipe as TOML, its output folder set to the run folder."""
    data = resolved_recipe(run)
    data["output_dir"] = str(run_dir(sweep, run))
    return recipe_toml(data)


def write_run_recipe(sweep: Sweep, run: Run) -> Path:
    path = recipe_path(sweep, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_recipe_text(sweep, run))
    return path


def run_fingerprint(sweep: Sweep, run: Run) -> str:
    """What makes a run this run: its resolved recipe and the number of processes (names show only the axes)."""
    text = run_recipe_text(sweep, run) + f"\0nproc={sweep.nproc}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_status(sweep: Sweep, run: Run) -> str:
    """finished | stale (made with another recipe) | resume (has a checkpoint) | restart (died before one) | new."""
    folder = run_dir(sweep, run)
    recorded = read_state(sweep, run).get("fingerprint")
    if folder.exists() and recorded:
        try:
            if recorded != run_fingerprint(sweep, run):
                return "stale"
        except Exception:  # an invalid recipe has no fingerprint; check_run reports it
            pass
    if (folder / "summary.json").is_file():
        return "finished"
    ckpts = folder / "checkpoints"
    if ckpts.is_dir() and any((c / "meta.json").is_file() for c in ckpts.iterdir()):
        return "resume"
    if folder.exists() and any(folder.iterdir()):
        return "restart"
    return "new"


def launch_command(sweep: Sweep, run: Run, status: str = "new", python: str | None = None) -> list[str]:
    """``torchrun --standalone`` (a free rendezvous port per run) on the run's resolved TOML (absolute paths)."""
    launcher = [python, "-m", "torch.distributed.run"] if python else ["torchrun"]
    args = [*launcher, "--standalone", f"--nproc_per_node={sweep.nproc}", *sweep.torchrun_args,
            "-m", "steptitan.train", str(write_run_recipe(sweep, run))]
    if status in ("restart", "stale"):  # nothing (valid) to resume: start afresh
        args.append("overwrite=true")
    return args


# --------------------------------------------------------------------------- processes


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


class RunClaim:
    """An exclusive ``flock`` on ``_logs/<run>.lock`` while one sweep process works on that run.

    Several sweep (or bench) processes may share one output folder as workers: each skips the
    runs another live process holds. The kernel drops the lock when its holder dies, however it
    dies, so a killed worker never blocks a later one.
    """

    def __init__(self, sweep: Sweep, run: Run):
        import fcntl

        self.path = logs_dir(sweep) / f"{run.name}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = -1
            self.holder = holder
            return
        self.holder = ""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    @property
    def held(self) -> bool:
        return self.fd >= 0

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1


class Interrupted(Exception):
    pass


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def execute(sweep: Sweep, run: Run, status: str, log_path: Path) -> tuple[int, float]:
    """Launch one run, log its output, return (exit code, wall seconds). SIGTERM/SIGINT stop it too."""
    state = read_state(sweep, run)
    old = state.get("pgid")
    if old and _group_alive(old):  # a previous sweep was killed: its run may still be shutting down
        stop_group(old)
    cmd = launch_command(sweep, run, status, python=sys.executable)
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {status} (in {sweep.workdir}): {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=sweep.workdir, env=child_env(),
                                start_new_session=True, preexec_fn=_die_with_parent)
    state.update(pgid=proc.pid, status="running", attempts=state.get("attempts", 0) + 1, command=cmd,
                 fingerprint=run_fingerprint(sweep, run))
    if status == "stale":
        state.update(attempts=1, wall_s=0.0)
    write_state(sweep, run, state)

    def forward(signum, frame):  # say so at once (stopping takes up to 30 s), stop the run's group, unwind
        name = signal.Signals(signum).name
        print(f"\nsweep: {name} received, stopping: ending run {run.name} (its checkpoints are kept), then exiting",
              file=sys.stderr, flush=True)
        stop_group(proc.pid, proc=proc)
        raise Interrupted(name)

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
    if code != 0:
        state["error"] = error_lines(log_path)
    write_state(sweep, run, state)
    return code, wall


def run_logged(cmd: list[str], log_path: Path, cwd: Path) -> tuple[int, float]:
    """One plain launch (the benchmark's throughput runs): output to ``log_path``; (exit code, wall seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=child_env()).returncode
    return code, time.perf_counter() - t0


# --------------------------------------------------------------------------- failures


def last_attempt(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text.rsplit("\n===== ", 1)[-1]


def error_lines(path: Path) -> str:
    """The ``steptitan: error:`` lines of a log's last attempt (each once), or "" when it has none."""
    found: list[str] = []
    for line in last_attempt(path).splitlines():
        m = ERROR_LINE.search(line.strip())
        if m and m.group(0) not in found:
            found.append(m.group(0))
    return "\n".join(found)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = last_attempt(path).rstrip().splitlines()
    return "\n".join(text[-lines:]) if text else "(no log)"


def failure_text(path: Path) -> str:
    """What to show for a failed run: its ``steptitan: error:`` lines, else the tail of its log."""
    return error_lines(path) or log_tail(path)


def run_sweep(sweep: Sweep, only: list[str] | None = None, progress: bool = True,
              rerun_stale: bool = False) -> dict[str, list[tuple[Run, str]]]:
    """Run every unfinished run once; returns {"skipped", "done", "failed"} lists of (run, detail).

    A stale run (its folder was made with another recipe) is an error unless ``rerun_stale``: then it
    is started again from scratch.
    """
    from tqdm import tqdm

    from steptitan.experiments.spec import check_run

    runs = [r for r in sweep.runs if not only or any(re.search(p, r.name) for p in only)]
    report: dict[str, list[tuple[Run, str]]] = {"skipped": [], "done": [], "failed": []}
    todo = []
    for run in runs:
        status = run_status(sweep, run)
        if status == "finished":
            report["skipped"].append((run, "finished earlier"))
        elif status == "stale" and not rerun_stale:
            raise SweepError(f"run folder {run_dir(sweep, run)} was made with another recipe (base recipe, overrides "
                             f"or process count); pass --rerun-stale to start such runs afresh, or use another --out")
        else:
            todo.append((run, status))
    print(f"sweep {sweep.name}: {len(runs)} runs, {len(report['skipped'])} finished earlier, {len(todo)} to run "
          f"({sweep.nproc} proc(s) each) -> {sweep.output_dir}", flush=True)
    logs_dir(sweep).mkdir(parents=True, exist_ok=True)
    # Runs are claimed one at a time (RunClaim), so other sweep processes may share this folder.
    bar = tqdm(total=len(todo), unit="run", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    try:
        for run, status in todo:
            bar.set_postfix_str(run.name)
            log_path = logs_dir(sweep) / f"{run.name}.log"
            problem = check_run(run)
            if problem is not None:
                with open(log_path, "a") as log:
                    log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} not launched\n"
                              f"invalid recipe for this run:\n{problem}\n")
                write_state(sweep, run, {**read_state(sweep, run), "status": "failed", "returncode": 2,
                                         "error": problem})
                report["failed"].append((run, "invalid recipe"))
                bar.update(1)
                continue
            claim = RunClaim(sweep, run)
            if not claim.held:
                report["skipped"].append((run, f"running in another sweep process (pid {claim.holder})"))
                tqdm.write(f"[{run.name}] skipped: another sweep process (pid {claim.holder}) runs it", file=sys.stderr)
                bar.update(1)
                continue
            try:
                status = run_status(sweep, run)  # recheck: another worker may have finished it meanwhile
                if status == "finished":
                    report["skipped"].append((run, "finished by another sweep process"))
                    bar.update(1)
                    continue
                tqdm.write(f"[{run.name}] {status} ...", file=sys.stderr)
                code, wall = execute(sweep, run, status, log_path)
            finally:
                claim.release()
            if code == 0 and run_status(sweep, run) == "finished":
                report["done"].append((run, f"{status}, {wall:.1f}s"))
                tqdm.write(f"[{run.name}] ok in {wall:.1f}s", file=sys.stderr)
            else:
                report["failed"].append((run, f"exit code {code}"))
                why = error_lines(log_path)
                tqdm.write(f"[{run.name}] FAILED (exit {code}) in {wall:.1f}s" + (f": {why}" if why else ""),
                           file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
    return report


def print_report(sweep: Sweep, report: dict[str, list[tuple[Run, str]]]) -> None:
    print(f"sweep {sweep.name}: {len(report['done'])} run now, {len(report['skipped'])} skipped (finished earlier), "
          f"{len(report['failed'])} failed")
    for run, detail in report["failed"]:
        log_path = logs_dir(sweep) / f"{run.name}.log"
        errors = error_lines(log_path)
        print(f"\n--- FAILED: {run.name} ({detail}); log {log_path}" + (":" if errors else "; last lines:"))
        print(errors or log_tail(log_path))


def write_commands(sweep: Sweep, path: Path, template: str | None = None) -> int:
    """One line per run: ``template`` with {command}, {command_q} (shell-quoted), {name}, {run_dir}, {workdir},
    {nproc}, {index}, {sweep}. Writes every run's resolved recipe, which the commands name by absolute path."""
    template = template or sweep.template
    lines = []
    for i, run in enumerate(sweep.runs):
        command = shlex.join(launch_command(sweep, run))
        lines.append(template.format(command=command, command_q=shlex.quote(command), name=run.name,
                                     run_dir=run_dir(sweep, run), workdir=sweep.workdir, nproc=sweep.nproc, index=i,
                                     sweep=sweep.name))
    text = "\n".join(lines) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)
    return len(lines)
