"""Read runs back (summary.json, TensorBoard scalars) and turn them into tables and plots, for sweeps and the benchmark."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from steptitan.experiments.runner import read_state, run_dir
from steptitan.experiments.spec import Sweep, short_keys, value_text

MiB = 2**20


def read_summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one scalar from a run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(tb_dir.glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                points[e.step] = e.value  # a resumed run logs some steps twice; keep the last
    return sorted(points.items())


def val_curve(folder: Path, stages: list[dict]) -> list[tuple[float, float]]:
    """(cumulative training FLOPs, val loss) for every evaluation of a run (global steps mapped through its stages)."""
    bounds, start, flops_before = [], 0, 0.0
    for s in stages:
        bounds.append((start, start + s["steps"], flops_before, s["train_flops"] / max(1, s["steps"])))
        start += s["steps"]
        flops_before += s["train_flops"]
    out = []
    for step, loss in read_scalars(folder / "tb", "val/loss"):
        for lo, hi, before, per_step in bounds:
            if lo < step <= hi:
                out.append((before + (step - lo) * per_step, loss))
                break
    return out


def peak_bytes(summary: dict) -> tuple[int, int]:
    """(predicted, measured) peak per-rank model-state bytes over a run's stages."""
    meas = max(st["peak_model_state_bytes"] for st in summary["stages"])
    pred = max(max(st["predicted_model_state_bytes"]) for st in summary["stages"])
    return pred, meas


# --------------------------------------------------------------------------- sweep tables


