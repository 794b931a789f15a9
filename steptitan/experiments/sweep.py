"""``steptitan sweep`` (= ``python tools/sweep.py``): run a sweep of recipes, one torchrun at a time, resumably.

``steptitan sweep SWEEP.toml`` runs every run that has not finished, one at a time, each in
``<out>/<run name>/`` (named from the run's axis values, hydra style: ``position=upper,seed=0``),
from its resolved recipe ``<out>/_recipes/<name>.toml``, with the sweep file's folder as working
directory. Finished runs (a ``summary.json``) are skipped; a run that died is started again and
resumes from its newest checkpoint (``checkpoint.resume=auto``), or from scratch when it had none.
A failing run does not stop the sweep; failures are listed at the end with their ``steptitan:
error:`` line (or the tail of their log). At the end ``results.csv``, ``results.md``,
``loss_curves.png`` and ``<metric>_by_axis.png`` are written to ``<out>`` (and ``--report-dir``).
See docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from steptitan.experiments import runner
from steptitan.experiments.report import report_sweep
from steptitan.experiments.spec import SweepError, check_run, load_sweep


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="steptitan sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="sweep file (TOML)")
    p.add_argument("--out", help="output folder, relative to the working directory (default: the sweep's output_dir, "
                   "else runs/<name> beside the sweep file)")
    p.add_argument("--only", action="append", help="run only runs whose name matches this regex (repeatable)")
    p.add_argument("--list", action="store_true", help="list the runs, their status and overrides; run nothing")
    p.add_argument("--check", action="store_true", help="check every run's recipe, stage plan and data files; run nothing")
    p.add_argument("--write-commands", metavar="FILE", help="write one launch command per run to FILE ('-' = stdout); run nothing")
    p.add_argument("--template", help="line template for --write-commands, e.g. "
                   "\"sbatch --job-name={name} --chdir={workdir} --wrap={command_q}\" (default: the sweep's template, else {command})")
    p.add_argument("--report-only", action="store_true", help="only (re)write the results table and plots")
    p.add_argument("--report-dir", help="also write the table and plots here (e.g. docs/sweeps/<name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--rerun-stale", action="store_true", help="re-run from scratch runs whose folder was made with "
                   "another recipe (default: stop with an error)")
    return p.parse_args(argv)


def check(sweep) -> int:
    """--check: every run's recipe, plan and data files, all problems listed; exit 2 when any."""
    bad = 0
    for run in sweep.runs:
        problem = check_run(run)
        if problem:
            bad += 1
            print(f"{run.name}: {problem}", file=sys.stderr)
    print(f"sweep {sweep.name}: {len(sweep.runs) - bad} of {len(sweep.runs)} runs valid (recipe, stage plan, data files)")
    return 2 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.out)
    except SweepError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for run in sweep.runs:
            print(f"{runner.run_status(sweep, run):<9} {run.name}  {' '.join(run.override_args())}")
        return 0
    if args.check:
        return check(sweep)
    if args.write_commands:
        n = runner.write_commands(sweep, Path(args.write_commands), args.template)
        print(f"wrote {n} launch commands to {args.write_commands}", file=sys.stderr)
        return 0
    report_dir = Path(args.report_dir) if args.report_dir else None
    report = {"failed": []}
    if not args.report_only:
        t0 = time.perf_counter()
        try:
            report = runner.run_sweep(sweep, args.only, progress=not args.no_progress, rerun_stale=args.rerun_stale)
        except (runner.Interrupted, KeyboardInterrupt) as exc:
            print(f"sweep: stopped by {exc or 'SIGINT'}; run the same command again to continue", file=sys.stderr)
            return 130
        except SweepError as exc:
            print(f"sweep: error: {exc}", file=sys.stderr)
            return 2
        runner.print_report(sweep, report)
        print(f"sweep wall time: {time.perf_counter() - t0:.1f}s")
    for path in report_sweep(sweep, report_dir):
        print(f"wrote {path}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
