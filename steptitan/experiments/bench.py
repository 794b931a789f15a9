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
from steptitan.experiments.downstream import CHECKPOINT_OVERRIDES, evaluate_runs, scores_of
from steptitan.experiments.ledger import Ledger
from steptitan.experiments.report import read_summary, val_curve
from steptitan.experiments.spec import Run, Sweep, SweepError, resolved_recipe
from steptitan.experiments.splits import Slices, write_slices
from steptitan.experiments import bench_args
from steptitan.experiments.bench_args import CHECKOUT, MIN_BLOCK_FRACTION, RECIPES, REPORT_SEED0, WIKITEXT
from steptitan.experiments.tuning import read_tuned, read_variants

PAPER_POLICY = {"training.dtype": "bfloat16", "training.frozen_dtype": "bfloat16"}
# Quality runs store frozen weights in bf16 as the memory column claims (every merge of an adapter into
# them rounds as it would); compute stays float32 on the CPU (docs/benchmark.md, "Protocol").
QUALITY_POLICY = {"training.frozen_dtype": "bfloat16"}


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
    # report runs keep their final checkpoint for the downstream part (steptitan/experiments/downstream.py)
    keep = CHECKPOINT_OVERRIDES if args.slice == "report" else {}
    quality = [row.run("quality", seed, {**tuned.get(tuning_name(row.name), {}).get("overrides", {}), **keep}, args.evals)
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
            scores = scores_of(runner.run_dir(sweep, run))
            if scores is not None:
                summary["downstream"] = scores
            ledger.record(sweep, run, summary)
        elif not runner.run_dir(sweep, run).exists():
            summary = ledger.lookup(sweep, run)
        if summary is None:
            continue
        key = run.name.rsplit(",seed=", 1)[0] if "," in run.name else run.label
        out.setdefault(key, {})[run.values.get("training.seed", "memory")] = summary
    return out


def run_downstream(args: argparse.Namespace, quality: Sweep) -> None:
    """The downstream part: the offline lm-eval tasks on every finished report run (skipped with a line
    when lm-eval is not installed: pip install 'steptitan[eval]')."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        log("downstream: skipped, lm-eval is not installed (pip install 'steptitan[eval]')")
        return
    done = evaluate_runs([runner.run_dir(quality, run) for run in quality.runs], args.eval_limit)
    log(f"downstream: evaluated {len(done)} run(s)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return bench_args.parse_args(argv, __doc__)


def main(argv: Sequence[str] | None = None) -> int:
    from steptitan.experiments.bench_report import goal_row_problem, portable, selection_table, write_report

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
        problem = goal_row_problem(args.goal_rows, tuned)
        if problem:
            raise BenchError(problem)
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
            if "downstream" in parts and args.slice == "report":
                run_downstream(args, quality)
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
