"""BENCHMARKS.md from the benchmark's finished runs: seed statistics, paired ratios, memory, Pareto plot, throughput."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from steptitan.experiments import report as plots
from steptitan.experiments.report import peak_bytes
from steptitan.experiments.stats import (
    flops_to_reach,
    mean_curve,
    mean_sd,
    paired_ratio,
)

TARGETS = {  # issue 10's goal; a row that was not run is left out
    "step3_memory_vs_vanilla": ("step3 peak model states vs vanilla (paper policy, embeddings included)", "<=", 0.40),
    "step3_val_loss_vs_vanilla": ("step3 final val loss vs vanilla at equal FLOPs (mean of per-seed ratios)", "<=", 1.01),
    "step4_memory_vs_vanilla": ("step4 peak model states vs vanilla (paper policy, embeddings included)", "<=", 0.33),
    "step4_val_loss_vs_vanilla": ("step4 final val loss vs vanilla at equal FLOPs (mean of per-seed ratios)", "<=", 1.01),
    "vanilla_tokens_per_s_vs_bare": ("steptitan vanilla tokens/s vs bare FSDP2 (alternating steps, one run)", ">=", 0.97),
    "vanilla_tokens_per_s_vs_bare_runs": ("steptitan vanilla tokens/s vs bare FSDP2 (separate runs, median)", ">=", 0.97),
    "planner_worst_error": ("planner vs measured model-state bytes, worst |error| (memory runs)", "<=", 0.05),
}


def target_lines(ratios: dict[str, Any], seeds: int) -> list[str]:
    """The Targets table. A loss target measured on fewer seeds than the benchmark asks for is
    "open", whatever its mean: the goal is stated over ``seeds`` seeds."""
    lines = ["## Targets", "", "| measure | target | this run | met |", "|---|---|---|---|"]
    for key, (what, op, goal) in TARGETS.items():
        v = ratios.get(key)
        if v is None:
            continue
        ok = v <= goal if op == "<=" else v >= goal
        shown = f"{v:.2%}" if key.startswith("planner") else f"{v:.3f}x"
        met = "yes" if ok else "**no**"
        n = ratios.get(key.replace("_vs_vanilla", "_seeds")) if key.endswith("_val_loss_vs_vanilla") else None
        if n is not None and n < seeds:
            shown, met = f"{shown} ({n} of {seeds} seeds)", f"open: {n} of {seeds} seeds"
        lines.append(f"| {what} | {op} {goal} | {shown} | {met} |")
    return lines


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _rel(path: Path, out: Path) -> str:
    try:
        return str(path.resolve().relative_to(out.resolve().parent))
    except ValueError:
        return str(path.resolve())


def memory_section(memory: dict[str, dict], ratios: dict[str, float], args: argparse.Namespace) -> list[str]:
    van = memory.get("vanilla", {}).get("memory")
    steps = sorted({st["steps"] for runs in memory.values() for st in runs["memory"]["stages"]})
    lines = ["## Memory: peak per-rank model-state bytes", "",
             f"The benchmark shape, {args.memory_world_size} ranks, the STEP paper's mixed-precision policy (bf16 compute; fp32 "
             "master weights, gradients and AdamW moments for trainable parameters; bf16 frozen weights), "
             f"{'/'.join(map(str, steps))} steps per stage. *Predicted* is `steptitan.memory` (no run needed), *measured* is "
             "`metrics.memory_breakdown` of the live FSDP2 shards at the step with the largest model states.", "",
             "| recipe | stages (layers) | peak predicted | peak measured | pred/meas | vs vanilla | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    worst = 0.0
    for name, runs in memory.items():
        s = runs["memory"]
        pred, meas = peak_bytes(s)
        worst = max(worst, abs(pred / meas - 1))
        rel = meas / peak_bytes(van)[1] if van else None
        if rel is not None:
            ratios[f"{name}_memory_vs_vanilla"] = rel
        layers = "/".join(str(st["n_layers"]) for st in s["stages"])
        lines.append(f"| {name} | {layers} | {mib(pred)} | {mib(meas)} | {pred / meas:.4f} | "
                     f"{f'{rel:.3f}x' if rel is not None else '-'} | {mib(s['peak_rss_bytes'])} |")
    ratios["planner_worst_error"] = worst
    return lines


def quality_section(quality: dict[str, dict], ratios: dict[str, float], facts: dict[str, Any],
                    args: argparse.Namespace) -> tuple[list[str], dict[str, list], float | None]:
    van = quality.get("vanilla", {})
    van_final = {seed: s["final_val_loss"] for seed, s in van.items()}
    target = statistics.fmean(van_final.values()) if van_final else None
    van_flops = statistics.fmean(sum(st["train_flops"] for st in s["stages"]) for s in van.values()) if van else None
    lines = ["## Quality at equal training FLOPs", "",
             f"Train on `{Path(args.train).name}`, evaluate on the same blocks of `{Path(args.val).name}` for every run. "
             f"Budget: vanilla's training FLOPs for {facts['vanilla_steps']} steps x {facts['tokens_per_step']:,} tokens "
             f"({facts['budget_flops']:.3e} FLOPs); each recipe's stage steps are scaled (keeping its proportions) to it. "
             f"Seeds 0..{args.seeds - 1}. **vs vanilla** is paired by seed: the ratio recipe/vanilla of each seed's final "
             "validation loss, its mean and a 95% Student-t interval over seeds (mean +- t(0.975, n-1) x sd / sqrt(n)); "
             "*no difference* = the interval contains 1. **FLOPs to reach vanilla** is the first evaluation at which the "
             "recipe's validation loss (mean over seeds) is <= vanilla's final mean, as FLOPs and as a share of vanilla's "
             "budget. *Model states* are the paper-policy peaks of the memory runs.", "",
             "| recipe | steps per stage | seeds | final val loss (mean +- sd) | vs vanilla (paired, 95% t-interval) | "
             "FLOPs to reach vanilla | of vanilla's | model states vs vanilla | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    curves: dict[str, list] = {}
    for name, runs in quality.items():
        finals = {seed: s["final_val_loss"] for seed, s in runs.items()}
        mean, sd = mean_sd(list(finals.values()))
        curve = mean_curve([s["curve"] for s in runs.values()])
        curves[name] = curve
        pr = paired_ratio(finals, van_final) if van_final else None
        if name == "vanilla":
            vs = "1 (the reference)"
        elif pr is None:
            vs = "-"
        elif pr.low is None:
            vs = f"{pr.mean:.4f}x (1 seed: no interval)"
        else:
            vs = f"{pr.mean:.4f}x [{pr.low:.4f}, {pr.high:.4f}]" + (" no difference" if pr.no_difference else "")
        if pr is not None:
            ratios[f"{name}_val_loss_vs_vanilla"] = pr.mean
            ratios[f"{name}_val_loss_interval"] = (pr.low, pr.high)
            ratios[f"{name}_val_loss_seeds"] = len(pr.seeds)
        reach = flops_to_reach(curve, target) if target is not None else None
        mem = ratios.get(f"{name}_memory_vs_vanilla")
        one = next(iter(runs.values()))
        toks = statistics.fmean(sum(st["step_tokens_per_s"] * st["steps"] for st in s["stages"])
                                / sum(st["steps"] for st in s["stages"]) for s in runs.values())
        loss = f"{mean:.4f} +- {sd:.4f}" if sd is not None else f"{mean:.4f}"
        reached = [f"{reach:.3e}", f"{reach / van_flops:.2f}"] if reach is not None and van_flops else ["not reached", "-"]
        cells = [name, "/".join(str(st["steps"]) for st in one["stages"]), str(len(runs)), loss, vs, *reached,
                 f"{mem:.3f}x" if mem is not None else "-", f"{toks:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines, curves, target


def throughput_section(tp: dict[str, Any], ratios: dict[str, float]) -> list[str]:
    if not tp or not tp.get("steptitan"):
        return []
    st_med, bare_med = statistics.median(tp["steptitan"]), statistics.median(tp["bare"])
    ratios["vanilla_tokens_per_s_vs_bare_runs"] = st_med / bare_med
    lines = ["## Throughput: steptitan vs a bare FSDP2 loop", ""]
    if "ab" in tp:
        ab = tp["ab"]
        ratios["vanilla_tokens_per_s_vs_bare"] = ab["steptitan_tokens_per_s"] / ab["tokens_per_s"]
        lines += [f"**Alternating steps in one run** (the primary figure): `steptitan.experiments.bare_fsdp --ab` builds "
                  "the bare FSDP2 model and steptitan's Trainer for vanilla on the benchmark shape in the same processes "
                  f"and alternates their steps, {ab['steps']} steps each: steptitan {ab['steptitan_tokens_per_s']:,.0f} "
                  f"tok/s, bare {ab['tokens_per_s']:,.0f} tok/s, ratio **{ratios['vanilla_tokens_per_s_vs_bare']:.3f}** "
                  f"({ab['wall_s']:.0f} s).", "", "Separate runs, interleaved:", ""]
    lines += ["| round | steptitan vanilla tok/s | bare FSDP2 tok/s | ratio |", "|---|---|---|---|"]
    for k, (a, b) in enumerate(zip(tp["steptitan"], tp["bare"])):
        lines.append(f"| {k} | {a:,.0f} | {b:,.0f} | {a / b:.3f} |")
    lines += [f"| median | {st_med:,.0f} | {bare_med:,.0f} | {st_med / bare_med:.3f} |", ""]
    return lines


def selection_table(quality: dict[str, dict]) -> list[str]:
    """Mean final loss per row on the selection slice (printed, never a report: no ratio, no verdict)."""
    lines = ["| row (selection slice) | seeds | mean final loss |", "|---|---|---|"]
    for name, runs in quality.items():
        lines.append(f"| {name} | {len(runs)} | {statistics.fmean(s['final_val_loss'] for s in runs.values()):.4f} |")
    return lines


def write_report(args: argparse.Namespace, shape: Any, frac: float, facts: dict[str, Any], quality: dict[str, dict],
                 memory: dict[str, dict], meta: dict[str, Any], from_ledger: list[str] | None = None,
                 tuned: dict[str, Any] | None = None, memory_ac: dict[str, dict] | None = None) -> Path:
    out, plot_dir = Path(args.out), Path(args.plots)
    ratios: dict[str, Any] = {}
    run_wall = sum(s.get("wall_s") or 0 for runs in (*quality.values(), *memory.values()) for s in runs.values())
    lines = ["# Benchmarks", "", "Produced by `steptitan bench` (= `tools/bench.py`; how and why: "
             "[docs/benchmark.md](docs/benchmark.md)).", "",
             (f"Command: `{meta['report_command']}` (report only; the last command that ran runs in that folder: "
              f"`{meta.get('command', '?')}`)  " if meta.get("report_command") else
              f"Command: `{meta.get('command', 'steptitan bench')}`  "),
             f"Shape: dim {shape.dim}, {shape.layers} layers at the end, {shape.heads} heads, FFN {shape.ffn}, vocab "
             f"{shape.vocab} (transformer blocks hold {frac:.1%} of the parameters), seq {shape.seq_len}, batch "
             f"{shape.batch} per rank x {args.world_size} ranks. Summed wall time of the runs: {run_wall / 60:.1f} min "
             "(a shared machine: absolute times and tokens/s are noisy; ratios are measured within this benchmark).", ""]
    if from_ledger:
        lines += [f"{len(from_ledger)} of the runs below were read from the results ledger (`{args.ledger}`), their "
                  "folders being gone; each is the same resolved recipe, recorded when it finished: "
                  + ", ".join(from_ledger) + ".", ""]
    body: list[str] = []
    if memory:
        body += memory_section(memory, ratios, args)
        body += ["", f"![memory per stage]({_rel(plots.plot_memory_stages({n: r['memory'] for n, r in memory.items()}, plot_dir / 'memory_per_stage.png'), out)})", ""]
    if quality:
        q_lines, curves, target = quality_section(quality, ratios, facts, args)
        body += q_lines
        body += ["", f"![validation loss vs FLOPs]({_rel(plots.plot_curves(curves, plot_dir / 'loss_vs_flops.png', target), out)})", ""]
        points = [(n, ratios[f"{n}_memory_vs_vanilla"], ratios[f"{n}_val_loss_vs_vanilla"], *ratios[f"{n}_val_loss_interval"])
                  for n in quality if f"{n}_memory_vs_vanilla" in ratios and f"{n}_val_loss_vs_vanilla" in ratios]
        if points:
            body += ["## Pareto: memory vs quality", "", "Each recipe: peak model states vs vanilla (x, paper policy) "
                     "against final validation loss vs vanilla (y, mean of per-seed ratios, bars = 95% t-interval); "
                     "the dashed line joins the recipes that no other beats on both.", "",
                     f"![Pareto front]({_rel(plots.plot_pareto(points, plot_dir / 'pareto.png'), out)})", ""]
    body += throughput_section(meta.get("throughput", {}), ratios)
    text = "\n".join(lines + target_lines(ratios, args.seeds) + [""] + body) + "\n"
    if args.notes and Path(args.notes).is_file():
        text += "\n" + Path(args.notes).read_text()
    out.write_text(text)
    print(f"wrote {out} and plots in {plot_dir}")
    return out
