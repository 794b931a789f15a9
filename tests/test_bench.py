"""steptitan bench (tools/bench.py): seed statistics against independent references, the 85% shape rule,
the equal-FLOP schedule, and a real tiny benchmark that is resumed seed by seed and re-reported."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from steptitan.experiments import bench, stats

# Student's t 97.5% quantiles from printed tables (NIST/SEMATECH e-Handbook, Table 1.3.6.7.2).
T975_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045, 40: 2.021, 100: 1.984}


@pytest.mark.parametrize("df, expected", sorted(T975_TABLE.items()))
def test_t_quantile_matches_printed_tables(df, expected):
    assert stats.t975(df) == pytest.approx(expected, abs=6e-4)


def test_paired_ratio_and_interval_against_a_numpy_reference():
    rng = np.random.default_rng(7)
    vanilla = {s: float(v) for s, v in enumerate(rng.uniform(5.0, 6.0, 5))}
    recipe = {s: v * float(rng.uniform(0.97, 1.05)) for s, v in vanilla.items()}
    recipe[99] = 1.0  # a seed vanilla does not have is not paired
    pr = stats.paired_ratio(recipe, vanilla)
    ratios = np.array([recipe[s] / vanilla[s] for s in range(5)])
    half = 2.776 * ratios.std(ddof=1) / math.sqrt(5)  # t(0.975, 4) from the printed table
    assert pr.seeds == list(range(5))
    assert pr.mean == pytest.approx(ratios.mean(), rel=1e-12)
    assert pr.low == pytest.approx(ratios.mean() - half, rel=1e-4)
    assert pr.high == pytest.approx(ratios.mean() + half, rel=1e-4)
    assert pr.no_difference == (pr.low <= 1.0 <= pr.high)


def test_no_difference_label_and_single_seed():
    same = stats.paired_ratio({0: 5.0, 1: 5.2, 2: 4.9}, {0: 5.01, 1: 5.18, 2: 4.91})
    assert same.no_difference
    worse = stats.paired_ratio({0: 5.5, 1: 5.72, 2: 5.39}, {0: 5.0, 1: 5.2, 2: 4.9})  # 1.10 every seed
    assert worse.low > 1.0 and not worse.no_difference
    one = stats.paired_ratio({0: 5.5}, {0: 5.0})
    assert one.mean == 1.1 and one.low is None and not one.no_difference
    mean, sd = stats.mean_sd([5.0, 5.2, 4.9])
    assert mean == statistics.fmean([5.0, 5.2, 4.9]) and sd == pytest.approx(np.std([5.0, 5.2, 4.9], ddof=1))


def test_flops_to_reach_is_the_first_eval_at_or_below_the_target():
    a = [(1.0, 6.0), (2.0, 5.4), (3.0, 5.1), (4.0, 5.0)]
    b = [(1.0, 6.2), (2.0, 5.2), (3.0, 5.3), (4.0, 5.1)]
    curve = stats.mean_curve([a, b])
    assert np.allclose(curve, [(1.0, 6.1), (2.0, 5.3), (3.0, 5.2), (4.0, 5.05)], rtol=1e-12)
    assert stats.flops_to_reach(curve, 5.31) == 2.0
    assert stats.flops_to_reach(curve, 5.0) is None


def _block_share(dim: int, layers: int, vocab: int, ffn: int) -> float:
    block = 4 * dim * dim + 3 * dim * ffn + 2 * dim  # wq wk wv wo, w1 w2 w3, two norms (no GQA)
    return layers * block / (layers * block + 2 * vocab * dim + dim)


def test_shape_rule_refuses_a_shape_whose_blocks_hold_under_85_percent():
    default = bench.BenchShape(dim=64, layers=16, heads=4, vocab=512, ffn=192, seq_len=128, batch=16)  # the bench's
    assert bench.check_shape(default) == pytest.approx(_block_share(64, 16, 512, 192), rel=1e-12)
    assert _block_share(64, 16, 512, 192) > 0.85
    small = bench.BenchShape(dim=128, layers=6, heads=4, vocab=2048, ffn=352, seq_len=128, batch=8)
    assert _block_share(128, 6, 2048, 352) < 0.85
    with pytest.raises(bench.BenchError, match="--allow-small-blocks"):
        bench.check_shape(small)
    assert bench.check_shape(small, allow_small_blocks=True) == pytest.approx(_block_share(128, 6, 2048, 352))
    assert bench.main(["--dim", "128", "--layers", "6", "--ffn", "352", "--vocab", "2048", "--report-only",
                       "--out", "/nonexistent/never-written.md"]) == 2  # refused before anything is written


def test_every_recipe_gets_vanillas_flops_on_the_bench_shape(tmp_path):
    shape = bench.BenchShape(dim=64, layers=6, heads=2, vocab=512, ffn=176, seq_len=32, batch=2)
    text = tmp_path / "t.txt"
    text.write_text("x\n\ny\n\nz\n")
    args = bench.parse_args(["--recipes", "vanilla,step3_trainemb,step_relora", "--seeds", "2", "--budget-tokens", "4096",
                             "--world-size", "2", "--train", str(text), "--val", str(text), "--runs", str(tmp_path / "r"),
                             "--cache", str(tmp_path / "cache"), "--docs", str(tmp_path / "docs"),
                             "--dim", "64", "--layers", "6", "--heads", "2", "--vocab", "512", "--ffn", "176",
                             "--seq-len", "32", "--batch", "2"])
    quality, memory, _, facts = bench.plan_runs(args, shape)
    assert facts["tokens_per_step"] == 2 * 2 * 32 and facts["vanilla_steps"] == 4096 // 128
    assert [r.name for r in quality.runs] == ["vanilla,seed=100", "vanilla,seed=101", "step3_trainemb,seed=100",
                                             "step3_trainemb,seed=101", "step_relora,seed=100", "step_relora,seed=101"]
    from steptitan.experiments.spec import resolved_recipe
    from steptitan.flops import stage_flops_per_token
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict

    for run in quality.runs[::2]:
        recipe = recipe_from_dict(resolved_recipe(run))
        plans = build_plan(recipe)
        assert plans[-1].shape.n_layers == 6 and plans[-1].shape.dim == 64 and recipe.data.files == [str(text)]
        flops = sum(stage_flops_per_token(p, 32).total * 128 * p.steps for p in plans)
        # within one step of the most expensive stage of the budget (rounding of each stage's steps)
        worst_step = max(stage_flops_per_token(p, 32).total * 128 for p in plans)
        assert abs(flops - facts["budget_flops"]) <= len(plans) * worst_step
    assert [p.shape.n_layers for p in build_plan(recipe_from_dict(resolved_recipe(quality.runs[2])))] == [2, 4, 6]
    assert [r.name for r in memory.runs] == ["vanilla", "step3_trainemb", "step_relora"]
    assert all(r.overrides["training.dtype"] == "bfloat16" for r in memory.runs)


@pytest.mark.dist
@pytest.mark.slow  # (~40 s; the sweep runner's resume is tested in test_sweep.py)
def test_tiny_benchmark_resumes_seed_by_seed_and_reports_again(tmp_path):
    from steptitan.data import stdlib_docstrings

    text = "\n\n".join(stdlib_docstrings()[:300])
    (tmp_path / "train.txt").write_text(text[:40000])
    (tmp_path / "val.txt").write_text(text[40000:50000])  # paragraphs: documents of the two slices
    out = tmp_path / "B.md"
    common = ["--recipes", "vanilla", "--parts", "quality", "--budget-tokens", "512", "--world-size", "1",
              "--train", str(tmp_path / "train.txt"), "--val", str(tmp_path / "val.txt"), "--runs", str(tmp_path / "runs"),
              "--cache", str(tmp_path / "cache"), "--out", str(out), "--notes", "", "--no-progress",
              "--docs", str(tmp_path / "docs" / "bench"),
              "--dim", "32", "--layers", "2", "--heads", "2", "--vocab", "512", "--ffn", "96", "--seq-len", "16",
              "--batch", "2", "--eval-batches", "1", "--allow-small-blocks"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def bench_cli(*extra):
        return subprocess.run([sys.executable, "-m", "steptitan", "bench", *common, *extra], capture_output=True,
                              text=True, env=env, timeout=300, cwd=tmp_path)

    first = bench_cli("--seeds", "1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "1 runs, 0 finished earlier, 1 to run" in first.stdout
    second = bench_cli("--seeds", "2")  # seed 100 is finished: only seed 101 runs
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "2 runs, 1 finished earlier, 1 to run" in second.stdout
    report = out.read_text()
    row = next(line for line in report.splitlines() if line.startswith("| vanilla |"))
    assert "| 2 |" in row and "1 (reference)" in row
    out.unlink()
    again = bench_cli("--seeds", "2", "--report-only")

    def body(text: str) -> list[str]:  # a report-only run names its own command, then the last one that ran runs
        return [line for line in text.splitlines() if not line.startswith("Command:")]

    assert again.returncode == 0 and body(out.read_text()) == body(report)
    assert "--report-only` (report only; the last command that ran runs in that folder: `steptitan bench" in out.read_text()
    tag = f"{tmp_path.name}-0.000512M"
    assert (tmp_path / "docs" / "bench" / tag / "loss_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    # The run folders are gone: the ledger (docs/bench/ledger/TAG.json) rebuilds the same tables.
    import shutil

    shutil.rmtree(tmp_path / "runs" / "quality")
    again = bench_cli("--seeds", "2", "--report-only")
    assert again.returncode == 0, again.stderr[-3000:]
    rebuilt = out.read_text()
    assert "2 of the runs were read from the results ledger" in rebuilt
    assert [line for line in rebuilt.splitlines() if line.startswith("| vanilla |")] == \
        [line for line in report.splitlines() if line.startswith("| vanilla |")]


def test_targets_use_the_bound_and_never_a_verdict_for_an_untuned_baseline():
    """A loss target is met only by the one-sided bound over >= 6 seeds; 3 seeds are 'unresolved' whatever
    their mean (the old table called step4 'met' on a mean of 3 seeds); an untuned vanilla makes it open."""
    from steptitan.experiments.bench_report import target_rows
    from steptitan.experiments.stats import non_inferiority

    def row(ratios):
        return {"ni": non_inferiority({s: 3.0 * x for s, x in enumerate(ratios)}, {s: 3.0 for s in range(len(ratios))})}

    q = {"step3": row([1.0, 1.001, 0.999, 1.0, 1.002, 0.998]), "step4": row([1.004, 1.008, 1.006])}
    mem = {"step3": {"vs_vanilla": 0.368}, "step4": {"vs_vanilla": 0.35}}
    got = {(r["row"], r["measure"].split()[0]): r["met"] for r in target_rows("c-1M", q, mem, set())}
    assert got == {("step3", "peak"): "yes", ("step3", "final"): "yes", ("step4", "peak"): "no",
                   ("step4", "final"): "unresolved"}
    open_ = {(r["row"], r["measure"].split()[0]): r["met"] for r in target_rows("c-1M", q, mem, {"vanilla"})}
    assert open_[("step3", "final")] == "open: a row is untuned"
    step_untuned = {(r["row"], r["measure"].split()[0]): r["met"] for r in target_rows("c-1M", q, mem, {"step4"})}
    assert step_untuned[("step3", "final")] == "yes" and step_untuned[("step4", "final")] == "open: a row is untuned"
    none = {(r["row"], r["measure"].split()[0]): r["met"] for r in target_rows("c-1M", {}, mem, set())}
    assert none[("step3", "final")] == "open: no report runs yet"


def test_a_variant_stands_for_a_goal_only_when_the_selection_slice_chose_it():
    """--goal-rows step3=step3_runlr: the step3 targets are measured on step3_runlr's rows (memory and loss),
    labelled as such; refused when the tuning file's selection means prefer step3 itself (protocol 3)."""
    import argparse

    from steptitan.experiments.bench_args import parse_goal_rows
    from steptitan.experiments.bench_report import goal_row_problem, target_rows, targets_table
    from steptitan.experiments.stats import non_inferiority

    ap = argparse.ArgumentParser()
    goals = parse_goal_rows("step3=step3_runlr", ap)
    assert goals == {"step3": "step3_runlr", "step4": "step4"}
    for bad in ("step5=x", "step3", "step3="):
        with pytest.raises(SystemExit):
            parse_goal_rows(bad, ap)
    q = {"step3": {"ni": non_inferiority({0: 3.3}, {0: 3.0})},  # the recipe itself would miss
         "step3_runlr": {"ni": non_inferiority({s: 3.0 for s in range(6)}, {s: 3.0 + 0.001 * s for s in range(6)})}}
    mem = {"step3": {"vs_vanilla": 0.45}, "step3_runlr": {"vs_vanilla": 0.368}}
    rows = [r for r in target_rows("c-1M", q, mem, set(), goals) if r["goal"] == "step3"]
    assert [(r["row"], r["value"].split()[0], r["met"]) for r in rows] == \
        [("step3_runlr", "0.368x", "yes"), ("step3_runlr", rows[1]["value"].split()[0], "yes")]
    assert "| step3_runlr (for step3) |" in "\n".join(targets_table(rows))

    def tuned(means):  # a tuning file's rows: each row's trials with their mean selection loss
        return {name: {"trials": [{"mean": m + 0.05}, {"mean": m}]} for name, m in means.items()}

    assert goal_row_problem(goals, tuned({"step3": 2.93, "step3_runlr": 2.90})) is None
    assert goal_row_problem(goals, {}) is None  # nothing tuned yet: the untuned verdict says so
    problem = goal_row_problem(goals, tuned({"step3": 2.90, "step3_runlr": 2.93}))
    assert problem and "prefers step3 (2.9000 < 2.9300)" in problem


