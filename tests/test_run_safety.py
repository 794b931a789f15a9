"""Run folders and hostile inputs with real processes (issue 12): already-finished runs, overwrite safety,
the output-folder lock, checkpoint.resume=<path> checks, a full disk, huge corpora and shapes, bad encodings,
unusable output folders, and one lock per data-cache entry.

Runs are ``python -m steptitan.train`` (one process) or torchrun launches (2 gloo ranks) of recipes/step.toml
shrunk to seconds; every "refused" case must end with exit code 2 and one ``steptitan: error:`` line.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_reliability import launch, rank_pids, tiny_args, wait_for

pytestmark = pytest.mark.dist


def tiny_one_rank(cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """A single-process run of a few seconds: 2 + 2 steps, stage ends checkpointed."""
    return tiny_args(cache_dir, run_dir, "stages.0.steps=2", "stages.1.steps=2", "training.batch_size=4",
                     "checkpoint.interval=0", *extra)


def run(args: list[str], tmp: Path, timeout: float = 240, prefix: list[str] | None = None, **env: str):
    cmd = [*(prefix or []), sys.executable, "-m", "steptitan.train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPTITAN_PID_DIR": str(tmp / "hooks"), **env}
    t0, cpu0 = time.monotonic(), _children_cpu()
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    elapsed, out = time.monotonic() - t0, proc.stdout + proc.stderr
    said = [line for line in out.splitlines() if line.startswith("steptitan: ")]
    # -s shows the time to exit of every run (docs/reliability.md's table): wall time on a shared machine, and CPU
    print(f"[exit {proc.returncode} after {elapsed:.1f}s wall, {_children_cpu() - cpu0:.1f}s CPU] {(said or [''])[-1][:160]}")
    return proc.returncode, out, elapsed


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_error(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("steptitan: error")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir) -> Path:
    """One finished ``tiny_one_rank`` run (a real ``python -m steptitan.train`` process) that the run-folder tests
    start from; a test that changes the folder works on a copy (``copy_of``). Issue 23 item 10: one training
    process for five tests instead of one each. Nothing in a run folder names its own path except recipe.json's
    output_dir, which no check reads (rundir.py compares the marker, summary.json and the stage steps)."""
    tmp = tmp_path_factory.mktemp("finished")
    code, out, _ = run(tiny_one_rank(cache_dir, tmp / "run"), tmp, timeout=900)  # may tokenize the session's corpus
    assert code == 0, out[-3000:]
    return tmp / "run"


def copy_of(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


# --------------------------------------------------------------------------- run folders


def test_rerunning_a_finished_run_leaves_it_untouched(tmp_path, cache_dir, finished_run):
    run_dir = copy_of(finished_run, tmp_path / "run")
    before = tree(run_dir)
    assert "summary.json" in before and any(k.startswith("tb/") for k in before)
    code, out, _ = run(tiny_one_rank(cache_dir, run_dir), tmp_path)
    assert code == 0 and "already finished" in out, out[-3000:]
    assert tree(run_dir) == before  # summary.json, TensorBoard events, checkpoints: byte for byte


def test_a_run_finished_before_the_run_marker_existed_is_left_untouched(tmp_path, cache_dir, finished_run):
    """A folder finished by an older steptitan (summary.json and recipe.json, no .steptitan-run.json) is
    finished too: re-running its command must not resume from the last checkpoint and rewrite the summary."""
    run_dir = copy_of(finished_run, tmp_path / "run")
    (run_dir / ".steptitan-run.json").unlink()
    (run_dir / ".steptitan.lock").unlink()
    before = tree(run_dir)
    code, out, _ = run(tiny_one_rank(cache_dir, run_dir), tmp_path)
    assert code == 0 and "already finished" in out, out[-3000:]
    assert tree(run_dir) == before


def test_overwrite_deletes_only_steptitan_folders(tmp_path, cache_dir, finished_run):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    (foreign / "checkpoints").mkdir()
    code, out, _ = run(tiny_one_rank(cache_dir, foreign, "overwrite=true"), tmp_path)
    assert code == 2 and "overwrite=true refuses to delete" in one_error(out) and "thesis.tex" in out, out[-3000:]
    assert (foreign / "thesis.tex").read_text() == "years of work" and (foreign / "checkpoints").is_dir()
    # A folder steptitan wrote (its marker) is deleted and trained afresh.
    mine = copy_of(finished_run, tmp_path / "mine")
    stale = mine / "checkpoints" / "stage07-step000001"
    stale.mkdir()
    code, out, _ = run(tiny_one_rank(cache_dir, mine, "overwrite=true"), tmp_path)
    assert code == 0 and not stale.exists() and "already finished" not in out, out[-3000:]


def test_second_launch_into_a_running_folder_is_refused_at_once(tmp_path, cache_dir):
    """Two torchrun launches, one output folder: the second is refused naming the holder; the first is unharmed."""
    run_dir = tmp_path / "run"
    first = launch(tiny_args(cache_dir, run_dir), tmp_path / "hooks1", STEPTITAN_PAUSE_AT="step:0:2")
    for rank in (0, 1):
        wait_for(tmp_path / "hooks1" / f"paused-rank{rank}", first)
    holder = rank_pids(tmp_path / "hooks1")[0]
    try:
        t0 = time.monotonic()
        second = launch(tiny_args(cache_dir, run_dir), tmp_path / "hooks2")
        refused_at = []

        def read() -> list[str]:
            lines = []
            for line in second.stdout:
                if "is in use by another steptitan run" in line and not refused_at:
                    refused_at.append(time.monotonic())
                lines.append(line)
            return lines

        reader = concurrent.futures.ThreadPoolExecutor(1).submit(read)
        try:
            second.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)
            pytest.fail(f"the second launch did not end:\n{''.join(reader.result(timeout=10))[-3000:]}")
        gone = time.monotonic()
        out = "".join(reader.result(timeout=10))
        assert second.returncode != 0, out[-3000:]
        assert f"is in use by another steptitan run (pid {holder} on host" in out, out[-3000:]
        assert "exitcode  : 2" in out, out[-3000:]
        assert not (run_dir / "checkpoints" / ".tmp-stage00-step000001").exists()
        assert first.poll() is None, "the first run must be left alone"
        # Its rank 1 waits for rank 0 in the process group's rendezvous (C++, where a Python SIGTERM handler never
        # runs): it must die of torchrun's SIGTERM, not linger until torchrun's SIGKILL 30 s later.
        assert gone - refused_at[0] < 25 and "SIGKILL" not in out, out[-3000:]
        print(f"second launch into a locked folder: refused {refused_at[0] - t0:.1f}s after launch (process start), "
              f"all its processes gone {gone - refused_at[0]:.1f}s after the refusal")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()


def test_the_plan_fingerprint_ignores_steps_not_the_model(tmp_path):
    """What the folder check compares (the checkpoints' plan fingerprint, steptitan/rundir.py): more steps or
    another LR resume the same run; another PEFT rank, shape or freezing is a different plan and is refused
    with the run folder's message. In-process, no training (the 3-run version is test_e2e's slow test)."""
    from steptitan.plan import build_plan, plan_fingerprint
    from steptitan.recipe import load_recipe
    from steptitan.rundir import RunDirError, _check_fingerprint

    def plans(*overrides: str):
        return build_plan(load_recipe(REPO / "recipes" / "step.toml", [f"output_dir={tmp_path}", *overrides]))

    base = plan_fingerprint(plans())
    for same in (["stages.1.steps=7"], ["stages.0.steps=3", "stages.0.lr=0.01"]):
        assert plan_fingerprint(plans(*same)) == base, same
        _check_fingerprint(base, plans(*same), "output folder run")  # no error: it resumes
    for other in (["stages.1.peft.rank=4"], ["model.dim=64"], ["stages.1.freeze=[]"]):
        assert plan_fingerprint(plans(*other)) != base, other
        with pytest.raises(RunDirError, match="holds checkpoints of a different stage plan"):
            _check_fingerprint(base, plans(*other), "output folder run")


def test_resume_path_from_another_plan_is_refused_before_any_process_group(tmp_path, cache_dir, finished_run):
    other = copy_of(finished_run, tmp_path / "other")
    ckpt = other / "checkpoints" / "stage00-step000002"
    code, out, elapsed = run(tiny_one_rank(cache_dir, tmp_path / "run", "model.n_heads=2",
                                           f"checkpoint.resume={ckpt}"), tmp_path)
    assert code == 2 and "holds checkpoints of a different stage plan" in one_error(out), out[-3000:]
    assert "size mismatch" not in out
    code, out, _ = run(tiny_one_rank(cache_dir, tmp_path / "run2", f"checkpoint.resume={tmp_path / 'nope'}"), tmp_path)
    assert code == 2 and "no such checkpoint folder" in one_error(out), out[-3000:]
    # The same plan, but the checkpoint is damaged (a truncated shard): refused before any process group too.
    shard = sorted(ckpt.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, out, _ = run(tiny_one_rank(cache_dir, tmp_path / "run3", f"checkpoint.resume={ckpt}"), tmp_path)
    assert code == 2 and f"is damaged: {shard.name} has" in one_error(out), out[-3000:]


def test_every_checkpoint_damaged_is_refused_and_nothing_is_touched(tmp_path, cache_dir, finished_run):
    """Checkpoints exist but none is intact (e.g. a file system that lost files): starting afresh would prune
    them as the new run saves, so the run stops with exit 2 naming each problem and changes nothing."""
    run_dir = copy_of(finished_run, tmp_path / "run")
    (run_dir / "summary.json").unlink()  # as if it had stopped after its last save
    saved = sorted((run_dir / "checkpoints").iterdir())
    assert len(saved) == 2, saved
    for ckpt in saved:  # one truncated shard each
        shard = sorted(ckpt.glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    kept = lambda: {name: data for name, data in tree(run_dir).items() if name != ".steptitan.lock"}  # noqa: E731
    before = kept()  # (the lock file names its holder: the refused launch held it for a moment)
    code, out, _ = run(tiny_one_rank(cache_dir, run_dir), tmp_path)
    err = one_error(out)
    assert code == 2 and "every checkpoint" in err and "is damaged" in err, out[-3000:]
    assert all(ckpt.name in err for ckpt in saved), err
    assert kept() == before


# --------------------------------------------------------------------------- a full disk


def _in_small_tmpfs(mount: Path, size: str) -> list[str]:
    """Run the command in a private mount namespace with a tmpfs of ``size`` at ``mount`` (no root on the host needed)."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (user + mount namespaces) is not allowed here")
    mount.mkdir(parents=True, exist_ok=True)
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs "{mount}" && exec "$0" "$@"']


