"""steptitan sweep (tools/sweep.py): sweep files, run names, resolved TOML recipes, launch commands, failures,
relative paths, and a real 2x2 sweep that is killed and resumed."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from conftest import REPO, WIKITEXT
from hypothesis import given, settings
from hypothesis import strategies as st

from steptitan.experiments import report, runner, spec


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- sweep files


def test_grid_seeds_when_and_explicit_runs(tmp_path):
    f = write(tmp_path / "s.toml", """
name = "t"
recipe = "recipes/step.toml"
seeds = [0, 1]
[set]
training.seq_len = 64
[axes]
stages.1.growth.position = ["upper", "lower", "uniform"]
"stages.1.peft.rank" = [8, 32]
[[when]]
match = { "stages.1.growth.position" = "lower", "stages.1.peft.rank" = 32 }
set = { "stages.1.lr" = 1e-3 }
[[runs]]
label = "baseline"
set = { "stages.1.steps" = 7 }
""")
    sw = spec.load_sweep(f, output_dir=str(tmp_path / "out"))
    assert sw.recipe == (REPO / "recipes" / "step.toml").resolve()
    assert len(sw.runs) == 3 * 2 * 2 + 2  # grid x seeds, then the explicit run x seeds
    names = [r.name for r in sw.runs]
    assert names[0] == "position=upper,rank=8,seed=0" and names[1] == "position=upper,rank=8,seed=1"
    assert names[-2:] == ["baseline,seed=0", "baseline,seed=1"]
    for run in sw.runs:
        assert run.overrides["training.seq_len"] == 64
        assert run.overrides["training.seed"] in (0, 1)
        matched = run.values.get("stages.1.growth.position") == "lower" and run.values.get("stages.1.peft.rank") == 32
        assert ("stages.1.lr" in run.overrides) == matched
    assert sw.runs[-1].overrides["stages.1.steps"] == 7 and "stages.1.growth.position" not in sw.runs[-1].overrides
    assert sw.output_dir == (tmp_path / "out").resolve()


def test_zip_mode_pairs_values(tmp_path):
    f = write(tmp_path / "s.toml", """
recipe = "recipes/step.toml"
mode = "zip"
[axes]
"stages.1.peft.rank" = [4, 16]
"stages.1.peft.alpha" = [8, 32]
""")
    sw = spec.load_sweep(f)
    assert [(r.overrides["stages.1.peft.rank"], r.overrides["stages.1.peft.alpha"]) for r in sw.runs] == [(4, 8), (16, 32)]
    assert sw.output_dir.name == "s"


@pytest.mark.parametrize("body, message", [
    ('mode = "zip"\n[axes]\n"a.b" = [1, 2]\n"a.c" = [1]', "equal length"),
    ('mode = "diagonal"', "mode must be one of"),
    ('nproc = 0', "nproc"),
    ('typo = 1', "unknown keys"),
    ('[axes]\n"a.b" = []', "non-empty list"),
    ('[[runs]]\nlabel = "x"\n[[runs]]\nlabel = "x"', "share the folder name"),
])
def test_bad_sweep_files_give_one_clear_error(tmp_path, body, message):
    f = write(tmp_path / "s.toml", 'recipe = "recipes/step.toml"\n' + body + "\n")
    with pytest.raises(spec.SweepError, match=message):
        spec.load_sweep(f)


def test_run_names_use_shortest_unique_key_suffix():
    names = spec.short_keys(["stages.1.peft.rank", "stages.2.peft.rank", "training.lr"])
    assert names == {"stages.1.peft.rank": "1.peft.rank", "stages.2.peft.rank": "2.peft.rank", "training.lr": "lr"}
    assert spec.run_name({"a.x": "has space/slash", "b.y": True}) == "x=has_space_slash,y=true"


scalars = st.one_of(
    st.integers(-10**12, 10**12), st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
)


@settings(max_examples=200)
@given(st.one_of(scalars, st.lists(scalars, max_size=4)))
def test_override_value_reaches_the_run_recipe_unchanged(value):
    """Whatever a sweep axis holds reaches the run's resolved TOML as exactly that value (type included)."""
    data = {"stages": [{"steps": 1}, {"steps": 2}]}
    spec.set_dotted(data, "stages.1.growth.k", value)
    parsed = tomllib.loads(spec.recipe_toml(data))["stages"][1]["growth"]["k"]
    assert parsed == value and type(parsed) is type(value)


