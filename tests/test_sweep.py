"""tools/sweep.py: sweep files, run names, launch commands, failures, and a real 2x2 sweep that is killed and resumed."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, WIKITEXT

spec = importlib.util.spec_from_file_location("steptitan_tools_sweep", REPO / "tools" / "sweep.py")
sweep_tool = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sweep_tool
spec.loader.exec_module(sweep_tool)


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
    sw = sweep_tool.load_sweep(f, output_dir=str(tmp_path / "out"))
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
    sw = sweep_tool.load_sweep(f)
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
    with pytest.raises(sweep_tool.SweepError, match=message):
        sweep_tool.load_sweep(f)


def test_run_names_use_shortest_unique_key_suffix():
    names = sweep_tool._short_keys(["stages.1.peft.rank", "stages.2.peft.rank", "training.lr"])
    assert names == {"stages.1.peft.rank": "1.peft.rank", "stages.2.peft.rank": "2.peft.rank", "training.lr": "lr"}
    assert sweep_tool.run_name({"a.x": "has space/slash", "b.y": True}) == "x=has_space_slash,y=true"


scalars = st.one_of(
    st.integers(-10**12, 10**12), st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
)


@settings(max_examples=200)
@given(st.one_of(scalars, st.lists(scalars, max_size=4)))
def test_override_text_parses_back_to_the_same_value(value):
    """Whatever a sweep axis holds reaches the run as exactly that value (type included)."""
    from steptitan.recipe import parse_overrides

    ((_, parsed),) = parse_overrides([f"k={sweep_tool.format_value(value)}"])
    assert parsed == value and type(parsed) is type(value)


def test_write_commands_with_an_sbatch_template(tmp_path):
    f = write(tmp_path / "s.toml", """
recipe = "recipes/step.toml"
nproc = 4
[axes]
stages.1.growth.position = ["upper", "lower"]
""")
    sw = sweep_tool.load_sweep(f, output_dir=str(tmp_path / "out"))
    out = tmp_path / "cmds.sh"
    n = sweep_tool.write_commands(sw, out, "sbatch --job-name={name} --wrap={command_q}")
    lines = out.read_text().splitlines()
    assert n == 2 and len(lines) == 2
    for line, run in zip(lines, sw.runs):
        argv = shlex.split(line)
        assert argv[:2] == ["sbatch", f"--job-name={run.name}"]
        inner = shlex.split(argv[2].removeprefix("--wrap="))
        assert inner[:5] == ["torchrun", "--standalone", "--nproc_per_node=4", "-m", "steptitan.train"]
        assert inner[5] == "recipes/step.toml"  # repo-relative: the commands run from the repo root
        assert f"stages.1.growth.position={run.values['stages.1.growth.position']}" in inner
        assert inner[-1] == f"output_dir={tmp_path / 'out' / run.name}"


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
    sw = sweep_tool.load_sweep(f, output_dir=str(tmp_path / "out"))

    def fake_launch(sweep, run, status="new", python=None):
        folder = sweep_tool.run_dir(sweep, run)
        if run.overrides["training.lr"] == 0.5:
            return [sys.executable, "-c", "import sys; print('line one'); print('the crash reason: boom'); sys.exit(3)"]
        code = (f"import json, pathlib; p = pathlib.Path({str(folder)!r}); p.mkdir(parents=True);"
                f"(p / 'summary.json').write_text(json.dumps({{'final_val_loss': {run.overrides['training.lr']}, 'stages': []}}))")
        return [sys.executable, "-c", code]

    monkeypatch.setattr(sweep_tool, "launch_command", fake_launch)
    report = sweep_tool.run_sweep(sw, progress=False)
    assert [r.name for r, _ in report["done"]] == ["lr=0.25", "lr=0.125"]
    assert [(r.name, why) for r, why in report["failed"]] == [("lr=0.5", "exit code 3"), ("invalid", "invalid recipe")]
    sweep_tool.print_report(sw, report)
    out = capsys.readouterr().out
    assert "FAILED: lr=0.5 (exit code 3)" in out and "the crash reason: boom" in out
    assert "FAILED: invalid (invalid recipe)" in out and "rank must be > 0" in out
    rows = sweep_tool.collect_results(sw)
    assert [r["status"] for r in rows] == ["failed", "finished", "finished", "failed"]
    assert [r.get("final_val_loss") for r in rows] == [None, 0.25, 0.125, None]
    # Run again: the two finished runs are skipped, the failed ones are tried again.
    again = sweep_tool.run_sweep(sw, progress=False)
    assert len(again["skipped"]) == 2 and len(again["failed"]) == 2 and not again["done"]


def test_a_run_made_with_other_overrides_is_not_silently_reused(tmp_path, monkeypatch):
    f = write(tmp_path / "s.toml", 'recipe = "recipes/step.toml"\n[set]\ntraining.lr = 0.5\n')
    sw = sweep_tool.load_sweep(f, output_dir=str(tmp_path / "out"))
    folder = sweep_tool.run_dir(sw, sw.runs[0])
    make = [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(folder)!r}); p.mkdir(parents=True, exist_ok=True); (p / 'summary.json').write_text('{{}}')"]
    seen = []
    monkeypatch.setattr(sweep_tool, "launch_command", lambda sweep, run, status="new", python=None: seen.append(status) or make)
    assert len(sweep_tool.run_sweep(sw, progress=False)["done"]) == 1
    write(f, 'recipe = "recipes/step.toml"\n[set]\ntraining.lr = 0.25\n')  # same run name, other recipe
    sw = sweep_tool.load_sweep(f, output_dir=str(tmp_path / "out"))
    with pytest.raises(sweep_tool.SweepError, match="rerun-stale"):
        sweep_tool.run_sweep(sw, progress=False)
    assert len(sweep_tool.run_sweep(sw, progress=False, rerun_stale=True)["done"]) == 1
    assert seen == ["new", "stale"]


# --------------------------------------------------------------------------- a real sweep, killed and resumed


def _sweep_cmd(sweep_file: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "sweep.py"), str(sweep_file), "--out", str(out), "--no-progress"]


@pytest.mark.dist
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
