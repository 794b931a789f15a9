"""``steptitan bench``'s command line and what it names: the recipes by name, the default corpus, the
seed ranges and the shape rule (steptitan/experiments/bench.py runs them; docs/benchmark.md says why)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from steptitan.experiments.tuning import LR_GRID

CHECKOUT = Path(__file__).resolve().parents[2]
WIKITEXT = CHECKOUT.parent / "shared" / "data" / "wikitext-2"
MEMORY_GOALS = {"step3": 0.40, "step4": 0.33}  # issue 22's STEP goals: model states vs vanilla AdamW at most
# name -> recipe file (relative to the checkout); --recipes also takes paths to other recipe files
RECIPES: dict[str, str] = {
    "vanilla": "recipes/vanilla.toml",
    "step3": "recipes/step3.toml",  # STEP + Adam-mini, 3 stages (issue 10's goal rows)
    "step4": "recipes/step4.toml",  # STEP + Adam-mini, 4 stages
    # the memory-efficient peers (GaLore / Glentis et al. tables)
    "adam_mini": "recipes/adam_mini.toml",
    "galore": "recipes/galore.toml",
    "fira": "recipes/fira.toml",
    "lora": "recipes/lora.toml",
    "relora": "recipes/relora.toml",
    "lowrank_tricks": "recipes/lowrank_tricks.toml",
    "apollo": "recipes/apollo.toml",  # APOLLO (apollo-torch), issue 24
    "adamw8bit": "recipes/adamw8bit.toml",  # torchao's 8-bit AdamW, issue 24
    # STEP + each optimizer (composites) and the earlier STEP variants (ablations)
    "step3_adamw": "recipes/bench/step3_adamw.toml",
    "step3_galore": "recipes/bench/step3_galore.toml",
    "step3_fira": "recipes/bench/step3_fira.toml",
    "step3_frozenemb": "recipes/bench/step3_frozenemb.toml",
    "step3_apollo": "recipes/bench/step3_apollo.toml",
    "step3_adamw8bit": "recipes/bench/step3_adamw8bit.toml",
    "step3_trainemb": "recipes/bench/step3_trainemb.toml",
    "step3_runlr": "recipes/bench/step3_runlr.toml",  # one LR schedule over the run (issue 22, B)
    "step4_runlr": "recipes/bench/step4_runlr.toml",
    "step_noadapter": "recipes/step_noadapter.toml",
    "step_lower": "recipes/step_lower.toml",
    "step_relora": "recipes/step_relora.toml",
    "step_switchlora": "recipes/step_switchlora.toml",
    "switchlora": "recipes/switchlora.toml",
}
# what a bare `steptitan bench` runs: the goal rows, the peers and STEP + each optimizer
DEFAULT_RECIPES = ["vanilla", "step3", "step4", "adam_mini", "galore", "fira", "lora", "relora", "lowrank_tricks",
                   "step3_adamw", "step3_galore", "step3_fira", "step3_frozenemb"]
REPORT_SEED0 = 100  # report runs take seeds 100.., selection runs 0..: disjoint by construction
MIN_BLOCK_FRACTION = 0.85  # the papers' models: transformer blocks hold most parameters (issue 10)


def parse_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """``steptitan bench``'s arguments with the defaults that follow from them (TAG, the docs files)."""
    ap = argparse.ArgumentParser(prog="steptitan bench", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help=f"comma-separated recipe names or recipe files (default: {','.join(DEFAULT_RECIPES)}; "
                         f"known names: {', '.join(RECIPES)})")
    ap.add_argument("--parts", default="memory,quality,downstream,throughput",
                    help="what to run: memory, quality (report or selection runs), downstream (steptitan eval on "
                         "each finished report run; needs lm-eval), throughput")
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="downstream: at most this many examples per task (default: all 200)")
    ap.add_argument("--train", default=str(WIKITEXT / "valid.txt"),
                    help="training text (default: WikiText-2 valid.txt); 'stdlib-docs' = the embedded corpus, whose "
                         "validation split is its last data.val_fraction (--val is then ignored)")
    ap.add_argument("--val", default=str(WIKITEXT / "test.txt"), help="validation text (default: WikiText-2 test.txt)")
    ap.add_argument("--seeds", type=int, default=6,
                    help=f"seeds per row: report runs take {REPORT_SEED0}..{REPORT_SEED0}+N-1, selection runs 0..N-1")
    ap.add_argument("--slice", choices=["selection", "report"], default=None,
                    help="the validation slice evaluated (default: report; selection with --tune). A selection run "
                         "writes no report")
    ap.add_argument("--select-every", type=int, default=3,
                    help="every N-th document of --val goes to the selection slice, the others to the report slice")
    ap.add_argument("--split-docs", choices=["auto", "wikitext", "paragraph"], default="auto",
                    help="what a document of --val is: a WikiText article, a blank-line paragraph, or auto")
    ap.add_argument("--goal-rows", default="",
                    help="which row stands for each STEP goal when a variant replaced the recipe (protocol 3), "
                         "e.g. step3=step3_runlr,step4=step4_runlr; default: the rows step3 and step4")
    ap.add_argument("--tune", action="store_true",
                    help="run the tuning protocol for --recipes on the selection slice and write --tuned")
    ap.add_argument("--tune-seeds", type=int, default=2, help="selection seeds per tuning configuration (0..N-1)")
    ap.add_argument("--lr-grid", default=",".join(f"{x:g}" for x in LR_GRID), help="the starting LR grid of --tune")
    ap.add_argument("--tune-variants", default=None,
                    help="TOML of extra configurations tried at each row's best LR and warmup: [ROW] NAME = "
                         "{ 'dotted.key' = value, ... } (docs/benchmark.md, 'Protocol' 3)")
    ap.add_argument("--tuned", default=None,
                    help="the tuning file: written by --tune, read by report runs (default docs/bench/tuning/TAG.json)")
    ap.add_argument("--corpus-name", default=None,
                    help="the corpus's name in file names and the report (default: the folder of --train)")
    ap.add_argument("--budget-tokens", type=int, default=1_000_000, help="training tokens of vanilla's run; every recipe "
                    "gets vanilla's training FLOPs")
    ap.add_argument("--world-size", type=int, default=1,
                    help="torchrun processes per quality run (default 1: on a small CPU box one process with all "
                         "cores is ~3x faster than gloo ranks; the fixed-blocks eval and the world-size-independent "
                         "init make the losses the same up to float summation order; docs/benchmark.md)")
    ap.add_argument("--memory-world-size", type=int, default=2,
                    help="torchrun processes per memory run (per-rank FSDP2 shards are what is measured)")
    shape = ap.add_argument_group("the benchmark shape (final model of every recipe)")
    shape.add_argument("--dim", type=int, default=64)
    shape.add_argument("--layers", type=int, default=16)
    shape.add_argument("--heads", type=int, default=4)
    shape.add_argument("--vocab", type=int, default=512)
    shape.add_argument("--ffn", type=int, default=192)
    shape.add_argument("--seq-len", type=int, default=128)
    shape.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    shape.add_argument("--allow-small-blocks", action="store_true",
                       help=f"allow a shape whose blocks hold < {MIN_BLOCK_FRACTION * 100:.0f}%% of the parameters")
    ap.add_argument("--evals", type=int, default=10, help="evaluations per quality run (every ~1/N of its steps)")
    ap.add_argument("--eval-batches", type=int, default=16, help="validation batches per rank (same blocks for every run)")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps per stage in the memory runs")
    ap.add_argument("--throughput-rounds", type=int, default=3)
    ap.add_argument("--throughput-steps", type=int, default=30)
    ap.add_argument("--ab-steps", type=int, default=60, help="steps of each loop in the alternating A/B run (0 = skip)")
    ap.add_argument("--runs", default=None, help="run folders, default runs/bench/TAG (a re-run skips finished ones)")
    ap.add_argument("--cache", default="~/.cache/steptitan")
    ap.add_argument("--out", default=None, help="the report (default docs/bench/TAG.md; TAG = corpus-budget, e.g. "
                    "wikitext-2-1M)")
    ap.add_argument("--plots", default=None, help="plot folder (default: docs/bench/TAG beside the docs folder)")
    ap.add_argument("--notes", default=None, help="appended to the report (default: docs/bench/notes/TAG.md if it exists)")
    ap.add_argument("--ledger", default=None,
                    help="results ledger (JSON): finished runs are recorded in it, and runs whose folder is gone are "
                         "read from it (default: docs/bench/ledger/TAG.json; 'none' = no ledger)")
    ap.add_argument("--docs", default=str(CHECKOUT / "docs" / "bench"),
                    help="the folder of the defaults above (reports, plots, ledgers, tuning files, results)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the finished runs; run nothing")
    ap.add_argument("--scale-table", action="store_true",
                    help="write docs/bench/scale-1b.md: the planner's peak for a 1B shape (predicted); run nothing")
    ap.add_argument("--summary", action="store_true",
                    help="write BENCHMARKS.md from every report's results (docs/bench/results/*.json) and "
                         "docs/bench/notes/summary.md; run nothing")
    ap.add_argument("--rerun-stale", action="store_true", help="re-run runs whose folder was made with another recipe")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    if "vanilla" not in args.recipes:
        args.recipes.insert(0, "vanilla")  # every ratio is to vanilla
    if args.slice is None:
        args.slice = "selection" if args.tune else "report"
    args.lr_grid = tuple(float(x) for x in args.lr_grid.split(",") if x)
    args.goal_rows = parse_goal_rows(args.goal_rows, ap)
    corpus = args.corpus_name or (args.train if args.train == "stdlib-docs" else Path(args.train).resolve().parent.name)
    args.tag = f"{corpus}-{args.budget_tokens / 1e6:g}M"
    docs = Path(args.docs)
    args.runs = args.runs or str(Path("runs") / "bench" / args.tag)
    args.out = args.out or str(docs / f"{args.tag}.md")
    args.plots = args.plots or str(docs / args.tag)
    args.ledger = args.ledger or str(docs / "ledger" / f"{args.tag}.json")
    args.tuned = args.tuned or str(docs / "tuning" / f"{args.tag}.json")
    args.results = str(docs / "results" / f"{args.tag}.json")
    if args.notes is None:
        args.notes = str(docs / "notes" / f"{args.tag}.md")
    return args


def parse_goal_rows(text: str, ap: argparse.ArgumentParser) -> dict[str, str]:
    """``step3=step3_runlr,step4=step4_runlr`` -> {goal: row}; a goal not named stands for itself."""
    rows = {g: g for g in MEMORY_GOALS}
    for item in filter(None, text.split(",")):
        goal, sep, row = item.partition("=")
        if not sep or goal not in MEMORY_GOALS or not row:
            ap.error(f"--goal-rows: {item!r} is not GOAL=ROW with GOAL one of {', '.join(MEMORY_GOALS)}")
        rows[goal] = row
    return rows