def test_set_dotted_names_the_list_length_on_a_bad_index():
    from steptitan.recipe import RecipeError

    with pytest.raises(RecipeError, match="stages has 2 entries"):
        spec.set_dotted({"stages": [{}, {}]}, "stages.2.steps", 3)


def test_write_commands_with_an_sbatch_template(tmp_path):
    f = write(tmp_path / "s.toml", """
recipe = "recipes/step.toml"
nproc = 4
[axes]
stages.1.growth.position = ["upper", "lower"]
""")
    sw = spec.load_sweep(f, output_dir=str(tmp_path / "out"))
    out = tmp_path / "cmds.sh"
    n = runner.write_commands(sw, out, "sbatch --job-name={name} --wrap={command_q}")
    lines = out.read_text().splitlines()
    assert n == 2 and len(lines) == 2
    for line, run in zip(lines, sw.runs):
        argv = shlex.split(line)
        assert argv[:2] == ["sbatch", f"--job-name={run.name}"]
        inner = shlex.split(argv[2].removeprefix("--wrap="))
        assert inner[:5] == ["torchrun", "--standalone", "--nproc_per_node=4", "-m", "steptitan.train"]
        # launched from the run's resolved recipe (absolute path), not from key=value overrides
        assert inner[5] == str(tmp_path / "out" / "_recipes" / f"{run.name}.toml") and len(inner) == 6
        recipe = tomllib.loads(Path(inner[5]).read_text())
        assert recipe["stages"][1]["growth"]["position"] == run.values["stages.1.growth.position"]
        assert recipe["output_dir"] == str(tmp_path / "out" / run.name)


# --------------------------------------------------------------------------- failures (no training: fake launches)


def test_a_failing_run_does_not_stop_the_sweep_and_is_reported_with_its_log_tail(tmp_path, monkeypatch, capsys):
    f = write(tmp_path / "s.toml", """
recipe = "recipes/step.toml"
[axes]
training.lr = [0.5, 0.25, 0.125]
[[runs]]
label = "invalid"
set = { "stages.1.peft.rank" = 0 }
""")
    sw = spec.load_sweep(f, output_dir=str(tmp_path / "out"))

    def fake_launch(sweep, run, status="new", python=None):
        folder = runner.run_dir(sweep, run)
        if run.overrides["training.lr"] == 0.5:
            return [sys.executable, "-c", "import sys; print('line one'); print('the crash reason: boom'); sys.exit(3)"]
        code = (f"import json, pathlib; p = pathlib.Path({str(folder)!r}); p.mkdir(parents=True);"
                f"(p / 'summary.json').write_text(json.dumps({{'final_val_loss': {run.overrides['training.lr']}, 'stages': []}}))")
        return [sys.executable, "-c", code]

    monkeypatch.setattr(runner, "launch_command", fake_launch)
    result = runner.run_sweep(sw, progress=False)
    assert [r.name for r, _ in result["done"]] == ["lr=0.25", "lr=0.125"]
    assert [(r.name, why) for r, why in result["failed"]] == [("lr=0.5", "exit code 3"), ("invalid", "invalid recipe")]
    runner.print_report(sw, result)
    out = capsys.readouterr().out
    assert "FAILED: lr=0.5 (exit code 3)" in out and "the crash reason: boom" in out
    assert "FAILED: invalid (invalid recipe)" in out and "rank must be > 0" in out
    rows = report.collect_results(sw)
    assert [r["status"] for r in rows] == ["failed", "finished", "finished", "failed"]
    assert [r.get("final_val_loss") for r in rows] == [None, 0.25, 0.125, None]
    # Run again: the two finished runs are skipped, the failed ones are tried again.
    again = runner.run_sweep(sw, progress=False)
    assert len(again["skipped"]) == 2 and len(again["failed"]) == 2 and not again["done"]


