"""Reliability with real processes (issue 7): kills are os.kill(SIGKILL/SIGSTOP) on a rank's pid.

Every run is recipes/step.toml shrunk to seconds (dim 64, seq_len 32, 6 + 4
steps, a checkpoint every step, LoRA dropout on so the RNG state matters) on
WikiText-2, launched with torchrun on 2 gloo ranks. Hooks (steptitan/faults.py):
STEPTITAN_PID_DIR (rank pid files), STEPTITAN_PAUSE_AT (park every rank at a
chosen point so the kill lands exactly there), STEPTITAN_LOSS_LOG (per-step
losses, exact floats), STEPTITAN_INJECT_NAN.

Default run: exact resume after a kill at the first step after growth; a kill
inside a checkpoint save; a hung rank (SIGSTOP) caught by the heartbeat
watchdog; a NaN loss. ``-m slow``: exact resume mid-stage and at a stage's
last step, 2 -> 1 rank resume, NaN skipping, a kill at a random moment.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, wikitext_overrides
from steptitan.checkpoint import list_checkpoints

pytestmark = pytest.mark.dist

STAGE0_STEPS, STAGE1_STEPS = 6, 4


def tiny_args(cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["recipes/step.toml", *wikitext_overrides(cache_dir), f"output_dir={run_dir}",
            "model.dim=64", "training.seq_len=32", "training.batch_size=2", "training.eval_batches=2",
            "training.steps_per_log=1", "training.deterministic=true", "training.warmup_steps=2",
            f"stages.0.steps={STAGE0_STEPS}", f"stages.1.steps={STAGE1_STEPS}", "stages.1.peft.dropout=0.1",
            "checkpoint.interval=1", *extra]


def launch(args: list[str], hooks: Path, nproc: int = 2, **env: str) -> subprocess.Popen:
    """torchrun (or a single process for nproc=1) with the fault hooks pointed at ``hooks``."""
    hooks.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        cmd = [sys.executable, "-m", "steptitan.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "steptitan.train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPTITAN_PID_DIR": str(hooks),
                "STEPTITAN_LOSS_LOG": str(hooks / "losses.jsonl"), **env}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own process group only (start_new_session)
        out, _ = proc.communicate()
        pytest.fail(f"run did not finish within {timeout}s:\n{out[-3000:]}")
    return out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before {path.name} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{path.name} did not appear within {timeout}s")
        time.sleep(0.05)


def wait_for_steps(log: Path, proc: subprocess.Popen, steps: int, timeout: float = 600) -> None:
    """Wait until rank 0 has logged ``steps`` training steps (startup alone can take minutes on a loaded 2-core machine)."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and len(log.read_text().splitlines()) >= steps):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # no parked ranks left behind
            out, _ = proc.communicate()
            pytest.fail(f"the run did not reach step {steps} (exit {proc.returncode}):\n{out[-3000:]}")
        time.sleep(0.02)


