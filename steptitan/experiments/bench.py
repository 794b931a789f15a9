"""``steptitan bench`` (= ``python tools/bench.py``): STEP and its alternatives at equal training FLOPs, over seeds,
every row tuned the same way on a selection slice and reported on an untouched report slice.

    steptitan bench --tune --recipes vanilla,step3,step4,dense:7     # tune on the selection slice (2 seeds a config)
    steptitan bench --recipes vanilla,step3,step4,dense:7 --seeds 6   # report: seeds 100.., report slice in full
    steptitan bench --train my/train.txt --val my/val.txt ...         # another corpus (default WikiText-2)
    steptitan bench --report-only                                    # the report again from finished runs / the ledger
    steptitan bench --summary                                        # BENCHMARKS.md from every report's results

One shape (``--dim --layers --heads --vocab --ffn --seq-len --batch``) serves memory and quality;
every recipe is put on it (its layer schedule scaled to end at ``--layers``). Three parts:

1. quality: every (row, seed) trains on ``--train`` with the row's tuned hyperparameters and is
   evaluated on the report slice of ``--val`` (the whole slice at the end), at vanilla's training
   FLOPs for ``--budget-tokens`` tokens (each row's stage steps scaled, keeping its proportions);
2. memory: one short run per row under the STEP paper's mixed-precision policy, without and with
   activation checkpointing: measured vs predicted model states, predicted total peak;
3. throughput: steptitan's vanilla and a bare FSDP2 loop on the final model, interleaved.

Every run is a folder under ``--runs`` launched by the sweep runner (a re-run skips finished runs)
and recorded in a ledger that outlives the folders. docs/benchmark.md ("Protocol") says why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from steptitan.experiments import runner
from steptitan.experiments.ledger import Ledger
from steptitan.experiments.report import read_summary, val_curve
from steptitan.experiments.spec import Run, Sweep, SweepError, resolved_recipe
from steptitan.experiments.splits import Slices, write_slices
from steptitan.experiments.tuning import LR_GRID, read_tuned, read_variants

CHECKOUT = Path(__file__).resolve().parents[2]
WIKITEXT = CHECKOUT.parent / "shared" / "data" / "wikitext-2"
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
PAPER_POLICY = {"training.dtype": "bfloat16", "training.frozen_dtype": "bfloat16"}
# Quality runs store frozen weights in bf16 as the memory column claims (every merge of an adapter into
# them rounds as it would); compute stays float32 on the CPU (docs/benchmark.md, "Protocol").
QUALITY_POLICY = {"training.frozen_dtype": "bfloat16"}
REPORT_SEED0 = 100  # report runs take seeds 100.., selection runs 0..: disjoint by construction
MIN_BLOCK_FRACTION = 0.85  # the papers' models: transformer blocks hold most parameters (issue 10)


class BenchError(ValueError):
    """Bad benchmark arguments; the message says which and why."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class BenchShape:
    """The one benchmark shape (the final model of every recipe) and its batch."""

    dim: int
    layers: int
    heads: int
    vocab: int
    ffn: int
    seq_len: int
    batch: int

    def overrides(self) -> dict[str, Any]:
        return {"model.dim": self.dim, "model.n_heads": self.heads, "model.vocab_size": self.vocab,
                "model.ffn_hidden": self.ffn, "training.seq_len": self.seq_len, "training.batch_size": self.batch}

    def block_fraction(self) -> float:
        """Share of the final model's parameters inside transformer blocks, counted on the built (meta) model."""
        from steptitan.model import ModelShape, build_model

        model = build_model(ModelShape(dim=self.dim, n_layers=self.layers, n_heads=self.heads, n_kv_heads=self.heads,
                                       vocab_size=self.vocab, ffn_hidden=self.ffn, max_seq_len=self.seq_len))
        total = sum(p.numel() for p in model.parameters())
        blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers."))
        return blocks / total


def check_shape(shape: BenchShape, allow_small_blocks: bool = False) -> float:
    frac = shape.block_fraction()
    if frac < MIN_BLOCK_FRACTION and not allow_small_blocks:
        raise BenchError(f"transformer blocks hold {frac:.1%} of this shape's parameters (dim {shape.dim}, {shape.layers} "
                         f"layers, vocab {shape.vocab}, FFN {shape.ffn}); the benchmark needs >= {MIN_BLOCK_FRACTION:.0%}, "
                         f"as in the papers' models, or the embeddings decide the memory ratios. Use more layers, a "
                         f"larger dim or a smaller vocab, or pass --allow-small-blocks")
    return frac