def test_a_run_made_with_other_overrides_is_not_silently_reused(tmp_path, monkeypatch):
    f = write(tmp_path / "s.toml", 'recipe = "recipes/step.toml"\n[set]\ntraining.lr = 0.5\n')
    sw = spec.load_sweep(f, output_dir=str(tmp_path / "out"))
    folder = runner.run_dir(sw, sw.runs[0])
    make = [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(folder)!r}); p.mkdir(parents=True, exist_ok=True); (p / 'summary.json').write_text('{{}}')"]
    seen = []
    monkeypatch.setattr(runner, "launch_command", lambda sweep, run, status="new", python=None: seen.append(status) or make)
    assert len(runner.run_sweep(sw, progress=False)["done"]) == 1
    write(f, 'recipe = "recipes/step.toml"\n[set]\ntraining.lr = 0.25\n')  # same run name, other recipe
    sw = spec.load_sweep(f, output_dir=str(tmp_path / "out"))
    with pytest.raises(spec.SweepError, match="rerun-stale"):
        runner.run_sweep(sw, progress=False)
    assert len(runner.run_sweep(sw, progress=False, rerun_stale=True)["done"]) == 1
    assert seen == ["new", "stale"]


# --------------------------------------------------------------------------- a real sweep, killed and resumed


def _sweep_cmd(sweep_file: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "sweep.py"), str(sweep_file), "--out", str(out), "--no-progress"]


# --------------------------------------------------------------------------- paths and real failures