def collect_results(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per run: axis values, status, losses, trainable parameters and model states per stage, speed, time."""
    rows = []
    for run in sweep.runs:
        row: dict[str, Any] = {"run": run.name}
        if run.label:
            row["label"] = run.label
        row.update(run.values)
        state = read_state(sweep, run)
        summary = read_summary(run_dir(sweep, run))
        row["status"] = "finished" if summary else state.get("status", "not run")
        if summary:
            stages = summary.get("stages", [])
            row["final_val_loss"] = summary.get("final_val_loss")
            row["final_val_ppl"] = summary.get("final_val_ppl")
            row["peak_model_states_MiB"] = max((s.get("peak_model_state_bytes", 0) for s in stages), default=0) / MiB
            row["max_trainable_params"] = max((s.get("trainable_params", 0) for s in stages), default=0)
            for s in stages:
                row[f"stage{s['index']}_val_loss"] = s.get("val_loss")
            for s in stages:
                row[f"stage{s['index']}_trainable_params"] = s.get("trainable_params")
                row[f"stage{s['index']}_peak_model_states_MiB"] = s.get("peak_model_state_bytes", 0) / MiB
                row[f"stage{s['index']}_peak_rss_MiB"] = s.get("peak_rss_bytes", 0) / MiB
            train_wall = sum(s.get("wall_s", 0.0) for s in stages)
            tokens = sum(s.get("tokens_per_s", 0.0) * s.get("wall_s", 0.0) for s in stages)
            row["tokens_per_s"] = tokens / train_wall if train_wall else None
            row["train_wall_s"] = train_wall
        row["wall_s"] = state.get("wall_s")  # the whole launch (startup, data, eval, checkpoints) over all attempts
        if not summary and state.get("error"):
            row["error"] = state["error"].splitlines()[0]
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for k in row:
            if k not in cols:
                cols.append(k)
    if "error" in cols:  # the longest cell goes last
        cols.append(cols.pop(cols.index("error")))
    return cols


def fmt(value: Any, column: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if column.endswith(("_MiB", "wall_s")):
            return f"{value:,.1f}"
        if column == "tokens_per_s":
            return f"{value:,.0f}"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool) and column.endswith("_params"):
        return f"{value:,}"
    return value_text(value).replace("|", "\\|")


def write_tables(rows: list[dict[str, Any]], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    csv_path, md_path = folder / "results.csv", folder / "results.md"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: value_text(v) if isinstance(v, (dict, list, bool)) else v for k, v in row.items()})
    short = short_keys([c for c in cols if "." in c])
    header = [short.get(c, c) for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c), c) for c in cols) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

def _save(fig, path: Path, dpi: int = 120) -> Path:
    """Lay out, write and close a figure (the folder is made if needed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path



def plot_sweep(sweep: Sweep, rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """loss_curves.png (train loss per run, val loss markers) and <metric>_by_axis.png (bars per axis value)."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, run in enumerate(sweep.runs):
        tb = run_dir(sweep, run) / "tb"
        loss = read_scalars(tb, "loss")
        if not loss:
            continue
        color = f"C{i % 10}"
        ax.plot(*zip(*loss), color=color, lw=1.2, label=run.name)
        val = read_scalars(tb, "val/loss")
        if val:
            ax.plot(*zip(*val), "o", color=color, ms=5)
    stage = read_scalars(run_dir(sweep, sweep.runs[0]) / "tb", "stage") if sweep.runs else []
    for (s0, v0), (s1, v1) in zip(stage, stage[1:]):
        if v1 != v0:
            ax.axvline(s1, color="grey", ls=":", lw=1)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("training loss (lines), validation loss (dots)")
    ax.set_title(f"sweep {sweep.name}: loss curves")
    if ax.lines:
        ax.legend(fontsize=7, loc="upper right")
    written.append(_save(fig, folder / "loss_curves.png", dpi=110))

    # one panel per axis; explicit runs are grouped by label; seeds alone only if nothing else varies
    axes = list(sweep.axes) + (["label"] if any("label" in r for r in rows) else [])
    axes = axes or (["training.seed"] if sweep.seeds else [])
    metric = sweep.metric
    if axes and any(isinstance(r.get(metric), (int, float)) for r in rows):
        short = short_keys(list(axes))
        fig, axs = plt.subplots(1, len(axes), figsize=(4.5 * len(axes), 4), squeeze=False)
        for ax, key in zip(axs[0], axes):
            groups: dict[str, list[float]] = {}
            for r in rows:
                if isinstance(r.get(metric), (int, float)) and key in r:
                    groups.setdefault(value_text(r[key]), []).append(float(r[metric]))
            if not groups:
                continue
            labels = list(groups)
            means = [sum(v) / len(v) for v in groups.values()]
            ax.bar(labels, means, color=[f"C{i}" for i in range(len(labels))], alpha=0.6)
            for i, values in enumerate(groups.values()):  # every run as a dot: the spread over the other axes/seeds
                ax.plot([i] * len(values), values, "k.", ms=6)
            lo, hi = min(min(v) for v in groups.values()), max(max(v) for v in groups.values())
            pad = (hi - lo) * 0.5 or abs(hi) * 0.02 or 0.1
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_xlabel(short.get(key, key))
            ax.set_ylabel(metric)
        fig.suptitle(f"sweep {sweep.name}: {metric}\n(bar = mean, dots = single runs)", fontsize=10)
        written.append(_save(fig, folder / f"{metric}_by_axis.png", dpi=110))
    return written


def report_sweep(sweep: Sweep, extra_dir: Path | None = None) -> list[Path]:
    rows = collect_results(sweep)
    written: list[Path] = []
    for folder in [sweep.output_dir] + ([extra_dir] if extra_dir else []):
        written.extend(write_tables(rows, folder))
        written.extend(plot_sweep(sweep, rows, folder))
    return written


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: Path, target: float | None = None) -> Path:
    """Validation loss vs training FLOPs, one line per recipe (the benchmark's mean over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker="o", ms=3, label=name, lw=2 if name in ("vanilla", "step3") else 1)
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1, label="vanilla's final loss")
    ax.set_xlabel("training FLOPs (forward + backward, all ranks)")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title("validation loss vs training FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_memory_stages(memory: dict[str, dict], path: Path) -> Path:
    """Stacked per-stage model-state bytes (measured, peak step) of every recipe's memory run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels: list[str] = []
    parts: dict[str, list[float]] = {k: [] for k in ("params_trainable", "params_frozen", "grads", "optimizer", "adapter_pools")}
    for name, s in memory.items():
        for st in s["stages"]:
            labels.append(f"{name}\n{st['name']}")
            peak = max((r["peak_step_memory"] for r in st["ranks"]), key=lambda m: m.get("model_states", 0))
            for k in parts:
                parts[k].append(peak.get(k, 0) / MiB)
    bottom = [0.0] * len(labels)
    for k, vals in parts.items():
        ax.bar(range(len(labels)), vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=5, rotation=90)
    ax.set_ylabel("MiB per rank (measured, peak step)")
    ax.set_title("model-state memory per stage (benchmark shape, paper's bf16 policy)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_pareto(points: Sequence[tuple[str, float, float, float | None, float | None]], path: Path) -> Path:
    """Memory ratio (x) vs loss ratio (y) per recipe, error bars = the 95% interval; the Pareto front joined."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (name, mem, ratio, lo, hi) in enumerate(points):
        yerr = [[ratio - lo], [hi - ratio]] if lo is not None and hi is not None else None
        ax.errorbar([mem], [ratio], yerr=yerr, fmt="o", color=f"C{i % 10}", capsize=3, label=name)
        ax.annotate(name, (mem, ratio), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front, best = [], math.inf
    for name, mem, ratio, _, _ in sorted(points, key=lambda p: (p[1], p[2])):
        if ratio < best:  # no recipe with less (or equal) memory has a lower loss
            front.append((mem, ratio))
            best = ratio
    if len(front) > 1:
        ax.plot(*zip(*front), color="grey", ls="--", lw=1, label="Pareto front")
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("peak model states vs vanilla (paper's policy)")
    ax.set_ylabel("final val loss vs vanilla (mean of per-seed ratios)")
    ax.set_title("memory vs quality at equal training FLOPs (95% interval)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    return _save(fig, path)