@pytest.mark.slow
def test_full_disk_prunes_before_saving_and_names_the_problem(tmp_path, cache_dir):
    """A real 6.4 MB filesystem, checkpoints of 2.2 MB (stage 0) and 3.5 MB (stage 1), keep_last=2: pruning only
    after a save needs room for three and hits ENOSPC at the third save, every time; pruning first when the
    free space is short lets the run finish."""
    mount = tmp_path / "disk"
    args = tiny_one_rank(cache_dir, mount / "run", "model.dim=32", "model.vocab_size=1024", "checkpoint.interval=1",
                         "checkpoint.keep_last=2", "stages.0.steps=5", "stages.1.steps=1")
    code, out, _ = run(args, tmp_path, prefix=_in_small_tmpfs(mount, "6400k"))
    assert code == 0, out[-3000:]
    # A disk too small for one checkpoint: one clear message naming the disk space, exit 3.
    code, out, _ = run(args, tmp_path, prefix=_in_small_tmpfs(mount, "1000k"))
    assert code == 3 and "not enough disk space for a checkpoint" in one_error(out), out[-3000:]
    assert "No space left on device" in out


# --------------------------------------------------------------------------- hostile inputs


def _small(tmp_path: Path, *extra: str) -> list[str]:
    return ["recipes/step.toml", f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
            "model.vocab_size=300", "training.seq_len=16", "training.batch_size=2", *extra]