def test_relative_paths_are_anchored_at_the_file_that_wrote_them(tmp_path, capsys):
    """Base recipe paths are relative to the recipe's folder, sweep-file paths to the sweep's; --check sees missing data."""
    (tmp_path / "rec").mkdir()
    (tmp_path / "sw").mkdir()
    base = (REPO / "recipes" / "step.toml").read_text().replace("[data]", '[data]\nfiles = ["data/train.txt"]', 1)
    assert 'files = ["data/train.txt"]' in base
    write(tmp_path / "rec" / "base.toml", base)
    f = write(tmp_path / "sw" / "s.toml", """
recipe = "../rec/base.toml"
[set]
"data.val_files" = ["val.txt"]
"data.cache_dir" = "cache"
"checkpoint.resume" = "auto"
""")
    sw = spec.load_sweep(f)
    assert sw.workdir == tmp_path / "sw" and sw.output_dir == tmp_path / "sw" / "runs" / "s"
    (run,) = sw.runs
    data = tomllib.loads(runner.run_recipe_text(sw, run))["data"]
    assert data["files"] == [str(tmp_path / "rec" / "data" / "train.txt")]
    assert data["val_files"] == [str(tmp_path / "sw" / "val.txt")]
    assert data["cache_dir"] == str(tmp_path / "sw" / "cache")
    assert tomllib.loads(runner.run_recipe_text(sw, run))["checkpoint"]["resume"] == "auto"

    from steptitan.experiments.sweep import main as sweep_main

    assert sweep_main([str(f), "--check"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "rec" / "data" / "train.txt") in err and str(tmp_path / "sw" / "val.txt") in err
    (tmp_path / "rec" / "data").mkdir()
    write(tmp_path / "rec" / "data" / "train.txt", "some text\n")
    write(tmp_path / "sw" / "val.txt", "more text\n")
    assert sweep_main([str(f), "--check"]) == 0
    assert "1 of 1 runs valid" in capsys.readouterr().out


@pytest.mark.dist
def test_real_sweep_from_its_folder_shows_the_steptitan_error_of_a_failed_run(tmp_path):
    """Through the real entry point: relative data and cache resolve in the sweep's folder; a run that fails in
    steptitan.train is summarised by its `steptitan: error:` line, not by torchrun's traceback."""
    folder = tmp_path / "exp"
    _tiny_sweep_folder(folder, 2, '[axes]\n"training.seq_len" = [16, 100000]\n', checkpoints=False)
    proc = _sweep(folder, "--no-progress", timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (folder / "runs" / "tiny" / "seq_len=16" / "summary.json").is_file()
    assert (folder / "cache" / "tokens").is_dir()  # the relative cache_dir landed beside the sweep, not in the checkout
    failed = proc.stdout.split("--- FAILED: seq_len=100000", 1)[1]
    assert "steptitan: error: training.seq_len=100000" in failed.splitlines()[1]
    assert "Traceback" not in failed and "ChildFailedError" not in failed
    assert "steptitan: error: training.seq_len=100000" in proc.stderr  # the progress line names it too
    rows = (folder / "runs" / "tiny" / "results.md").read_text()
    assert "trainable_params" in rows and "peak_model_states_MiB" in rows and "steptitan: error" in rows


@pytest.mark.dist
@pytest.mark.slow  # (~70 s: the default run covers Ctrl-C and skip-finished in quicker tests)
def test_2x2_sweep_killed_mid_run_then_resumed_then_skipped(tmp_path, cache_dir):
    if not WIKITEXT.is_dir():
        pytest.skip(f"{WIKITEXT} is missing")
    sweep_file = write(tmp_path / "tiny.toml", f"""
name = "tiny"
recipe = "{REPO / 'recipes' / 'step.toml'}"
nproc = 1
metric = "final_val_loss"
[set]
model.dim = 64
training.seq_len = 32
training.batch_size = 4
training.eval_batches = 2
training.warmup_steps = 2
stages.0.steps = 4
stages.1.steps = 4
"data.files" = ["{WIKITEXT / 'valid.txt'}"]
"data.val_files" = ["{WIKITEXT / 'test.txt'}"]
"data.cache_dir" = "{cache_dir}"
"data.max_chars" = 100000
[axes]
stages.1.growth.position = ["upper", "lower"]
stages.1.peft.rank = [4, 8]
[[when]]   # the second run is long enough to be killed in the middle of stage 1
match = {{ "stages.1.growth.position" = "upper", "stages.1.peft.rank" = 8 }}
set = {{ "stages.1.steps" = 80, "checkpoint.interval" = 20 }}
""")
    out = tmp_path / "out"
    victim = out / "position=upper,rank=8"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    # 1. Start the sweep and kill it (SIGKILL, no chance to clean up) once the victim has a stage-1 checkpoint.
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(_sweep_cmd(sweep_file, out), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 240
        while not (victim / "checkpoints").is_dir() or not any((victim / "checkpoints").glob("stage01-*/meta.json")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the victim run never wrote a checkpoint"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "position=upper,rank=4" / "summary.json").is_file()
    assert not (victim / "summary.json").exists()

    # 2. Run it again: the finished run is skipped, the victim resumes from its checkpoint, the rest run.
    second = subprocess.run(_sweep_cmd(sweep_file, out), capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "4 runs, 1 finished earlier, 3 to run" in second.stdout
    assert "[position=upper,rank=8] resume" in second.stderr
    victim_log = (out / "_logs" / "position=upper,rank=8.log").read_text()
    last_attempt = victim_log.rsplit("=====", 1)[1]
    assert "resuming from" in last_attempt and "stage01-step0000" in last_attempt and "[stage 1] step    80/80" in last_attempt
    assert "[stage 0] step     1/4" not in last_attempt  # stage 0 was not trained again

    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    for r in rows:
        for col in ("final_val_loss", "final_val_ppl", "stage0_peak_model_states_MiB", "stage1_peak_model_states_MiB",
                    "stage1_peak_rss_MiB", "tokens_per_s", "wall_s"):
            value = float(r[col])
            assert math.isfinite(value) and value > 0, (col, r[col])
        assert 0 < float(r["final_val_loss"]) < math.log(2048) + 1
    # LoRA rank 8 holds more adapter state than rank 4: the per-stage memory columns are real measurements.
    by_name = {r["run"]: r for r in rows}
    assert float(by_name["position=lower,rank=8"]["stage1_peak_model_states_MiB"]) > float(by_name["position=lower,rank=4"]["stage1_peak_model_states_MiB"])
    md = (out / "results.md").read_text().splitlines()
    assert len(md) == 2 + 4 and "position" in md[0] and "final_val_loss" in md[0]
    for png in ("loss_curves.png", "final_val_loss_by_axis.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # 3. A third invocation skips all four and launches nothing.
    third = subprocess.run(_sweep_cmd(sweep_file, out), capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "4 runs, 4 finished earlier, 0 to run" in third.stdout and "0 failed" in third.stdout
    assert (out / "_logs" / "position=upper,rank=8.log").read_text() == victim_log


def test_ctrl_c_says_the_sweep_is_stopping_and_stops_the_run(tmp_path):
    """SIGINT to a sweep whose run is busy: one line says it is stopping, the run's group ends, exit 130."""
    f = write(tmp_path / "s.toml", f'recipe = "{REPO / "recipes" / "step.toml"}"\n')
    script = f"""
import sys
from steptitan.experiments import runner, sweep
runner.launch_command = lambda *a, **k: [sys.executable, "-c", "import time; print('busy', flush=True); time.sleep(60)"]
sys.exit(sweep.main([{str(f)!r}, "--no-progress", "--out", {str(tmp_path / 'out')!r}]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "out" / "_logs" / "base.log"
    deadline = time.monotonic() + 120
    state_file = tmp_path / "out" / "_logs" / "base.json"
    while not (log.is_file() and "busy" in log.read_text() and state_file.is_file()
               and json.loads(state_file.read_text()).get("pgid")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    state = json.loads(state_file.read_text())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "sweep: SIGINT received, stopping: ending run base" in err and "run the same command again" in err
    with pytest.raises(ProcessLookupError):
        os.killpg(state["pgid"], 0)  # the run's whole process group is gone
    assert json.loads((tmp_path / "out" / "_logs" / "base.json").read_text())["status"] == "interrupted"


# --------------------------------------------------------------------------- the sweep command line (issue 16, item 5)


def _tiny_sweep_folder(folder: Path, steps: int, axes: str, checkpoints: bool = True) -> None:
    """A sweep folder with its own small corpus and a 1-layer base recipe."""
    from steptitan.data import stdlib_docstrings

    (folder / "data").mkdir(parents=True)
    text = "\n\n".join(stdlib_docstrings()[:300])
    write(folder / "data" / "train.txt", text[:40000])
    write(folder / "data" / "val.txt", text[40000:50000])
    no_checkpoints = "" if checkpoints else "[checkpoint]\nenabled = false"
    write(folder / "base.toml", f"""
name = "tiny"
[model]
dim = 32
n_layers = 1
n_heads = 2
vocab_size = 512
[data]
files = ["data/train.txt"]
val_files = ["data/val.txt"]
cache_dir = "cache"
[training]
batch_size = 2
seq_len = 16
eval_batches = 1
warmup_steps = 1
steps_per_log = 1
{no_checkpoints}
[[stages]]
steps = {steps}
""")
    write(folder / "tiny.toml", f'recipe = "base.toml"\n{axes}\n')


def _sweep(folder: Path, *args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "steptitan", "sweep", "tiny.toml", *args], cwd=folder,
                          capture_output=True, text=True, env=env, timeout=timeout, **kw)


def test_sweep_check_through_the_cli_names_missing_data_and_model_folders(tmp_path):
    """`steptitan sweep --check` (a subprocess): every run's data files, tokenizer and model.init_from are checked."""
    folder = tmp_path / "exp"
    _tiny_sweep_folder(folder, 2, '[axes]\n"data.files" = [["data/train.txt"], ["data/gone.txt"]]\n'
                                  '[[runs]]\nlabel = "hf"\nset = { "model.init_from" = "hf/missing" }\n')
    proc = _sweep(folder, "--check")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"data.files: '{folder / 'data' / 'gone.txt'}' does not exist" in proc.stderr
    assert f"model.init_from: '{folder / 'hf' / 'missing'}' is not a folder" in proc.stderr  # anchored at the sweep file
    assert "1 of 3 runs valid" in proc.stdout


@pytest.mark.slow  # ~30 s on an idle 2-core machine: a real torchrun run is started, then interrupted
@pytest.mark.dist
def test_ctrl_c_to_the_real_sweep_command_says_it_is_stopping_and_the_run_saves(tmp_path):
    """SIGINT to `python -m steptitan sweep` while its torchrun run trains: the sweep says it is stopping, the run
    gets SIGTERM and saves a checkpoint (steptitan's preemption path), the sweep exits 130; running it again resumes."""
    folder = tmp_path / "exp"
    _tiny_sweep_folder(folder, 100000, '[axes]\n"training.lr" = [0.001]\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "steptitan", "sweep", "tiny.toml", "--no-progress"], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = folder / "runs" / "tiny" / "_logs" / "lr=0.001.log"
    deadline = time.monotonic() + 240
    while not (log.is_file() and re.search(r"step\s+3/100000", log.read_text())):  # training has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "sweep: SIGINT received, stopping: ending run lr=0.001 (its checkpoints are kept), then exiting" in err
    assert "run the same command again to continue" in err
    attempt = log.read_text().rsplit("\n===== ", 1)[-1]
    assert "steptitan: preempted (SIGTERM): saved checkpoint" in attempt, attempt[-3000:]
    state = json.loads((folder / "runs" / "tiny" / "_logs" / "lr=0.001.json").read_text())
    assert state["status"] == "interrupted"
    listed = _sweep(folder, "--list")
    assert listed.stdout.split()[0] == "resume"  # the next invocation resumes from the saved checkpoint


def test_two_sweep_processes_share_a_folder_run_by_run(tmp_path, monkeypatch):
    """A run claimed by another live process (a real one, holding _logs/<run>.lock) is skipped, not run twice;
    once that process is killed (SIGKILL: the kernel drops its flock), the run is taken."""
    f = write(tmp_path / "s.toml", 'recipe = "recipes/step.toml"\n[axes]\ntraining.lr = [0.5, 0.25]\n')
    sw = spec.load_sweep(f, output_dir=str(tmp_path / "out"))
    runner.logs_dir(sw).mkdir(parents=True)
    held = sw.runs[0]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from steptitan.experiments import runner, spec;"
         f"sw = spec.load_sweep(Path({str(f)!r}), output_dir={str(tmp_path / 'out')!r});"
         "c = runner.RunClaim(sw, sw.runs[0]); assert c.held; print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        launched = []

        def fake_launch(sweep, run, status="new", python=None):
            launched.append(run.name)
            folder = runner.run_dir(sweep, run)
            code = (f"import json, pathlib; p = pathlib.Path({str(folder)!r}); p.mkdir(parents=True, exist_ok=True);"
                    "(p / 'summary.json').write_text(json.dumps({'final_val_loss': 1.0, 'stages': []}))")
            return [sys.executable, "-c", code]

        monkeypatch.setattr(runner, "launch_command", fake_launch)
        first = runner.run_sweep(sw, progress=False)
        assert launched == [sw.runs[1].name]
        assert [(r.name, why) for r, why in first["skipped"]] == [(held.name, f"running in another sweep process (pid {holder.pid})")]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    second = runner.run_sweep(sw, progress=False)
    assert launched == [sw.runs[1].name, held.name] and len(second["done"]) == 1
