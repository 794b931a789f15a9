"""The benchmark's protocol (issue 22): document slices, seeds, the tuning rule, the non-inferiority bound
and the block bootstrap, each against values worked out by hand or an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steptitan.experiments import bench, stats, tuning
from steptitan.experiments.splits import documents, split_documents, write_slices

WIKI = (" \n = Alpha = \n \n Alpha text one . \n \n = = Section = = \n \n More alpha . \n"
        " = Beta = \n \n Beta text . \n = Gamma = \n Gamma text . \n = Delta = \n Delta . \n")


def test_wikitext_documents_are_articles_with_their_sections():
    docs = documents(WIKI)
    assert len(docs) == 4
    assert docs[0].startswith(" \n = Alpha = ") and "= = Section = =" in docs[0] and "More alpha" in docs[0]
    assert docs[1].startswith(" = Beta = ") and docs[3].startswith(" = Delta = ")
    assert "".join(docs) == WIKI  # nothing lost, nothing moved


def test_paragraph_documents_and_the_auto_rule():
    text = "Chapter one words.\n\nChapter two.\nstill two.\n\n\nChapter three.\n"
    assert documents(text) == ["Chapter one words.\n\n", "Chapter two.\nstill two.\n\n\n", "Chapter three.\n"]
    assert documents(text, "paragraph") == documents(text)
    one_heading = " = Only = \n\nbody\n\nmore\n"  # a single heading is not WikiText: paragraphs
    assert len(documents(one_heading)) == 3
    with pytest.raises(ValueError, match="unknown document rule"):
        documents(text, "lines")


def test_every_third_document_goes_to_selection_and_none_to_both():
    docs = [f"d{i}\n" for i in range(10)]
    sel, rep = split_documents(docs, 3)
    assert sel == ["d0\n", "d3\n", "d6\n", "d9\n"]
    assert rep == ["d1\n", "d2\n", "d4\n", "d5\n", "d7\n", "d8\n"]
    with pytest.raises(ValueError, match="at least 3"):
        split_documents(docs[:2], 3)
    with pytest.raises(ValueError, match=">= 2"):
        split_documents(docs, 1)


def test_slices_are_written_once_per_text_and_settings(tmp_path):
    val = tmp_path / "val.txt"
    val.write_text(WIKI)
    a = write_slices(val, tmp_path / "cache")
    assert a.selection.read_text() == documents(WIKI)[0] + documents(WIKI)[3]
    assert a.report.read_text() == documents(WIKI)[1] + documents(WIKI)[2]
    assert a.info["selection_documents"] == 2 and a.info["report_documents"] == 2
    assert write_slices(val, tmp_path / "cache").selection == a.selection
    b = write_slices(val, tmp_path / "cache", select_every=2)  # other settings: another folder
    assert b.selection != a.selection and b.selection.read_text() == documents(WIKI)[0] + documents(WIKI)[2]
    val.write_text(WIKI + " = Epsilon = \n E .\n")  # another text: another folder, never stale slices
    assert write_slices(val, tmp_path / "cache").selection.parent != a.selection.parent


def _args(tmp_path, *extra):
    train = tmp_path / "train.txt"
    train.write_text("some training text\n")
    val = tmp_path / "val.txt"
    val.write_text(WIKI)
    return bench.parse_args(["--train", str(train), "--val", str(val), "--cache", str(tmp_path / "cache"),
                             "--docs", str(tmp_path / "docs"), "--runs", str(tmp_path / "runs"),
                             "--dim", "64", "--layers", "6", "--heads", "2", "--vocab", "512", "--ffn", "176",
                             "--seq-len", "32", "--batch", "2", "--budget-tokens", "4096", *extra])


def test_report_runs_take_fresh_seeds_and_the_report_slice(tmp_path):
    shape = bench.BenchShape(dim=64, layers=6, heads=2, vocab=512, ffn=176, seq_len=32, batch=2)
    args = _args(tmp_path, "--recipes", "vanilla,step3,dense:2,step3@tokens", "--seeds", "2")
    quality, memory, memory_ac, facts = bench.plan_runs(args, shape)
    assert args.slice == "report" and args.tag == "tmp_path-0.004096M".replace("tmp_path", tmp_path.name)
    assert [r.name for r in quality.runs][:2] == ["vanilla,seed=100", "vanilla,seed=101"]
    assert {r.overrides["data.val_files"][0] for r in quality.runs} == {str(write_slices(
        tmp_path / "val.txt", tmp_path / "cache").report)}
    assert all(r.overrides["training.frozen_dtype"] == "bfloat16" for r in quality.runs)  # the memory column's policy
    assert all(r.overrides["training.final_eval_batches"] == 0 for r in quality.runs)  # the report slice in full
    by_name = {r.name.split(",")[0]: r for r in quality.runs}
    assert by_name["dense2"].overrides["model.n_layers"] == 2
    assert sum(facts["steps"]["step3@tokens"]) == facts["vanilla_steps"]  # equal tokens
    assert sum(facts["steps"]["dense2"]) > facts["vanilla_steps"]  # equal FLOPs on a smaller model: more steps
    assert [r.name for r in memory.runs] == ["vanilla", "step3", "dense2"]  # @tokens has step3's stages
    assert all(r.overrides["training.activation_checkpointing"] for r in memory_ac.runs)
    sel = _args(tmp_path, "--recipes", "vanilla", "--seeds", "2", "--slice", "selection")
    q, *_ = bench.plan_runs(sel, shape)
    assert [r.name for r in q.runs] == ["vanilla,seed=0", "vanilla,seed=1"]
    assert q.runs[0].overrides["data.val_files"][0].endswith("selection.txt")


def test_a_selection_slice_run_writes_no_report_and_tune_refuses_the_report_slice(tmp_path, capsys):
    args = ["--train", str(tmp_path / "t.txt"), "--val", str(tmp_path / "v.txt"), "--docs", str(tmp_path / "docs"),
            "--cache", str(tmp_path / "cache"), "--runs", str(tmp_path / "runs"), "--recipes", "vanilla",
            "--dim", "64", "--layers", "6", "--heads", "2", "--vocab", "512", "--ffn", "176", "--seq-len", "32",
            "--batch", "2", "--budget-tokens", "4096", "--report-only", "--allow-small-blocks"]
    (tmp_path / "t.txt").write_text("x\n")
    (tmp_path / "v.txt").write_text(WIKI)
    assert bench.main([*args, "--tune", "--slice", "report"]) == 2
    assert "selection slice only" in capsys.readouterr().err
    assert bench.main([*args, "--slice", "selection", "--parts", "quality"]) == 0
    assert "write no report" in capsys.readouterr().out
    assert not (tmp_path / "docs" / f"{tmp_path.name}-0.004096M.md").exists()
    assert bench.main([*args, "--train", "stdlib-docs"]) == 2  # no validation file to slice
    # a record-only tuning look writes the trials page; its command names no folder of this machine
    assert bench.main([*args, "--tune"]) == 0
    trials = next((tmp_path / "docs" / "tuning").glob("*.md")).read_text()
    assert "--runs RUNS " in trials and str(tmp_path / "runs") not in trials


def test_tuning_extends_the_grid_at_its_edge_then_tries_the_long_warmup():
    grid = (1e-3, 2e-3, 4e-3, 8e-3)
    assert tuning.next_configs({}, grid) == [(x, "short") for x in grid]
    # best at the top edge: extend upwards, one step at a time
    done = {(1e-3, "short"): 4.0, (2e-3, "short"): 3.8, (4e-3, "short"): 3.6, (8e-3, "short"): 3.5}
    assert tuning.next_configs(done, grid) == [(16e-3, "short")]
    done[(16e-3, "short")] = 3.55  # 8e-3 is now inside: the long warmup at it
    assert tuning.next_configs(done, grid) == [(8e-3, "long")]
    done[(8e-3, "long")] = 3.45
    assert tuning.next_configs(done, grid) == []
    assert tuning.choose(done) == (8e-3, "long", "") and not tuning.at_edge(done)
    # best at the bottom edge: extend downwards; the extension stops after MAX_EXTEND steps
    low = {(x, "short"): 3.0 + x for x in grid}
    assert tuning.next_configs(low, grid) == [(0.5e-3, "short")]
    for k in range(1, tuning.MAX_EXTEND + 1):
        low[(1e-3 / 2**k, "short")] = 3.0
    assert tuning.next_configs(low, grid) == [(1e-3 / 2**tuning.MAX_EXTEND, "long")]
    low[(1e-3 / 2**tuning.MAX_EXTEND, "long")] = 3.1
    assert tuning.next_configs(low, grid) == [] and tuning.at_edge(low)


def test_long_warmup_is_five_percent_of_each_schedule():
    assert tuning.warmup_overrides([311, 311, 156], "stage", "short") == {}
    assert tuning.warmup_overrides([311, 311, 156], "stage", "long") == {
        "stages.0.warmup_steps": 16, "stages.1.warmup_steps": 16, "stages.2.warmup_steps": 8}
    assert tuning.warmup_overrides([311, 311, 156], "run", "long") == {"training.warmup_steps": 39}


def _t_cdf(x: float, df: int) -> float:
    """Student's t CDF by Simpson integration of its density (independent of the tables under test)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 20000
    h = x / n
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