def test_huge_corpus_is_streamed_and_stops_at_max_chars(tmp_path):
    """A 400 MB text file with data.max_chars=200000: reading stops early (time and memory bounded);
    progress lines appear while the tokenizer and token files are prepared."""
    big = tmp_path / "big.txt"
    line = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n").encode()
    with open(big, "wb") as fh:
        block = line * (1 << 20 // len(line) + 1)
        while fh.tell() < 400 << 20:
            fh.write(block)
    probe = ("import resource, sys, time; from steptitan.recipe import load_recipe; from steptitan.data import prepare_data; "
             "rchar = lambda: int(open('/proc/self/io').read().split('rchar:')[1].split()[0]); "
             "r = load_recipe('recipes/step.toml', sys.argv[1:]); t, b = time.monotonic(), rchar(); prepare_data(r.data, r.model.vocab_size); "
             "print('SECONDS', time.monotonic() - t, 'MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
             "'READ_BYTES', rchar() - b)")
    out = subprocess.run([sys.executable, "-c", probe, f"data.files=[{big}]", "data.max_chars=200000",
                          f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=300"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    words = out.stdout.split()
    seconds, rss_kb = float(words[words.index("SECONDS") + 1]), int(words[words.index("MAXRSS_KB") + 1])
    read = int(words[words.index("READ_BYTES") + 1])  # bytes read() by the process while preparing (/proc/self/io)
    assert read < 50 << 20, f"read {read / 2**20:.0f} MiB of a 400 MiB file for max_chars=200000"
    assert seconds < 180 and rss_kb < 1_500_000, (seconds, rss_kb)  # reading it all: 400 MB of text, ~GBs as str
    assert "steptitan: data: training a byte-level BPE tokenizer" in out.stderr
    assert "steptitan: data: tokenizing the corpus" in out.stderr and "tokens ready" in out.stderr
    print(f"400 MB corpus, max_chars=200000: prepared in {seconds:.1f}s, read {read / 2**20:.1f} MiB of it, "
          f"peak RSS {rss_kb / 1024:.0f} MiB")


@pytest.mark.parametrize("case", ["dim", "lora rank"])
def test_shapes_beyond_the_machines_memory_are_refused_before_starting(tmp_path, case):
    extra = {"dim": ["model.dim=1048576", "model.n_heads=4"],
             "lora rank": ["model.dim=128", "stages.1.peft.rank=10000000"]}[case]
    text = tmp_path / "a.txt"
    text.write_text("word " * 400)
    code, out, elapsed = run(_small(tmp_path, f"data.files=[{text}]", *extra), tmp_path, timeout=300)
    err = one_error(out)
    assert code == 2 and "GiB per rank" in err and "GiB RAM" in err, out[-3000:]
    assert not (tmp_path / "cache").exists(), "refused before any data was prepared"
    import resource

    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 3 << 20, "nothing big was allocated"  # KiB


def test_lora_rank_100000_is_refused_under_the_process_memory_limit(tmp_path):
    """The issue's case, LoRA rank=100000 on dim 128 (493M trainable parameters, ~7.4 GiB predicted), fits this
    machine's RAM; under a 5 GB address-space limit (``ulimit -v``, as batch systems set) it is refused before
    starting, with the figure and the limit, instead of dying in an allocation."""
    text = tmp_path / "a.txt"
    text.write_text("word " * 400)
    prefix = ["sh", "-c", 'ulimit -v 5000000 && exec "$0" "$@"']
    code, out, elapsed = run(_small(tmp_path, f"data.files=[{text}]", "model.dim=128", "stages.1.peft.rank=100000"),
                             tmp_path, timeout=300, prefix=prefix)
    err = one_error(out)
    assert code == 2 and "GiB per rank" in err and " trainable / " in err, out[-3000:]
    assert "address-space limit (ulimit -v) of 4.8 GiB" in err, err
    assert not (tmp_path / "cache").exists(), "refused before any data was prepared"
    print(f"LoRA rank 100000 under ulimit -v 5000000: refused (exit 2) {elapsed:.1f}s after launch")


@pytest.mark.parametrize("case", ["latin-1", "binary"])
def test_non_utf8_text_file_names_the_file_and_the_encoding(tmp_path, case):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes("Le café était très bon. ".encode("latin-1") * 200 if case == "latin-1"
                    else bytes(range(256)) * 50)
    code, out, _ = run(_small(tmp_path, f"data.files=[{bad}]"), tmp_path, timeout=300)
    err = one_error(out)
    assert code == 2 and str(bad) in err, out[-3000:]
    assert "not UTF-8 text: byte 0xe9 at offset 6" in err if case == "latin-1" else "NUL bytes" in err, err


def test_output_dir_that_is_a_file_or_read_only_gets_exit_2(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("word " * 400)
    a_file = tmp_path / "results.csv"
    a_file.write_text("x")
    code, out, _ = run(_small(tmp_path, f"data.files=[{text}]", f"output_dir={a_file}"), tmp_path, timeout=300)
    assert code == 2 and "is a file, not a folder" in one_error(out), out[-3000:]
    code, out, _ = run(_small(tmp_path, f"data.files=[{text}]", f"output_dir={a_file}/run"), tmp_path, timeout=300)
    assert code == 2 and "cannot create output folder" in one_error(out), out[-3000:]
    ro = tmp_path / "ro"
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm is not allowed here (root ignores chmod, so a read-only mount is needed)")
    ro.mkdir()
    prefix = ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o ro,size=1m tmpfs "{ro}" && exec "$0" "$@"']
    code, out, _ = run(_small(tmp_path, f"data.files=[{text}]", f"output_dir={ro}"), tmp_path, timeout=300, prefix=prefix)
    assert code == 2 and "cannot write to output folder" in one_error(out) and "Read-only" in out, out[-3000:]


def test_one_lock_per_data_cache_entry(tmp_path):
    """Two preparations sharing a cache and a corpus (so one tokenizer folder) but with different validation
    splits: the second waits for the first's tokenizer lock instead of training into the same folder."""
    text = tmp_path / "a.txt"
    text.write_text("some words of text and more words. " * 3000)
    probe = ("import sys; from steptitan.recipe import load_recipe; from steptitan.data import prepare_data; "
             "r = load_recipe('recipes/step.toml', sys.argv[1:]); d = prepare_data(r.data, r.model.vocab_size); print('READY', d.tokenizer_dir)")
    common = [f"data.files=[{text}]", f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=300"]
    env = {**os.environ, "STEPTITAN_PID_DIR": str(tmp_path / "hooks")}
    first = subprocess.Popen([sys.executable, "-c", probe, *common, "data.val_fraction=0.1"], cwd=REPO, text=True,
                             env={**env, "STEPTITAN_PAUSE_AT": "tokenizer:0:0"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(tmp_path / "hooks" / "paused-rank0", first)
        second = subprocess.Popen([sys.executable, "-c", probe, *common, "data.val_fraction=0.2"], cwd=REPO, text=True,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300  # the second process imports torch first; slow on a loaded machine
        waiting = ""
        while "waiting for another process" not in waiting:
            line = second.stdout.readline()
            assert line and time.monotonic() < deadline, f"the second preparation did not wait:\n{waiting}"
            waiting += line
        assert second.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock, mid-way: the kernel releases it
        first.communicate()
    t0 = time.monotonic()
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0 and "READY" in out, out[-3000:]
    print(f"shared tokenizer cache entry: the waiting preparation finished {time.monotonic() - t0:.1f}s after the holder was killed")
    tokenizers = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert [p.name.startswith(".tmp-") for p in tokenizers] == [False], tokenizers