def test_bare_fsdp_per_round_ratios_by_hand():
    """--rounds: per-round tokens/s of each loop and the ratio of every later loop to every earlier one."""
    from steptitan.experiments.bare_fsdp import per_round

    # 10 tokens a step; round 1 = steps 0-1, round 2 = steps 2-3
    out = per_round({"bare": [1.0, 1.0, 2.0, 2.0], "v": [2.0, 2.0, 2.0, 2.0]}, step_tokens=10, n_rounds=2)
    assert out["tokens_per_s"] == {"bare": [10.0, 5.0], "v": [5.0, 5.0]}
    assert out["ratios"] == {"v / bare": {"median": 0.75, "min": 0.5, "max": 1.0, "per_round": [0.5, 1.0]}}


def test_report_plots_are_pngs(tmp_path):
    from steptitan.experiments import report

    curve = report.plot_curves({"vanilla": [(1.0, 4.0), (2.0, 3.5)], "step3": [(1.0, 4.2), (2.0, 3.6)]},
                               tmp_path / "a" / "curves.png", target=3.5)
    pareto = report.plot_pareto([("vanilla", 1.0, 1.0, None, None), ("step3", 0.37, 1.005, 0.98, 1.03)],
                                tmp_path / "b" / "pareto.png")
    for path in (curve, pareto):
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_paired_comparison_of_two_sweep_arms(tmp_path, capsys):
    """`steptitan paired`: per-seed differences, their mean and sd by hand; the curve is read from the log."""
    import json
    import statistics

    from steptitan.experiments import paired

    finals = {("a", 0): 3.50, ("a", 1): 3.60, ("a", 2): 3.40, ("b", 0): 3.55, ("b", 1): 3.62, ("b", 2): 3.47}
    (tmp_path / "_logs").mkdir()
    for (arm, seed), final in finals.items():
        run = tmp_path / f"{arm},seed={seed}"
        run.mkdir()
        stages = [{"steps": 10, "val_loss": final + 0.5, "trainable_params": 100},
                  {"steps": 10, "val_loss": final, "trainable_params": 40}]
        (run / "summary.json").write_text(json.dumps({"final_val_loss": final, "world_size": 2, "stages": stages}))
        (run / "recipe.json").write_text(json.dumps({"training": {"batch_size": 4, "seq_len": 8}}))
        (tmp_path / "_logs" / f"{run.name}.log").write_text(
            "===== old attempt\n[stage 0] step 5: val loss 9.0\n===== last\n"
            f"[stage 0] step 10: val loss {final + 0.5}\n[stage 1] step 10: val loss {final}\n")
    assert paired.main([str(tmp_path), "a", "b", "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    diffs = [finals["a", s] - finals["b", s] for s in range(3)]
    assert f"mean {statistics.mean(diffs):+.4f}, sd {statistics.stdev(diffs):.4f} -> a lower" in out
    assert f"| a | {statistics.mean([3.5, 3.6, 3.4]):.4f} ± {statistics.stdev([3.5, 3.6, 3.4]):.4f} |" in out
    # tokens per step = 4 x 8 x 2 ranks; the last attempt only; stage 1 starts after stage 0's 10 steps
    assert paired.val_curve(tmp_path, tmp_path / "a,seed=0") == [(10 * 64, 4.0), (20 * 64, 3.5)]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