@pytest.mark.parametrize("df", [1, 2, 3, 5, 8, 11, 20, 30, 31, 45])
def test_one_sided_t_quantile_against_the_integrated_density(df):
    assert _t_cdf(stats.t95(df), df) == pytest.approx(0.95, abs=2e-6)
    assert _t_cdf(stats.t975(df), df) == pytest.approx(0.975, abs=2e-6)


def test_non_inferiority_bound_by_hand():
    vanilla = {100: 3.0, 101: 3.2, 102: 2.9}
    recipe = {100: 3.03, 101: 3.2, 102: 2.9 * 1.005, 7: 1.0}  # seed 7 unpaired
    ni = stats.non_inferiority(recipe, vanilla)
    r = [1.01, 1.0, 1.005]  # mean 1.005, sd 0.005
    assert ni.seeds == [100, 101, 102] and ni.ratios == pytest.approx(r)
    assert ni.mean == pytest.approx(1.005)
    assert ni.upper == pytest.approx(1.005 + 2.919986 * 0.005 / math.sqrt(3), rel=1e-9)  # t(0.95, 2) = 2.919986
    d = [0.03, 0.0, 0.0145]
    sd_d = float(np.std(d, ddof=1))
    assert ni.diff_nats == pytest.approx(sum(d) / 3)
    assert ni.diff_upper == pytest.approx(sum(d) / 3 + 2.919986 * sd_d / math.sqrt(3), rel=1e-9)
    assert ni.diff_ppl == pytest.approx(sum(math.exp(recipe[s]) - math.exp(vanilla[s]) for s in vanilla) / 3)
    assert not ni.within and ni.verdict() == "unresolved"  # 3 < MIN_SEEDS seeds: never a verdict