DENSE_PREFIX = "dense:"  # "dense:7" = vanilla at 7 layers: the dense control of a STEP recipe's first-stage depth
EQUAL_TOKENS = "@tokens"  # "step3@tokens" = step3 at vanilla's training tokens instead of its FLOPs


def recipe_file(name: str) -> Path:
    name = name.removesuffix(EQUAL_TOKENS)
    if name.startswith(DENSE_PREFIX):
        name = "vanilla"
    path = CHECKOUT / RECIPES[name] if name in RECIPES else Path(name).resolve()
    if not path.is_file():
        raise BenchError(f"unknown recipe {name!r}: neither one of {', '.join(RECIPES)}, dense:N, NAME@tokens nor a recipe file")
    return path


def recipe_name(name: str) -> str:
    """The row's name: the recipe's name or file stem, ``denseN`` for ``dense:N``, ``NAME@tokens`` kept."""
    tokens = name.endswith(EQUAL_TOKENS)
    base = name.removesuffix(EQUAL_TOKENS)
    if base.startswith(DENSE_PREFIX):
        base = "dense" + base[len(DENSE_PREFIX):]
    else:
        base = base if base in RECIPES else Path(base).stem
    return base + (EQUAL_TOKENS if tokens else "")


def tuning_name(name: str) -> str:
    """The row whose tuned hyperparameters a row uses: ``step3@tokens`` uses step3's."""
    return recipe_name(name).removesuffix(EQUAL_TOKENS)


def _plans(path: Path, overrides: dict[str, Any]):
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict

    run = Run("probe", {}, overrides, recipe=path, base_dir=Path.cwd())
    recipe = recipe_from_dict(resolved_recipe(run))
    return recipe, build_plan(recipe)


def layer_overrides(path: Path, shape: BenchShape, final_layers: int | None = None) -> dict[str, Any]:
    """The recipe's layer schedule scaled to end at ``final_layers`` (default ``shape.layers``): the first
    stage's depth and each growth's n_new."""
    final_layers = final_layers or shape.layers
    recipe, plans = _plans(path, {})
    native = [p.shape.n_layers for p in plans]
    scaled = [max(1, round(n * final_layers / native[-1])) for n in native]
    scaled[-1] = final_layers
    out: dict[str, Any] = {"model.n_layers": scaled[0]}
    for i, stage in enumerate(recipe.stages):
        if i and stage.growth and scaled[i] != scaled[i - 1] and "n_new" in _growth_options(stage.growth["name"]):
            out[f"stages.{i}.growth.n_new"] = scaled[i] - scaled[i - 1]
    _, plans = _plans(path, {**shape.overrides(), **out})
    if plans[-1].shape.n_layers != final_layers or plans[-1].shape.dim != shape.dim:
        raise BenchError(f"{path.name}: cannot put its schedule {native} on {final_layers} layers "
                         f"(got {[p.shape.n_layers for p in plans]}); give --layers a multiple of {native[-1]}")
    return out


def _growth_options(name: str) -> set[str]:
    import dataclasses

    from steptitan.registry import GROWTH

    return {f.name for f in dataclasses.fields(GROWTH.get(name).Options)}


def stage_flops(path: Path, overrides: dict[str, Any], world: int) -> tuple[list[float], list[int], int]:
    """(training FLOPs per optimizer step of each stage, the recipe's steps per stage, tokens per step)."""
    from steptitan.flops import stage_flops_per_token

    recipe, plans = _plans(path, overrides)
    t = recipe.training
    tokens = world * t.batch_size * t.grad_accum * t.seq_len
    return ([stage_flops_per_token(p, t.seq_len, t.activation_checkpointing).total * tokens for p in plans],
            [p.steps for p in plans], tokens)


def equal_flop_steps(per_step: Sequence[float], proportions: Sequence[int], budget: float) -> list[int]:
    """Stage steps keeping the recipe's proportions whose total FLOPs is closest to ``budget``."""
    unit = budget / sum(w * f for w, f in zip(proportions, per_step))
    return [max(1, round(w * unit)) for w in proportions]


def equal_token_steps(proportions: Sequence[int], total: int) -> list[int]:
    """Stage steps keeping the recipe's proportions whose total is ``total`` steps (vanilla's tokens)."""
    steps = [max(1, round(w * total / sum(proportions))) for w in proportions]
    steps[-1] = max(1, steps[-1] + total - sum(steps))  # rounding lands on the last stage
    return steps


