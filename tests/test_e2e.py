"""End to end: recipes/step.toml under torchrun on 2 gloo ranks, on WikiText-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_torchrun, wikitext_overrides

pytestmark = pytest.mark.dist


def _tb_tags(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in tb_dir.glob("events.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_step_recipe_two_ranks_then_resume(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    common = wikitext_overrides(cache_dir) + [
        f"output_dir={run_dir}", "training.seq_len=64", "training.batch_size=4",
        "training.steps_per_log=5", "training.warmup_steps=2", "training.eval_batches=4",
        "checkpoint.interval=4",
    ]
    first = run_torchrun(["recipes/step.toml", *common, "stages.0.steps=12", "stages.1.steps=6"])
    assert first.returncode == 0, first.stderr[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    s0, s1 = summary["stages"]
    # The loss decreases: stage 0 ends well below the uniform-prediction loss ln(2048) = 7.62,
    # and the grown model improves on stage 0.
    assert s0["first_loss"] > s0["last_loss"] + 0.5
    assert s1["val_loss"] < s0["val_loss"]
    # Stage 1: old layers frozen under LoRA, new layers and adapters trained.
    groups = s1["trainable_by_group"]
    assert groups["old"] == 0 and groups["adapters"] > 0 and groups["new"] > 0
    assert s1["frozen_by_group"]["old"] > 0 and s1["frozen_by_group"]["adapters"] == 0
    assert s0["trainable_by_group"]["old"] == 0 and s0["frozen_params"] == 0
    # Checkpoints (intervals + stage ends) and TensorBoard events exist.
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["stage00-step000004", "stage00-step000008", "stage00-step000012",
                     "stage01-step000004", "stage01-step000006"]
    tags = _tb_tags(run_dir / "tb")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "stage", "val/loss"} <= tags
    assert {"memory/rank0/params_trainable", "memory/rank1/optimizer", "memory/rank1/grads"} <= tags

    # Resume: drop the last checkpoint and the summary, run again: it continues
    # from stage 1 step 4 and trains exactly steps 5..6.
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "stage01-step000006")
    (run_dir / "summary.json").unlink()
    second = run_torchrun(["recipes/step.toml", *common, "stages.0.steps=12", "stages.1.steps=6"])
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert "resuming from" in out and "stage01-step000004" in out
    assert "[stage 0] step" not in out  # stage 0 is not trained again
    assert "[stage 1] step     5/6" in out and "[stage 1] step     4/6" not in out
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert [s["index"] for s in resumed["stages"]] == [0, 1]
    assert resumed["stages"][1]["val_loss"] == pytest.approx(s1["val_loss"], rel=1e-4)


@pytest.mark.slow  # issue 23 item 10: a one-rank run without torchrun and its "already finished" re-run are
# test_run_safety.py's fast tests (tiny_one_rank runs `python -m steptitan.train`; the re-run is
# test_rerunning_a_finished_run_leaves_it_untouched); checkpoint.enabled=false: test_everyday / in-process trainers
def test_vanilla_single_process_without_torchrun(tmp_path, cache_dir):
    """World size 1, no torchrun: the same code path (FSDP2 over a one-rank gloo group)."""
    import subprocess
    import sys

    run_dir = tmp_path / "vanilla"
    args = wikitext_overrides(cache_dir) + [f"output_dir={run_dir}", "training.seq_len=32", "training.batch_size=4",
                                            "stages.0.steps=4", "training.warmup_steps=1", "training.eval_batches=2",
                                            "checkpoint.enabled=false"]
    proc = subprocess.run([sys.executable, "-m", "steptitan.train", "recipes/vanilla.toml", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["stages"][0]["n_layers"] == 4
    assert not (run_dir / "checkpoints").exists()
    # Launching the same finished run again (a re-queued job) is a no-op that says so: exit 0, nothing rewritten.
    before = (run_dir / "summary.json").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-m", "steptitan.train", "recipes/vanilla.toml", *args],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stderr, again.stderr[-2000:]
    assert (run_dir / "summary.json").stat().st_mtime_ns == before


@pytest.mark.slow  # issue 23 item 10: three training runs; the refusal (same check, rundir._check_fingerprint) is
# test_run_safety.py::test_resume_path_from_another_plan_is_refused_before_any_process_group, and which recipe
# changes alter the plan's identity is test_run_safety.py::test_the_plan_fingerprint_ignores_steps_not_the_model
def test_checkpoints_of_a_different_plan_are_not_resumed(tmp_path, cache_dir):
    """A folder whose checkpoints came from another stage plan is refused before any process starts."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    args = wikitext_overrides(cache_dir) + [f"output_dir={run_dir}", "training.seq_len=32", "training.batch_size=2",
                                            "stages.0.steps=2", "stages.1.steps=1", "training.eval_batches=1"]
    cmd = [sys.executable, "-m", "steptitan.train", "recipes/step.toml", *args]
    first = subprocess.run(cmd + ["checkpoint.interval=1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    # More steps with the same plan: resumes (the step count is not part of the plan's identity).
    longer = subprocess.run(cmd + ["stages.1.steps=2"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert longer.returncode == 0 and "resuming from" in longer.stdout + longer.stderr, longer.stderr[-3000:]
    other = subprocess.run(cmd + ["stages.1.peft.rank=4"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert other.returncode == 2 and "different stage plan" in other.stderr