def test_verdicts_follow_the_preregistered_rule():
    def ni(ratios):
        return stats.non_inferiority({s: 3.0 * x for s, x in enumerate(ratios)}, {s: 3.0 for s in range(len(ratios))})

    assert ni([1.0, 1.002, 0.998, 1.001, 0.999, 1.0]).verdict() == "within 1%"
    wide = ni([0.98, 1.03, 0.99, 1.02, 1.0, 1.01])  # mean 1.005 < 1.01, bound above it: more seeds
    assert wide.upper > 1.01 and wide.verdict() == "unresolved"
    worse = ni([1.02, 1.03, 1.015, 1.025, 1.02, 1.02])  # mean above the margin: more seeds cannot show it
    assert worse.verdict() == "not shown"
    capped = ni([0.98, 1.03, 0.99, 1.02, 1.0, 1.01] * 2)  # 12 seeds, the cap, still above the bound
    assert capped.upper > 1.01 and capped.verdict() == "not shown"


def test_block_bootstrap_bound():
    rng = np.random.default_rng(3)
    van = {s: list(rng.uniform(2.0, 4.0, 50)) for s in range(4)}
    same = stats.bootstrap_upper({s: list(v) for s, v in van.items()}, van, n_boot=200)
    assert same == pytest.approx(1.0, abs=1e-12)  # identical losses: every resample's ratio is 1
    scaled = stats.bootstrap_upper({s: [x * 1.02 for x in v] for s, v in van.items()}, van, n_boot=200)
    assert scaled == pytest.approx(1.02, rel=1e-12)  # a constant factor survives any resampling
    noisy = {s: [x * (1 + 0.05 * rng.standard_normal()) for x in v] for s, v in van.items()}
    up = stats.bootstrap_upper(noisy, van, n_boot=500)
    point = np.mean([np.mean(noisy[s]) / np.mean(van[s]) for s in van])
    assert up > point  # an upper bound lies above the estimate
    with pytest.raises(ValueError, match="same evaluation blocks"):
        stats.bootstrap_upper({0: [1.0], 1: [1.0]}, {0: [1.0, 2.0], 1: [1.0, 2.0]})