def _sweep(name: str, args: argparse.Namespace, runs: list[Run]) -> Sweep:
    out = Path(args.runs).resolve()
    nproc = args.memory_world_size if name.startswith("memory") else args.world_size
    return Sweep(name=name, path=out, recipe=runs[0].recipe if runs else out, nproc=nproc, mode="grid",
                 seeds=[], metric="final_val_loss", output_dir=out / name, template="{command}", torchrun_args=[],
                 axes={}, workdir=out, runs=runs)


def slices_of(args: argparse.Namespace) -> Slices:
    """The selection and report slices of ``--val`` (steptitan/experiments/splits.py)."""
    return write_slices(Path(args.val), Path(os.path.expanduser(args.cache)), args.split_docs, args.select_every)


def common(args: argparse.Namespace) -> dict[str, Any]:
    """Overrides of every run: data (training text, the slice evaluated), no checkpoints, evaluation."""
    from steptitan.data import EMBEDDED_CORPUS

    if args.train == EMBEDDED_CORPUS:
        raise BenchError("the embedded corpus has no validation file to cut into selection and report slices; "
                         "pass --train FILE --val FILE (docs/benchmark.md, 'Protocol')")
    val = slices_of(args).path(args.slice)
    return {"data.files": [str(Path(args.train).resolve())], "data.val_files": [str(val)],
            "data.cache_dir": os.path.expanduser(args.cache), "data.max_chars": 0, "checkpoint.enabled": False,
            "training.eval_batches": args.eval_batches, "training.final_eval_batches": 0, "training.steps_per_log": 20}


def seeds_of(args: argparse.Namespace) -> list[int]:
    """Selection runs take seeds 0.., report runs REPORT_SEED0.. : no report seed was ever used for a choice."""
    first = REPORT_SEED0 if args.slice == "report" else 0
    return list(range(first, first + args.seeds))


@dataclass
class Row:
    """One benchmark row: a recipe on the bench shape with its equal-FLOP (or equal-token) stage steps."""

    name: str  # what the report calls it
    path: Path  # its recipe file
    overrides: dict[str, Any]  # shape, layers, data, policy and steps
    steps: list[int]

    def run(self, sweep: str, seed: int, hparams: dict[str, Any], evals: int, label: str | None = None) -> Run:
        """The (row, seed) training run with tuned hyperparameters ``hparams`` (dotted keys)."""
        interval = max(1, round(sum(self.steps) / evals))
        over = {**self.overrides, **hparams, "training.seed": seed, "training.eval_interval": interval,
                "name": f"{self.name}-{sweep}-seed{seed}"}
        return Run(f"{label or self.name},seed={seed}", {"recipe": self.name, "training.seed": seed}, over, self.name,
                   self.path, Path.cwd())