def rank_pids(hooks: Path) -> dict[int, int]:
    return {int(p.stem[4:]): int(p.read_text()) for p in hooks.glob("rank*.pid")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too; its parent (torchrun) has exited, so it is reaped by init shortly
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def assert_nothing_left(pids: dict[int, int]) -> None:
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [r for r, p in pids.items() if alive(p)], "rank processes left running"


def losses(path: Path) -> dict[tuple[int, int], float]:
    """(stage, step) -> loss; a later line (a resumed run re-doing a step) must agree exactly."""
    out: dict[tuple[int, int], float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out[(row["stage"], row["step"])] = row["loss"]
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache_dir) -> dict[tuple[int, int], float]:
    """The uninterrupted run's per-step losses."""
    root = tmp_path_factory.mktemp("baseline")
    proc = launch(tiny_args(cache_dir, root / "run"), root / "hooks")
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    trajectory = losses(root / "hooks" / "losses.jsonl")
    assert len(trajectory) == STAGE0_STEPS + STAGE1_STEPS
    return trajectory


def kill_at(cache_dir: Path, tmp: Path, point: str, victim: int = 1, sig: int = signal.SIGKILL, *extra: str):
    """Run until every rank is parked at ``point``, kill rank ``victim``; returns (run_dir, hooks, output, seconds to exit)."""
    run_dir, hooks = tmp / "run", tmp / "hooks-killed"
    proc = launch(tiny_args(cache_dir, run_dir, *extra), hooks, STEPTITAN_PAUSE_AT=point)
    try:
        for rank in (0, 1):
            wait_for(hooks / f"paused-rank{rank}", proc)
        pids = rank_pids(hooks)
        t0 = time.monotonic()
        os.kill(pids[victim], sig)
        out = finish(proc, timeout=120)
        elapsed = time.monotonic() - t0
    finally:  # a failed wait must not leave parked ranks behind (they hold ports and CPU until killed)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0, out[-3000:]
    assert_nothing_left(pids)
    return run_dir, hooks, out, elapsed


def resume_and_compare(cache_dir: Path, tmp: Path, run_dir: Path, killed_hooks: Path, baseline, *extra: str) -> str:
    hooks = tmp / "hooks-resumed"
    proc = launch(tiny_args(cache_dir, run_dir, *extra), hooks)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    before, after = losses(killed_hooks / "losses.jsonl"), losses(hooks / "losses.jsonl")
    assert after, "the resumed run trained no step"
    for key, loss in {**before, **after}.items():
        assert loss == baseline[key], f"stage {key[0]} step {key[1]}: {loss!r} != uninterrupted {baseline[key]!r}"
    assert set(before) | set(after) == set(baseline)
    return out


# --------------------------------------------------------------------------- default run


@pytest.mark.slow  # (~60 s; interrupted saves are covered by test_reliability_units, exact resume by the SIGTERM test)
def test_kill_during_first_save_after_growth_then_exact_resume(tmp_path, cache_dir, baseline):
    """The default run's kill-and-resume test, at the most delicate moment.

    Rank 0 (the rank that marks a save complete and renames it) is SIGKILLed
    inside the save of stage 1 step 1 -- the first step after growth -- after
    every shard is written, before meta.json and the rename. The torn save is
    ignored, the resume starts from the stage-0 end checkpoint (a stage's last
    step), grows again and must reproduce the uninterrupted losses bit for bit.
    """
    run_dir, hooks, out, elapsed = kill_at(cache_dir, tmp_path, "save:1:1", victim=0)
    # torchrun noticed the dead rank, stopped the other one and names the failed rank.
    assert "rank      : 0" in out and "Signal 9 (SIGKILL)" in out, out[-3000:]
    assert elapsed < 60, f"took {elapsed:.1f}s to stop after rank 0 died"  # ~10 s on a quiet machine; 2 busy cores slow it
    print(f"dead rank (SIGKILL): all processes gone {elapsed:.2f}s after the kill (torchrun)")
    ckpt = run_dir / "checkpoints"
    assert (ckpt / ".tmp-stage01-step000001").is_dir() and not (ckpt / "stage01-step000001").exists()
    assert list_checkpoints(ckpt)[-1].path.name == f"stage00-step{STAGE0_STEPS:06d}"
    out = resume_and_compare(cache_dir, tmp_path, run_dir, hooks, baseline)
    assert f"stage00-step{STAGE0_STEPS:06d}" in out and "grew with " in out and ": layers 2 -> 4\n" in out
    assert not list(ckpt.glob(".tmp-*")), "the next save removes the torn one"


def test_hung_rank_is_detected_by_heartbeat(tmp_path, cache_dir):
    """SIGSTOP = a hang torchrun cannot see; the watchdog on rank 0 names rank 1 and everything exits."""
    run_dir, hooks, out, elapsed = kill_at(cache_dir, tmp_path, "step:0:2", 1, signal.SIGSTOP,
                                           "training.heartbeat_timeout_s=3")
    assert "steptitan: error on rank 0: rank 1 stopped responding" in out, out[-3000:]
    assert "exitcode  : 4" in out  # EXIT_PEER_FAILED
    assert elapsed < 3 + 10, f"hang detected and cleaned up after {elapsed:.1f}s"
    print(f"hung rank: detected and all processes gone {elapsed:.1f}s after SIGSTOP (heartbeat_timeout_s=3)")


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, cache_dir):
    run_dir, hooks = tmp_path / "run", tmp_path / "hooks"
    proc = launch(tiny_args(cache_dir, run_dir), hooks, STEPTITAN_INJECT_NAN="0:3")
    out = finish(proc)
    assert proc.returncode != 0
    assert "non-finite loss (loss nan, grad norm nan) at stage 0 (small), step 3" in out, out[-3000:]
    assert "the last good checkpoint" in out and "stage00-step000002 is kept" in out
    assert "exitcode  : 3" in out  # EXIT_TRAINING on both ranks
    assert [c.step for c in list_checkpoints(run_dir / "checkpoints")] == [1, 2]
    assert f'File "{REPO / "steptitan"}' not in out, "a rank printed a traceback (only torchrun's own is expected)"


