"""End to end: STEP with SwitchLoRA on the old layers, 2 gloo ranks, resumed mid-stage.

SwitchLoRA carries the most state (per-rank candidate pools, freeze deadlines,
per-row Adam step counts), so a resume that reproduces the uninterrupted run's
validation loss checks the whole PEFT state path: hooks, optimizer class,
DCP save/load of per-row step counts, extra-rank{r}.pt pools.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_torchrun, wikitext_overrides

pytestmark = pytest.mark.dist


def test_step_switchlora_resumes_mid_stage_exactly(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = ["recipes/step_switchlora.toml", *wikitext_overrides(cache_dir), f"output_dir={run_dir}",
            "training.seq_len=32", "training.batch_size=2", "training.warmup_steps=1", "training.eval_batches=2",
            "training.steps_per_log=1", "checkpoint.interval=3", "stages.0.steps=2", "stages.1.steps=6",
            "stages.1.peft.interval0=2", "stages.1.peft.freeze_steps=2"]
    first = run_torchrun(args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    grown = summary["stages"][1]
    mem = [r["peak_step_memory"] for r in grown["ranks"]]
    assert all(m["adapter_pools"] > 0 for m in mem)  # the candidate pools are counted per rank
    assert all(m["grads"] == m["params_trainable"] for m in mem)  # frozen old layers get no gradient

    shutil.rmtree(run_dir / "checkpoints" / "stage01-step000006")
    (run_dir / "summary.json").unlink()
    second = run_torchrun(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stage01-step000003" in second.stdout + second.stderr
    resumed = json.loads((run_dir / "summary.json").read_text())["stages"][1]
    assert resumed["val_loss"] == pytest.approx(grown["val_loss"], rel=1e-5)
    assert resumed["last_loss"] == pytest.approx(grown["last_loss"], rel=1e-5)