def plan_rows(args: argparse.Namespace, shape: BenchShape) -> tuple[list[Row], dict[str, Any]]:
    """Every row of ``--recipes`` on the bench shape at vanilla's training FLOPs, and the budget facts."""
    base = {**common(args), **shape.overrides(), **QUALITY_POLICY}
    van_path = recipe_file("vanilla")
    van_layers = layer_overrides(van_path, shape)
    van_flops, _, tokens_per_step = stage_flops(van_path, {**base, **van_layers}, args.world_size)
    van_steps = max(1, round(args.budget_tokens / tokens_per_step))
    budget = van_flops[0] * van_steps
    rows = []
    for name in args.recipes:
        path, short = recipe_file(name), recipe_name(name)
        if name.startswith(DENSE_PREFIX):
            layers = {"model.n_layers": int(name[len(DENSE_PREFIX):])}
        else:
            layers = van_layers if short == "vanilla" else layer_overrides(path, shape)
        extra = {"training.galore.rank": max(1, shape.dim // 4)} if short == "galore" else {}
        if short == "fira":
            extra = {"training.optim.default.rank": max(1, shape.dim // 4)}
        per_step, proportions, _ = stage_flops(path, {**base, **layers, **extra}, args.world_size)
        if short == "vanilla":
            steps = [van_steps]
        elif short.endswith(EQUAL_TOKENS):
            steps = equal_token_steps(proportions, van_steps)
        else:
            steps = equal_flop_steps(per_step, proportions, budget)
        rows.append(Row(short, path, {**base, **layers, **extra, **{f"stages.{i}.steps": n for i, n in enumerate(steps)}},
                        steps))
    facts = {"budget_flops": budget, "vanilla_steps": van_steps, "tokens_per_step": tokens_per_step,
             "steps": {r.name: r.steps for r in rows}}
    return rows, facts


def memory_runs(rows: list[Row], args: argparse.Namespace, checkpointing: bool) -> list[Run]:
    """One short run per row under the paper's policy (model states do not depend on steps or seed)."""
    out = []
    for row in rows:
        if row.name.endswith(EQUAL_TOKENS):
            continue  # the same stages as its FLOP-matched row
        mem = {**{k: v for k, v in row.overrides.items() if k != "training.final_eval_batches"}, **PAPER_POLICY,
               "training.eval_batches": 1, "training.warmup_steps": 1, "training.activation_checkpointing": checkpointing,
               **{f"stages.{i}.steps": args.mem_steps for i in range(len(row.steps))},
               "name": f"{row.name}-memory{'-ac' if checkpointing else ''}"}
        out.append(Run(row.name, {"recipe": row.name}, mem, row.name, row.path, Path.cwd()))
    return out


def plan_runs(args: argparse.Namespace, shape: BenchShape, tuned: dict[str, dict[str, Any]] | None = None
              ) -> tuple[Sweep, Sweep, Sweep, dict[str, Any]]:
    """The quality sweep (row x seed on ``--slice`` with each row's tuned hyperparameters), the memory
    sweeps without and with activation checkpointing, and the budget facts."""
    rows, facts = plan_rows(args, shape)
    tuned = tuned or {}
    quality = [row.run("quality", seed, tuned.get(tuning_name(row.name), {}).get("overrides", {}), args.evals)
               for row in rows for seed in seeds_of(args)]
    return (_sweep("quality", args, quality), _sweep("memory", args, memory_runs(rows, args, False)),
            _sweep("memory-ac", args, memory_runs(rows, args, True)), facts)


def collect(sweep: Sweep, ledger: Ledger) -> dict[str, dict[int | str, dict]]:
    """{row: {seed (quality) or "memory": summary + curve + wall}} of the finished runs.

    A finished run folder is read and its result recorded in the ledger; a run whose folder is gone
    is taken from the ledger if it holds this exact run (same resolved recipe).
    """
    out: dict[str, dict] = {}
    for run in sweep.runs:
        summary = read_summary(runner.run_dir(sweep, run))
        if summary is not None:
            summary["wall_s"] = runner.read_state(sweep, run).get("wall_s")
            summary["curve"] = val_curve(runner.run_dir(sweep, run), summary["stages"])
            ledger.record(sweep, run, summary)
        elif not runner.run_dir(sweep, run).exists():
            summary = ledger.lookup(sweep, run)
        if summary is None:
            continue
        key = run.name.rsplit(",seed=", 1)[0] if "," in run.name else run.label
        out.setdefault(key, {})[run.values.get("training.seed", "memory")] = summary
    return out


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="steptitan bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help=f"comma-separated recipe names or recipe files (default: {','.join(DEFAULT_RECIPES)}; "
                         f"known names: {', '.join(RECIPES)})")
    ap.add_argument("--parts", default="memory,quality,throughput")
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


def main(argv: Sequence[str] | None = None) -> int:
    from steptitan.experiments.bench_report import portable, selection_table, write_report

    args = parse_args(argv)
    if args.scale_table:
        from steptitan.experiments.scale_table import scale_table

        path = Path(args.docs) / "scale-1b.md"
        path.write_text("# Peak memory at 1B parameters (planner prediction)\n\nCommand: `steptitan bench --scale-table`"
                        " (steptitan/experiments/scale_table.py says what is predicted and how it is tested).\n\n"
                        + "\n".join(scale_table()) + "\n")
        print(f"wrote {path}")
        return 0
    if args.summary:
        from steptitan.experiments.bench_report import write_summary

        notes = Path(args.docs) / "notes" / "summary.md"
        path = write_summary(Path(args.docs) / "results", CHECKOUT / "BENCHMARKS.md",
                             notes.read_text() if notes.is_file() else "")
        print(f"wrote {path}")
        return 0
    shape = BenchShape(args.dim, args.layers, args.heads, args.vocab, args.ffn, args.seq_len, args.batch)
    command = "steptitan bench " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        frac = check_shape(shape, args.allow_small_blocks)
        for f in (args.train, args.val):
            if f != "stdlib-docs" and not Path(f).is_file():
                raise BenchError(f"data file {f!r} does not exist (--train / --val; default WikiText-2 in {WIKITEXT})")
        if args.tune and args.slice != "selection":
            raise BenchError("--tune scores on the selection slice only; drop --slice report")
        if args.seeds < 1 or args.tune_seeds < 1 or not args.lr_grid:
            raise BenchError("--seeds and --tune-seeds must be >= 1 and --lr-grid non-empty")
        tuned = read_tuned(Path(args.tuned))
        quality, memory, memory_ac, facts = plan_runs(args, shape, tuned)
    except (BenchError, SweepError, ValueError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    parts = set(args.parts.split(","))
    # Threads per process = cores / processes (torchrun's default is 1 thread, which would leave cores idle).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.world_size)))
    meta_path = Path(args.runs) / "bench.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    ledger = Ledger(None if args.ledger == "none" else Path(args.ledger))
    t0 = time.perf_counter()
    failed = 0
    if not args.report_only or args.tune:
        log(f"shape: dim {shape.dim}, {shape.layers} layers, vocab {shape.vocab} (blocks {frac:.1%} of the parameters); "
            f"budget {facts['budget_flops']:.3e} FLOPs = vanilla's {facts['vanilla_steps']} steps x "
            f"{facts['tokens_per_step']:,} tokens; {args.slice} slice of {Path(args.val).name}")
        try:
            if args.tune:
                from steptitan.experiments.tuning import tune, write_tuned

                rows, _ = plan_rows(args, shape)
                from steptitan.experiments.tuning import trials_table

                def write_trials(done: dict) -> None:  # docs/bench/tuning/TAG.md: every trial so far
                    path = Path(args.tuned).with_suffix(".md")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"# Tuning trials: {args.tag} (selection slice)\n\nCommand: `{portable(command.strip(), args)}`\n\n"
                                    "Selection-slice losses: the record of each choice (docs/benchmark.md, "
                                    "'Protocol'), never a reported result.\n\n" + "\n".join(trials_table(done)) + "\n")

                result = tune(rows, list(range(args.tune_seeds)), lambda runs: _sweep("tune", args, runs), ledger,
                              collect, args.evals, args.lr_grid, progress=not args.no_progress,
                              rerun_stale=args.rerun_stale, record_only=args.report_only, on_trials=write_trials,
                              variants=read_variants(args.tune_variants))
                if result is None:
                    print(f"bench: tuning not complete; finished runs recorded in {args.ledger}")
                    return 0
                write_tuned(Path(args.tuned), result, {"tag": args.tag, "slices": slices_of(args).info,
                                                       "command": portable(command.strip(), args), "lr_grid": list(args.lr_grid)})
                for name, r in result.items():
                    log(f"tuned {name}: {r['chosen']} ({r['n_configs']} configurations, {r['n_runs']} runs"
                        f"{', at the edge of the grid' if r['at_edge'] else ''})")
                print(f"wrote {args.tuned}")
                return 0
            for name, sweep in (("memory", memory), ("memory", memory_ac), ("quality", quality)):
                if name in parts:
                    result = runner.run_sweep(sweep, progress=not args.no_progress, rerun_stale=args.rerun_stale)
                    runner.print_report(sweep, result)
                    failed += len(result["failed"])
            if "throughput" in parts:
                from steptitan.experiments.throughput import run_throughput

                van = recipe_file("vanilla")  # vanilla on the final shape, the data of the quality runs
                over = {**common(args), **shape.overrides(), **layer_overrides(van, shape), "overwrite": True}
                meta["throughput"] = run_throughput(args, shape, over, van)
        except (runner.Interrupted, KeyboardInterrupt) as exc:
            print(f"bench: stopped by {exc or 'SIGINT'}; run the same command again to continue", file=sys.stderr)
            return 130
        except (BenchError, SweepError, RuntimeError) as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 2
        meta.update(command=command.strip(), wall_s=time.perf_counter() - t0)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(meta, indent=1, default=str))
    if args.slice == "selection":  # never a report row from the selection slice
        print("\n".join(selection_table(collect(quality, ledger))))
        ledger.save()
        print("bench: selection-slice runs write no report (docs/benchmark.md, 'Protocol')")
        return 1 if failed else 0
    if args.report_only:  # this report's own command; the last command that ran runs in this folder stays in meta
        meta = {**meta, "report_command": command.strip()}
    meta["slices"] = slices_of(args).info
    write_report(args, shape, frac, facts, collect(quality, ledger), collect(memory, ledger), meta, ledger.used,
                 tuned=read_tuned(Path(args.tuned)), memory_ac=collect(memory_ac, ledger))
    ledger.save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
