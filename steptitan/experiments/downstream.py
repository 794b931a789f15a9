"""The benchmark's downstream column (issue 24): each report run's final weights through ``steptitan eval``.

STEP's paper claims equal downstream quality beside equal perplexity. The bench's report runs keep
their last checkpoint (``CHECKPOINT_OVERRIDES``: one, at the end of the last stage), and the
``downstream`` part evaluates it on the offline lm-eval tasks shipped with steptitan (evaltasks/: ``kjv_cloze``,
a LAMBADA-style last-word task, and ``kjv_choice``, a HellaSwag-style 4-way choice; docs/eval.md),
writing ``<run>/eval/downstream.json``; ``collect`` attaches the scores to the run's summary, so the
ledger keeps them once the folders are gone. A model of the benchmark's size sits near chance on
both; the table says how near, and pairs each row with vanilla by seed, as the loss column does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from steptitan.experiments.stats import mean_sd, t975

TASKS = ("kjv_cloze", "kjv_choice")
OUT_NAME = "downstream.json"
# (score key from steptitan eval, what the report calls it, chance level or None, higher is better)
METRICS: tuple[tuple[str, str, float | None, bool], ...] = (
    ("kjv_choice/acc", "kjv_choice acc", 0.25, True),
    ("kjv_choice/acc_norm", "kjv_choice acc_norm", 0.25, True),
    ("kjv_cloze/acc", "kjv_cloze acc", 0.0, True),
    # lm-eval's word perplexity is exp(mean NLL of the last word): in nats it is readable at any size
    ("kjv_cloze/nll", "kjv_cloze word NLL (nats)", None, False),
)
# Report runs keep one checkpoint: the last stage's end (stage ends are where checkpoints are written
# with interval 0; keep_last 1 deletes the earlier ones), which is what `steptitan eval RUN` reads.
CHECKPOINT_OVERRIDES = {"checkpoint.enabled": True, "checkpoint.interval": 0, "checkpoint.keep_last": 1}


def scores_of(run_dir: Path) -> dict[str, float] | None:
    """The downstream scores of a run (``<run>/eval/downstream.json``), with the cloze NLL derived, or None."""
    path = run_dir / "eval" / OUT_NAME
    if not path.is_file():
        return None
    scores = dict(json.loads(path.read_text())["scores"])
    ppl = scores.get("kjv_cloze/perplexity")
    if ppl is not None and ppl > 0:
        scores["kjv_cloze/nll"] = math.log(ppl)
    return scores


def evaluate_runs(run_dirs: list[Path], limit: int | None = None) -> list[Path]:
    """``steptitan eval`` (the bundled offline tasks) on every finished run folder without scores yet;
    returns the folders evaluated.

    In this process (lm-eval and transformers are imported once for all runs). A run without a
    checkpoint (made before report runs kept one) is skipped with a line that says so."""
    from steptitan import lmeval

    done = []
    for run_dir in run_dirs:
        if not (run_dir / "summary.json").is_file() or scores_of(run_dir) is not None:
            continue
        if not any((run_dir / "checkpoints").glob("stage*")):
            print(f"downstream: {run_dir.name} has no checkpoint (made before report runs kept one); skipped")
            continue
        argv = [str(run_dir), "--tasks", ",".join(TASKS), "--out", str(run_dir / "eval" / OUT_NAME)]
        if limit:
            argv += ["--limit", str(limit)]
        if lmeval.main(argv) != 0:
            raise RuntimeError(f"steptitan eval failed on {run_dir}")
        done.append(run_dir)
    return done


def paired_difference(row: Mapping[Any, float], vanilla: Mapping[Any, float]) -> tuple[float, float | None, float | None]:
    """Mean of ``row[s] - vanilla[s]`` over the seeds both have, with its two-sided 95% t-interval
    (None, None with fewer than two seeds)."""
    seeds = sorted(set(row) & set(vanilla))
    diffs = [row[s] - vanilla[s] for s in seeds]
    mean, sd = mean_sd(diffs)
    if sd is None:
        return mean, None, None
    half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def downstream_rows(quality: Mapping[str, Mapping[Any, dict]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{row: {metric: {mean, sd, n, diff, low, high}}} over the seeds whose summary carries scores."""
    per_row = {name: {seed: s["downstream"] for seed, s in runs.items() if s.get("downstream")}
               for name, runs in quality.items()}
    van = per_row.get("vanilla", {})
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, by_seed in per_row.items():
        for key, *_ in METRICS:
            values = {seed: sc[key] for seed, sc in by_seed.items() if key in sc}
            if not values:
                continue
            mean, sd = mean_sd(list(values.values()))
            cell: dict[str, Any] = {"mean": mean, "sd": sd, "n": len(values)}
            if name != "vanilla":
                ref = {seed: sc[key] for seed, sc in van.items() if key in sc}
                if set(ref) & set(values):
                    cell["diff"], cell["low"], cell["high"] = paired_difference(values, ref)
            out.setdefault(name, {})[key] = cell
    return out


def verdict(cell: dict[str, Any], higher_is_better: bool) -> str:
    """'no difference' when the paired 95% interval covers 0 (a difference within the spread), else
    'better' or 'worse' than vanilla."""
    if cell.get("low") is None:
        return "-"
    if cell["low"] <= 0 <= cell["high"]:
        return "no difference"
    return "better" if (cell["diff"] > 0) == higher_is_better else "worse"


def downstream_section(rows: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The report's downstream table: per row and metric, mean +- sd over seeds, chance, and the paired
    difference to vanilla with its 95% interval."""
    if not rows:
        return []
    lines = ["## Downstream: offline lm-eval tasks on each report run's final weights", "",
             f"`steptitan eval RUN --tasks {','.join(TASKS)}` on every report seed's last "
             "checkpoint (docs/eval.md: 200 examples a task, built from KJV chapters no bench run trains on). "
             "*diff* is the mean per-seed difference to vanilla with its two-sided 95% t-interval; an interval "
             "that covers 0 is *no difference*. A model of this size is close to chance on both tasks: read the "
             "chance column before the differences.", "",
             "| row | metric | chance | seeds | mean +- sd | diff vs vanilla [95%] | |", "|---|---|---|---|---|---|---|"]
    for name, metrics in rows.items():
        for key, label, chance, higher in METRICS:
            cell = metrics.get(key)
            if cell is None:
                continue
            spread = f"{cell['mean']:.4f} +- {cell['sd']:.4f}" if cell["sd"] is not None else f"{cell['mean']:.4f}"
            diff, word = "-", ""
            if "diff" in cell:
                diff = (f"{cell['diff']:+.4f} [{cell['low']:+.4f}, {cell['high']:+.4f}]" if cell["low"] is not None
                        else f"{cell['diff']:+.4f}")
                word = verdict(cell, higher)
            lines.append(f"| {name} | {label} | {'-' if chance is None else f'{chance:g}'} | {cell['n']} | {spread} | "
                         f"{diff} | {word} |")
    return lines + [""]