# --------------------------------------------------------------------------- slow variants


@pytest.mark.slow
def test_kill_at_first_step_after_growth_resumes_bit_exactly(tmp_path, cache_dir, baseline):
    run_dir, hooks, out, _ = kill_at(cache_dir, tmp_path, "step:1:1")
    assert "rank      : 1" in out and "Signal 9 (SIGKILL)" in out, out[-3000:]
    assert list_checkpoints(run_dir / "checkpoints")[-1].path.name == "stage01-step000001"
    out = resume_and_compare(cache_dir, tmp_path, run_dir, hooks, baseline)
    assert "resuming from" in out and "stage01-step000001" in out


@pytest.mark.slow
def test_kill_mid_stage_resumes_bit_exactly(tmp_path, cache_dir, baseline):
    run_dir, hooks, _, _ = kill_at(cache_dir, tmp_path, "step:0:3")
    resume_and_compare(cache_dir, tmp_path, run_dir, hooks, baseline)


@pytest.mark.slow
def test_kill_at_last_step_of_stage_resumes_bit_exactly(tmp_path, cache_dir, baseline):
    # Parked after the stage-end checkpoint: the resume re-evaluates, then grows.
    run_dir, hooks, _, _ = kill_at(cache_dir, tmp_path, f"step:0:{STAGE0_STEPS}", victim=0)
    assert list_checkpoints(run_dir / "checkpoints")[-1].path.name == f"stage00-step{STAGE0_STEPS:06d}"
    out = resume_and_compare(cache_dir, tmp_path, run_dir, hooks, baseline)
    assert "grew with " in out and ": layers 2 -> 4\n" in out


@pytest.mark.slow
def test_kill_at_random_moment_resumes_bit_exactly(tmp_path, cache_dir, baseline):
    run_dir, hooks = tmp_path / "run", tmp_path / "hooks-killed"
    proc = launch(tiny_args(cache_dir, run_dir), hooks)
    wait_for(hooks / "losses.jsonl", proc)
    time.sleep(random.Random(7).uniform(0.0, 3.0))  # somewhere in training or in a save
    pids = rank_pids(hooks)
    os.kill(pids[random.Random(8).randint(0, 1)], signal.SIGKILL)
    finish(proc)
    assert_nothing_left(pids)
    if proc.returncode == 0:
        pytest.skip("the run finished before the kill")
    resume_and_compare(cache_dir, tmp_path, run_dir, hooks, baseline)


@pytest.mark.slow
def test_resume_two_ranks_on_one_rank(tmp_path, cache_dir, baseline):
    """DCP reshards 2 -> 1; not bit-exact (the reduction order changes), but the loss continues."""
    run_dir, hooks, _, _ = kill_at(cache_dir, tmp_path, "step:0:4")
    # one rank with twice the per-rank batch keeps the global batch and data order
    proc = launch(tiny_args(cache_dir, run_dir, "training.batch_size=4"), tmp_path / "hooks-1", nproc=1)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from" in out and "stage00-step000004" in out
    after = losses(tmp_path / "hooks-1" / "losses.jsonl")
    assert set(after) == {(0, 5), (0, 6)} | {(1, s) for s in range(1, STAGE1_STEPS + 1)}
    for key, loss in after.items():
        assert abs(loss - baseline[key]) < 0.05, (key, loss, baseline[key])


