"""End to end: recipes/width.toml (bert2BERT FPI width growth, moments carried) under torchrun on 2 gloo ranks."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_torchrun, wikitext_overrides

pytestmark = pytest.mark.dist


def test_width_recipe_grows_exactly_and_trains(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_torchrun(["recipes/width.toml", *wikitext_overrides(cache_dir), f"output_dir={run_dir}",
                         "training.seq_len=64", "training.batch_size=4", "training.steps_per_log=1",
                         "training.warmup_steps=2", "training.eval_batches=4", "checkpoint.enabled=false",
                         "training.lr=4e-3", "stages.0.steps=30", "stages.1.steps=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "grew with bert2bert in " in out and "s: dim 64 -> 128, heads 2 -> 4, kv heads 2 -> 4, FFN 176 -> 352, 2 layers" in out
    s0, s1 = json.loads((run_dir / "summary.json").read_text())["stages"]
    assert (s0["dim"], s1["dim"]) == (64, 128)
    # Exact growth: the wide model starts where the narrow one ended, not from scratch (ln 2048 = 7.6).
    assert s0["first_loss"] - s0["last_loss"] > 0.5
    assert abs(s1["first_loss"] - s0["last_loss"]) < 0.5 * (s0["first_loss"] - s0["last_loss"])
    assert math.isfinite(s1["val_loss"]) and s1["val_loss"] < s0["val_loss"] + 0.05