def test_tune_rounds_follow_the_finished_results_and_stop_when_a_round_is_incomplete(tmp_path):
    """tune(record_only=True) on finished runs handed in by `collect`: round 1 (the grid, 2 seeds) is
    complete, so round 2 asks for the extension above the best (8e-3); it is not finished: None, and the
    trials so far go to on_trials."""
    from steptitan.experiments.ledger import Ledger

    losses = {1e-3: 4.0, 2e-3: 3.8, 4e-3: 3.7, 8e-3: 3.6}
    row = bench.Row("vanilla", bench.recipe_file("vanilla"), {}, [100])
    asked: list[list[str]] = []

    def collect(sweep, ledger):
        asked.append([r.name for r in sweep.runs])
        out = {}
        for run in sweep.runs:
            label, seed = run.name.rsplit(",seed=", 1)
            lr = float(label.split(",")[1].split("=")[1])
            if lr in losses:
                out.setdefault(label, {})[int(seed)] = {"final_val_loss": losses[lr] + 0.01 * int(seed)}
        return out

    seen = []
    got = tuning.tune([row], [0, 1], lambda runs: type("S", (), {"runs": runs})(), Ledger(None), collect, evals=2,
                      record_only=True, on_trials=seen.append)
    assert got is None
    assert asked[0] == [f"vanilla,lr={lr:g},warmup=short,seed={s}" for lr in losses for s in (0, 1)]
    assert asked[1] == ["vanilla,lr=0.016,warmup=short,seed=0", "vanilla,lr=0.016,warmup=short,seed=1"]
    assert seen[-1]["vanilla"][(8e-3, "short", "")] == {0: 3.6, 1: 3.61}
    table = tuning.trials_table(seen[-1])
    assert table[2].startswith("| vanilla | 1e-3 | short | - | 0: 4.0000, 1: 4.0100 | 4.0050 |")
    assert table[-1].endswith("| 3.6050 | best so far |")


def test_scale_table_vanilla_adamw_is_16_bytes_a_parameter_plus_step_counters():
    """The 1B table's reference row by hand: fp32 weight + gradient + two Adam moments (16 B) per parameter
    and one 4-byte step counter per tensor (9 per block, 3 outside); activation checkpointing changes the
    activations, never the model states; STEP's rows sit below vanilla with the same optimizer."""
    from steptitan.experiments.scale_table import SHAPE_1B, scale_rows
    from steptitan.model import ModelShape

    shape = ModelShape(**{**SHAPE_1B, "n_layers": 4})  # 4 layers keep the split search small
    d, f, v = 2048, 5461, 32000
    params = 4 * (4 * d * d + 3 * d * f + 2 * d) + 2 * v * d + d
    rows = scale_rows(shape, lora_rank=8)
    van = [r for r in rows if r["row"] == "vanilla AdamW"]
    assert [r["result"].peak_model_states for r in van] == [16 * params + 4 * (9 * 4 + 3)] * 2
    assert van[1]["result"].peak_total < van[0]["result"].peak_total  # checkpointing: fewer saved activations
    for r in rows:
        if r["row"].startswith("STEP"):
            assert r["result"].peak_model_states < r["same"].peak_model_states < r["ref"].peak_model_states