@pytest.mark.slow
def test_nan_steps_are_skipped_up_to_the_budget(tmp_path, cache_dir):
    ok = launch(tiny_args(cache_dir, tmp_path / "ok", "training.skip_nonfinite=2"), tmp_path / "h1",
                STEPTITAN_INJECT_NAN="0:2,1:2")
    out = finish(ok)
    assert ok.returncode == 0, out[-3000:]
    skipped = [json.loads(line) for line in (tmp_path / "h1" / "losses.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in skipped if r["skipped"]] == [(0, 2), (1, 2)]
    assert "skipping the update of step 2" in out
    over = launch(tiny_args(cache_dir, tmp_path / "over", "training.skip_nonfinite=2"), tmp_path / "h2",
                  STEPTITAN_INJECT_NAN="0:2,0:3,0:4")
    out = finish(over)
    assert over.returncode != 0
    assert "at stage 0 (small), step 4" in out and "already skipped 2 step(s)" in out, out[-3000:]


# --------------------------------------------------------------------------- issue 12: stopping on purpose, damage


def test_ctrl_c_on_one_rank_reaches_peers_and_prints_one_line(tmp_path, cache_dir):
    """SIGINT to rank 1 only: it leaves at once (no shutdown barrier), not as a clean finish; rank 0 learns it by heartbeat."""
    run_dir, hooks, out, elapsed = kill_at(cache_dir, tmp_path, "step:0:2", 1, signal.SIGINT,
                                           "training.heartbeat_timeout_s=3")
    newest = run_dir / "checkpoints" / "stage00-step000002"
    line = (f"steptitan: interrupted (Ctrl-C / SIGINT) on rank 1 during stage 0 (small), step 2; "
            f"newest checkpoint: {newest}; run the same command to resume from it")
    assert out.count(line) == 1, out[-3000:]
    assert "KeyboardInterrupt" not in out.replace("interrupted (KeyboardInterrupt)", ""), out[-3000:]
    assert "exitcode  : 130" in out or "exitcode  : 4" in out, out[-3000:]  # not 0: not a clean finish
    assert "rank 1 failed: interrupted (KeyboardInterrupt)" in out, out[-3000:]  # rank 0's watchdog names it
    assert elapsed < 3 + 10, f"the job took {elapsed:.1f}s to stop after Ctrl-C on one rank"
    print(f"Ctrl-C on rank 1: all processes gone {elapsed:.1f}s after SIGINT (heartbeat_timeout_s=3)")


def test_system_exit_on_one_rank_is_not_a_clean_finish(tmp_path, cache_dir):
    """A stray sys.exit(0) on rank 1 mid-stage: the job fails fast instead of hanging or reporting success."""
    run_dir, hooks = tmp_path / "run", tmp_path / "hooks"
    proc = launch(tiny_args(cache_dir, run_dir, "training.heartbeat_timeout_s=3"), hooks, STEPTITAN_EXIT_AT="0:2:1")
    log = hooks / "losses.jsonl"
    wait_for_steps(log, proc, 2)  # rank 1 exits right after step 2
    t0 = time.monotonic()
    out = finish(proc, timeout=90)
    assert proc.returncode != 0, out[-3000:]
    assert "interrupted (SystemExit(0)) on rank 1 during stage 0 (small), step 2" in out, out[-3000:]
    assert not (run_dir / "summary.json").exists()
    print(f"SystemExit on rank 1: all processes gone {time.monotonic() - t0:.1f}s after step 2 (heartbeat_timeout_s=3)")


def sigterm_mid_stage(cache_dir: Path, tmp: Path, to_torchrun: bool) -> tuple[Path, Path, str, float, int]:
    """SIGTERM at step 2 of stage 0, to torchrun or to rank 1 only; checks that both ranks saved that one step.

    Returns (run_dir, hooks, output, seconds until every process was gone, the saved step)."""
    run_dir, hooks = tmp / "run", tmp / "hooks-killed"
    proc = launch(tiny_args(cache_dir, run_dir, "checkpoint.interval=0"), hooks, STEPTITAN_STEP_DELAY="0.4")
    log = hooks / "losses.jsonl"
    wait_for_steps(log, proc, 2)
    pids = rank_pids(hooks)
    t0 = time.monotonic()
    os.kill(proc.pid if to_torchrun else pids[1], signal.SIGTERM)
    out = finish(proc, timeout=60)
    elapsed = time.monotonic() - t0
    assert_nothing_left(pids)
    stage, step = max(losses(log))
    assert stage == 0 and step < STAGE0_STEPS, f"the run finished stage 0 before the signal: {sorted(losses(log))}"
    saved = run_dir / "checkpoints" / f"stage{stage:02d}-step{step:06d}"
    assert [c.path for c in list_checkpoints(run_dir / "checkpoints")] == [saved], out[-3000:]
    assert (saved / "extra-rank0.pt").is_file() and (saved / "extra-rank1.pt").is_file()
    assert f"steptitan: preempted (SIGTERM): saved checkpoint {saved} at stage 0 (small), step {step}" in out, out[-3000:]
    assert elapsed < 30, f"took {elapsed:.1f}s to save and exit after SIGTERM (torchrun SIGKILLs at 30 s)"
    return run_dir, hooks, out, elapsed, step


def test_sigterm_to_torchrun_saves_at_next_step_then_resumes_bit_exactly(tmp_path, cache_dir, baseline):
    """Preemption: SIGTERM to the torchrun agent (as a scheduler sends it). Every rank saves the step it is
    at, exits with code 5; the same command resumes and reproduces the uninterrupted losses bit for bit."""
    run_dir, hooks, _, elapsed, step = sigterm_mid_stage(cache_dir, tmp_path, to_torchrun=True)
    print(f"SIGTERM to torchrun: checkpoint of step {step} saved, all processes gone {elapsed:.1f}s later")
    resume_and_compare(cache_dir, tmp_path, run_dir, hooks, baseline)


def test_sigterm_to_one_rank_saves_on_every_rank_and_exits_5(tmp_path, cache_dir):
    """SIGTERM to rank 1 only (a scheduler signalling one worker, not torchrun): the flag rides on the step's
    loss all-reduce, so rank 0 saves the same step too; every worker exits with the distinct code 5, which
    torchrun's failure summary shows (a SIGTERMed torchrun ends in its own SignalException instead)."""
    _, _, out, elapsed, step = sigterm_mid_stage(cache_dir, tmp_path, to_torchrun=False)
    assert "exitcode  : 5" in out, out[-3000:]
    assert "exitcode  : -15" not in out and "Signal 15" not in out, out[-3000:]  # not killed by the signal
    print(f"SIGTERM to rank 1 only: checkpoint of step {step} saved by both ranks, exit code 5, "
          f"all processes gone {elapsed:.1f}s after the signal")


def test_damaged_checkpoints_are_skipped_and_resume_falls_back(tmp_path, cache_dir, baseline):
    """Truncated shard / missing extra-rank1.pt / meta.json of {}: each is skipped with its reason; the
    resume loads the newest intact checkpoint and still reproduces the uninterrupted losses."""
    run_dir, hooks, _, _ = kill_at(cache_dir, tmp_path, "step:0:4")
    ckpt = run_dir / "checkpoints"
    shard = sorted((ckpt / "stage00-step000004").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (ckpt / "stage00-step000003" / "extra-rank1.pt").unlink()
    (ckpt / "stage00-step000002" / "meta.json").write_text("{}")
    t0 = time.monotonic()
    out = resume_and_compare(cache_dir, tmp_path, run_dir, hooks, baseline)
    print(f"three damaged checkpoints skipped: the resumed run finished (exit 0) {time.monotonic() - t0:.1f}s after launch")
    assert f"checkpoint {ckpt / 'stage00-step000004'} is damaged ({shard.name} has" in out, out[-3000:]
    assert f"checkpoint {ckpt / 'stage00-step000003'} is damaged (extra-rank1.pt is missing)" in out
    assert f"checkpoint {ckpt / 'stage00-step000002'} is damaged (meta.json lacks stage" in out
    assert f"resuming from {ckpt / 'stage00-step000001'}" in out
