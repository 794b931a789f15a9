"""The benchmark's downstream column (steptitan/experiments/downstream.py): report runs keep their final
checkpoint, scores travel from ``<run>/eval/downstream.json`` into the ledger and the reports, and the
paired difference to vanilla is the t-interval worked out by hand."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from steptitan.experiments import bench, bench_report, downstream
from steptitan.experiments.ledger import Ledger

WIKI = "".join(f" = Article {k} = \n\n Text of article {k} , with words .\n\n" for k in range(9))


def _args(tmp_path: Path, *extra: str):
    (tmp_path / "t.txt").write_text("x\n")
    (tmp_path / "v.txt").write_text(WIKI)
    return bench.parse_args(["--train", str(tmp_path / "t.txt"), "--val", str(tmp_path / "v.txt"),
                             "--docs", str(tmp_path / "docs"), "--cache", str(tmp_path / "cache"),
                             "--runs", str(tmp_path / "runs"), "--recipes", "vanilla,dense:4", "--seeds", "2",
                             "--dim", "64", "--layers", "6", "--heads", "2", "--vocab", "512", "--ffn", "176",
                             "--seq-len", "32", "--batch", "2", "--budget-tokens", "4096", *extra])


def test_report_runs_keep_their_final_checkpoint_and_selection_runs_none(tmp_path):
    shape = bench.BenchShape(dim=64, layers=6, heads=2, vocab=512, ffn=176, seq_len=32, batch=2)
    quality, memory, memory_ac, _ = bench.plan_runs(_args(tmp_path), shape)
    for run in quality.runs:
        assert run.overrides["checkpoint.enabled"] is True
        assert run.overrides["checkpoint.interval"] == 0 and run.overrides["checkpoint.keep_last"] == 1
    for run in (*memory.runs, *memory_ac.runs):  # memory runs (and their ledger keys) are unchanged
        assert run.overrides["checkpoint.enabled"] is False
    selection, *_ = bench.plan_runs(_args(tmp_path, "--slice", "selection"), shape)
    assert all(run.overrides["checkpoint.enabled"] is False for run in selection.runs)


def test_paired_difference_is_the_t_interval_worked_by_hand():
    row = {100: 0.30, 101: 0.26, 102: 0.28}
    van = {100: 0.25, 101: 0.27, 102: 0.24, 103: 0.9}  # 103 has no partner: not used
    # differences 0.05, -0.01, 0.04: mean 0.08/3, sd sqrt(((0.07/3)^2 + (0.11/3)^2 + (0.04/3)^2) / 2)
    mean = 0.08 / 3
    sd = math.sqrt(((0.07 / 3) ** 2 + (0.11 / 3) ** 2 + (0.04 / 3) ** 2) / 2)
    half = 4.303 * sd / math.sqrt(3)  # t(0.975, 2) from a printed table
    d, low, high = downstream.paired_difference(row, van)
    assert d == pytest.approx(mean, rel=1e-12)
    assert low == pytest.approx(mean - half, rel=1e-3) and high == pytest.approx(mean + half, rel=1e-3)
    assert downstream.verdict({"diff": d, "low": low, "high": high}, True) == "no difference"
    assert downstream.paired_difference({0: 0.3}, {0: 0.25})[1:] == (None, None)
    # every seed 0.05 better in accuracy but 0.05 worse in NLL (lower is better)
    up = downstream.paired_difference({0: 0.30, 1: 0.31, 2: 0.29}, {0: 0.25, 1: 0.255, 2: 0.245})
    assert downstream.verdict(dict(zip(("diff", "low", "high"), up)), True) == "better"
    assert downstream.verdict(dict(zip(("diff", "low", "high"), up)), False) == "worse"


def _fake_run(folder: Path, loss: float, scores: dict[str, float] | None) -> None:
    folder.mkdir(parents=True)
    stage = {"steps": 4, "train_flops": 1e9, "n_layers": 6, "val_block_losses": [loss, loss]}
    (folder / "summary.json").write_text(json.dumps({"final_val_loss": loss, "stages": [stage]}))
    if scores is not None:
        (folder / "eval").mkdir()
        (folder / "eval" / downstream.OUT_NAME).write_text(json.dumps({"scores": scores}))


def test_scores_reach_the_ledger_the_report_and_the_summary(tmp_path):
    """collect() attaches each run's eval/downstream.json; the ledger keeps it when the folders are gone;
    the report and BENCHMARKS.md show the means and the paired interval (expected values by hand)."""
    shape = bench.BenchShape(dim=64, layers=6, heads=2, vocab=512, ffn=176, seq_len=32, batch=2)
    args = _args(tmp_path)
    quality, *_ = bench.plan_runs(args, shape)
    choice = {"vanilla,seed=100": 0.25, "vanilla,seed=101": 0.30, "dense4,seed=100": 0.27, "dense4,seed=101": 0.29}
    for run in quality.runs:
        ppl = math.exp(6.0 + choice[run.name])
        _fake_run(bench.runner.run_dir(quality, run), 4.0,
                  {"kjv_choice/acc": choice[run.name], "kjv_cloze/acc": 0.0, "kjv_cloze/perplexity": ppl})
    ledger = Ledger(tmp_path / "ledger.json")
    got = bench.collect(quality, ledger)
    assert got["dense4"][101]["downstream"]["kjv_choice/acc"] == 0.29
    assert got["vanilla"][100]["downstream"]["kjv_cloze/nll"] == pytest.approx(6.25, rel=1e-12)
    ledger.save()
    shutil.rmtree(tmp_path / "runs")
    again = bench.collect(quality, Ledger(tmp_path / "ledger.json"))
    assert again["dense4"][100]["downstream"] == got["dense4"][100]["downstream"]

    rows = downstream.downstream_rows(again)
    van = rows["vanilla"]["kjv_choice/acc"]
    assert van["mean"] == pytest.approx(0.275) and van["sd"] == pytest.approx(math.sqrt(2 * 0.025**2))
    dense = rows["dense4"]["kjv_choice/acc"]
    # differences +0.02, -0.01: mean 0.005, sd sqrt(2 * 0.015^2), t(0.975, 1) = 12.706
    half = 12.706 * math.sqrt(2 * 0.015**2) / math.sqrt(2)
    assert dense["diff"] == pytest.approx(0.005) and dense["high"] == pytest.approx(0.005 + half, rel=1e-4)
    text = "\n".join(downstream.downstream_section(rows))
    assert "| dense4 | kjv_choice acc | 0.25 | 2 | 0.2800 +- 0.0141 |" in text and "no difference" in text
    assert "| vanilla | kjv_cloze word NLL (nats) | - | 2 | 6.2750 +- 0.0354 | - |" in text

    data = {"tag": "T", "rows": {n: {"downstream": r} for n, r in rows.items()}}
    summary = bench_report.downstream_summary_rows(data)
    assert summary[1].startswith(f"| T | dense4 | 2 | 0.280 [{0.005 - half:+.3f}, {0.005 + half:+.3f}] |")
    assert summary[0].startswith("| T | vanilla | 2 | 0.275 |")


@pytest.mark.slow  # (~60 s quiet: a tiny training and lm-eval; the plumbing is covered by the tests above)
def test_bench_downstream_part_evaluates_each_report_run(tmp_path):
    pytest.importorskip("lm_eval")
    from steptitan.data import stdlib_docstrings

    text = "\n\n".join(stdlib_docstrings()[:300])
    (tmp_path / "train.txt").write_text(text[:40000])
    (tmp_path / "val.txt").write_text(text[40000:50000])
    out = tmp_path / "B.md"
    cmd = [sys.executable, "-m", "steptitan", "bench", "--recipes", "vanilla", "--parts", "quality,downstream",
           "--budget-tokens", "512", "--seeds", "1", "--eval-limit", "4", "--train", str(tmp_path / "train.txt"),
           "--val", str(tmp_path / "val.txt"), "--runs", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
           "--out", str(out), "--notes", "", "--no-progress", "--docs", str(tmp_path / "docs"),
           "--dim", "32", "--layers", "2", "--heads", "2", "--vocab", "512", "--ffn", "96", "--seq-len", "64",  # the tasks' continuations fit the trained context
           "--batch", "2", "--eval-batches", "1", "--allow-small-blocks"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    evals = sorted((tmp_path / "runs" / "quality").glob("*/eval/downstream.json"))
    assert len(evals) == 1
    for path in evals:
        assert [p.name for p in (path.parent.parent / "checkpoints").glob("stage*")] != []
        record = json.loads(path.read_text())
        assert record["limit"] == 4 and set(record["tasks"]) == set(downstream.TASKS)
    acc = json.loads(evals[0].read_text())["scores"]["kjv_choice/acc"]
    assert f"| vanilla | kjv_choice acc | 0.25 | 1 | {acc:.4f} | - |" in out.read_text()