def test_report_commands_name_no_folder_of_the_machine(tmp_path):
    from pathlib import Path

    from steptitan.experiments.bench_report import portable

    checkout = Path(bench.__file__).resolve().parents[2]
    args = type("A", (), {"runs": str(tmp_path / "runs")})()
    cmd = (f"steptitan bench --runs {tmp_path / 'runs'} --train {checkout.parent / 'shared' / 'data' / 'kjv' / 'train.txt'} "
           f"--docs {checkout / 'docs' / 'bench'}")
    assert portable(cmd, args) == "steptitan bench --runs RUNS --train ../shared/data/kjv/train.txt --docs ./docs/bench"
    # a worker running from another checkout writes into this one's docs: that folder is named too
    other = tmp_path / "main" / "docs" / "bench"
    args.docs = str(other)
    assert portable(f"steptitan bench --runs {tmp_path / 'runs'} --docs {other} --no-progress", args) == \
        "steptitan bench --runs RUNS --docs DOCS --no-progress"


def test_tune_variants_run_at_the_best_lr_and_warmup_and_can_win(tmp_path):
    """Phase 3: each named variant of a row runs at the row's best (LR, warmup) once phases 1-2 are done,
    with its overrides on top; the chosen configuration may be a variant; other rows get none."""
    from steptitan.experiments.ledger import Ledger

    base = {1e-3: 4.0, 2e-3: 3.8, 4e-3: 3.7, 8e-3: 3.75}
    row = bench.Row("vanilla", bench.recipe_file("vanilla"), {}, [100])
    runs_seen = []

    def collect(sweep, ledger):
        out = {}
        for run in sweep.runs:
            runs_seen.append(run)
            label, seed = run.name.rsplit(",seed=", 1)
            parts = label.split(",")
            lr, warm = float(parts[1].split("=")[1]), parts[2].split("=")[1]
            loss = base[lr] + (0.05 if warm == "long" else 0.0) - (0.1 if len(parts) > 3 and "beta2" in parts[3] else 0)
            out.setdefault(label, {})[int(seed)] = {"final_val_loss": loss}
        return out

    variants = {"vanilla": {"beta2_099": {"training.beta2": 0.99}, "floor0": {"training.min_lr_factor": 0.0}}}
    got = tuning.tune([row], [0], lambda runs: type("S", (), {"runs": runs})(), Ledger(None), collect, evals=2,
                      record_only=True, variants=variants)
    assert got["vanilla"]["chosen"] == {"lr": 4e-3, "warmup": "short", "variant": "beta2_099"}
    assert got["vanilla"]["overrides"]["training.beta2"] == 0.99 and got["vanilla"]["overrides"]["training.lr"] == 4e-3
    assert got["vanilla"]["n_configs"] == 4 + 1 + 2  # grid, long warmup, two variants
    floor = next(r for r in runs_seen if "variant=floor0" in r.name)
    assert floor.overrides["training.min_lr_factor"] == 0.0 and floor.overrides["training.lr"] == 4e-3
    (tmp_path / "v.toml").write_text('[vanilla]\n"a,b" = { "training.beta2" = 0.99 }\n')
    with pytest.raises(ValueError, match="may not contain"):
        tuning.read_variants(str(tmp_path / "v.toml"))


def test_summary_collects_every_reports_targets(tmp_path):
    import json

    from steptitan.experiments.bench_report import write_summary

    results = tmp_path / "results"
    results.mkdir()
    for tag, met in (("kjv-1M", "no"), ("wikitext-2-1M", "yes")):
        (results / f"{tag}.json").write_text(json.dumps({"tag": tag, "command": f"steptitan bench ({tag})", "targets": [
            {"tag": tag, "row": "step3", "measure": "m", "target": "<= 1.01", "value": "1.0", "met": met}]}))
    out = write_summary(results, tmp_path / "B.md", "## notes\n")
    text = out.read_text()
    assert "| kjv-1M | step3 | m | <= 1.01 | 1.0 | **no** |" in text
    assert "| wikitext-2-1M | step3 | m | <= 1.01 | 1.0 | yes |" in text
    assert "[kjv-1M](docs/bench/kjv-1M.md): `steptitan bench (kjv-1M)`" in text and text.endswith("## notes\n")
