"""A benchmark report (docs/bench/TAG.md) from finished report-slice runs: tuning, non-inferiority bounds,
memory (model states and total peak, vs vanilla AdamW and vs vanilla with the same optimizer), plots, and
a results file (docs/bench/results/TAG.json) that BENCHMARKS.md collects over corpora and budgets."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from steptitan.experiments.bench_args import MEMORY_GOALS
from steptitan.experiments.downstream import METRICS as DOWNSTREAM_METRICS, downstream_rows, downstream_section
from steptitan.experiments import report as plots
from steptitan.experiments.report import peak_bytes
from steptitan.experiments.stats import (
    MARGIN,
    MAX_SEEDS,
    MIN_SEEDS,
    bootstrap_upper,
    flops_to_reach,
    mean_curve,
    mean_sd,
    non_inferiority,
)

# The goal (issue 22): model states vs vanilla AdamW (bench_args.MEMORY_GOALS), and "within 1%" of tuned
# vanilla by the bound.


def selection_table(quality: dict[str, dict]) -> list[str]:
    """Mean final loss per row on the selection slice (printed, never a report: no ratio, no verdict)."""
    lines = ["| row (selection slice) | seeds | mean final loss |", "|---|---|---|"]
    for name, runs in quality.items():
        lines.append(f"| {name} | {len(runs)} | {statistics.fmean(s['final_val_loss'] for s in runs.values()):.4f} |")
    return lines


def portable(command: str, args: argparse.Namespace) -> str:
    """A command line without this machine's folders: the run folder as RUNS, the checkout as '.', the
    shared data beside it as ../shared, a ``--docs`` folder outside the checkout as DOCS (docs name no
    absolute path of the machine they were made on)."""
    checkout = Path(__file__).resolve().parents[2]
    folders = [(Path(args.runs).resolve(), "RUNS"), (checkout.parent / "shared", "../shared")]
    docs = Path(getattr(args, "docs", None) or checkout / "docs" / "bench").resolve()
    if not docs.is_relative_to(checkout):
        folders.append((docs, "DOCS"))
    for folder, name in (*folders, (checkout, ".")):
        command = command.replace(str(folder), name)
    return command


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _rel(path: Path, out: Path) -> str:
    try:
        return str(path.resolve().relative_to(out.resolve().parent))
    except ValueError:
        return path.name


def optimizer_of(summary: dict[str, Any]) -> str:
    """The optimizer of a run's default group (its resolved recipe): adamw, adam_mini, galore, fira, ..."""
    t = summary["recipe_resolved"]["training"]
    default = t.get("optim", {}).get("default")
    if isinstance(default, dict):
        default = default.get("name")
    return default or t.get("optimizer", "adamw")


def total_peak(summary: dict[str, Any]) -> int:
    """Predicted per-rank peak of a run: model states + saved activations + buffers (flops.overhead_bytes),
    the largest over stages and ranks."""
    best = 0
    for st in summary["stages"]:
        for r, states in enumerate(st["predicted_model_state_bytes"]):
            over = st.get("predicted_overhead_bytes") or []
            best = max(best, states + st["predicted_activation_bytes"] + (sum(over[r].values()) if r < len(over) else 0))
    return best


def memory_rows(memory: dict[str, dict], memory_ac: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per row: measured/predicted model states, predicted total peak without/with activation checkpointing,
    its optimizer, and the ratios to vanilla AdamW and to the single-stage row with the same optimizer."""
    out: dict[str, dict[str, Any]] = {}
    for name, runs in memory.items():
        s = runs["memory"]
        pred, meas = peak_bytes(s)
        ac = memory_ac.get(name, {}).get("memory")
        out[name] = {"pred": pred, "meas": meas, "total": total_peak(s), "total_ac": total_peak(ac) if ac else None,
                     "rss": s["peak_rss_bytes"], "optimizer": optimizer_of(s),
                     "layers": "/".join(str(st["n_layers"]) for st in s["stages"]), "stages": len(s["stages"])}
    van = out.get("vanilla")
    # the vanilla of the same optimizer: a one-stage row of the bench shape's depth with that optimizer
    same = {r["optimizer"]: n for n, r in out.items() if r["stages"] == 1 and van and r["layers"] == van["layers"]
            and n != "vanilla"}
    same["adamw"] = "vanilla"
    for name, r in out.items():
        if van:
            r["vs_vanilla"] = r["meas"] / van["meas"]
            r["total_vs_vanilla"] = r["total"] / van["total"]
            if r["total_ac"] is not None and van["total_ac"]:
                r["total_ac_vs_vanilla"] = r["total_ac"] / van["total_ac"]
        ref = out.get(same.get(r["optimizer"], ""))
        if ref:
            r["same_opt_row"] = same[r["optimizer"]]
            r["vs_same_opt"] = r["meas"] / ref["meas"]
            r["total_vs_same_opt"] = r["total"] / ref["total"]
    return out


def memory_section(mem: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = ["## Memory: per-rank peak, model states and total", "",
             f"Each row's memory run: the benchmark shape, {args.memory_world_size} gloo ranks, the STEP paper's policy "
             "(bf16 compute; fp32 master weights, gradients and optimizer state of trainable parameters; bf16 frozen "
             f"weights), {args.mem_steps} steps per stage. *Model states* are measured on the live FSDP2 shards at the "
             "step with the largest (`metrics.memory_breakdown`; *pred/meas* compares `steptitan.memory`'s "
             "prediction). *Total* adds the predicted saved activations of one micro-batch and the buffers "
             "(`steptitan.flops.activation_bytes`, `overhead_bytes`: unsharded parameters in flight, logits, shard "
             "padding), without and with activation checkpointing (a second memory run). *vs vanilla* is vanilla "
             "AdamW; *vs same optimizer* is the one-stage row with the row's optimizer (e.g. adam_mini for step3).", "",
             "| row | stages (layers) | optimizer | model states | pred/meas | vs vanilla | vs same optimizer | "
             "total | vs vanilla | total, act. ckpt | vs vanilla | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in mem.items():
        def x(key: str) -> str:
            return f"{r[key]:.3f}x" if r.get(key) is not None else "-"

        same = f"{r['vs_same_opt']:.3f}x ({r['same_opt_row']})" if r.get("same_opt_row") else "-"
        lines.append(f"| {name} | {r['layers']} | {r['optimizer']} | {mib(r['meas'])} | {r['pred'] / r['meas']:.4f} | "
                     f"{x('vs_vanilla')} | {same} | {mib(r['total'])} | {x('total_vs_vanilla')} | "
                     f"{mib(r['total_ac']) if r['total_ac'] else '-'} | {x('total_ac_vs_vanilla')} | {mib(r['rss'])} |")
    return lines


def _blocks(summary: dict[str, Any]) -> list[float] | None:
    return summary["stages"][-1].get("val_block_losses")


def quality_rows(quality: dict[str, dict], tuned: dict[str, Any], facts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per row: losses over seeds, the non-inferiority statistics against vanilla, tuning, tokens and passes."""
    van = quality.get("vanilla", {})
    van_final = {seed: s["final_val_loss"] for seed, s in van.items()}
    van_blocks = {seed: _blocks(s) for seed, s in van.items() if _blocks(s)}
    out = {}
    for name, runs in quality.items():
        finals = {seed: s["final_val_loss"] for seed, s in runs.items()}
        mean, sd = mean_sd(list(finals.values()))
        one = next(iter(runs.values()))
        tokens = one.get("tokens_seen")
        text = one.get("train_text_tokens")
        ni = non_inferiority(finals, van_final) if name != "vanilla" else None
        blocks = {seed: _blocks(s) for seed, s in runs.items() if _blocks(s)}
        boot = bootstrap_upper(blocks, van_blocks) if ni is not None and len(set(blocks) & set(van_blocks)) >= 2 else None
        t = tuned.get(name.removesuffix("@tokens"))
        out[name] = {"finals": finals, "mean": mean, "sd": sd, "ni": ni, "boot_upper": boot, "tuned": t,
                     "steps": [st["steps"] for st in one["stages"]], "tokens": tokens,
                     "passes": tokens / text if tokens and text else None,
                     "flops": statistics.fmean(sum(st["train_flops"] for st in s["stages"]) for s in runs.values()),
                     "curve": mean_curve([s["curve"] for s in runs.values()]),
                     "blocks": len(_blocks(one) or [])}
    return out


def _tuning_cell(t: dict[str, Any] | None) -> str:
    if not t:
        return "untuned (recipe defaults)"
    edge = ", at grid edge" if t.get("at_edge") else ""
    variant = f", {t['chosen']['variant']}" if t["chosen"].get("variant") else ""
    return (f"LR {t['chosen']['lr']:g}, warmup {t['chosen']['warmup']}{variant} ({t['n_configs']} configs x "
            f"{len(t['seeds'])} seeds{edge})")


def quality_section(q: dict[str, dict[str, Any]], mem: dict[str, dict[str, Any]], facts: dict[str, Any],
                    args: argparse.Namespace) -> list[str]:
    lines = ["## Quality at equal training FLOPs, on the report slice", "",
             f"Train on `{Path(args.train).name}`, evaluate every run on the whole report slice of `{Path(args.val).name}` "
             f"({next(iter(q.values()))['blocks'] if q else 0} blocks of {args.seq_len + 1} tokens). Budget: vanilla's training "
             f"FLOPs for {facts['vanilla_steps']} steps x {facts['tokens_per_step']:,} tokens ({facts['budget_flops']:.3e}); "
             "each row's stage steps are scaled (keeping its proportions) to it, `@tokens` rows to vanilla's tokens "
             "instead. Every row is trained with the hyperparameters its tuning chose on the selection slice (*tuning*). "
             "*ratio* is the mean over seeds of recipe/vanilla final loss, paired by seed; *upper 95%* its one-sided "
             "95% t bound over seeds; *bootstrap* the same bound with blocks resampled too; *diff* the mean per-seed "
             f"difference in nats (its upper bound) and in perplexity. *Verdict* (pre-registered, docs/benchmark.md): "
             f"`within 1%` when the upper bound is <= {1 + MARGIN} with >= {MIN_SEEDS} seeds; `unresolved` while more "
             f"seeds (up to {MAX_SEEDS}) could still show it; `not shown` otherwise. *Passes* = training tokens / tokens "
             "of the training text.", "",
             "| row | steps per stage | tuning | seeds | final loss (mean +- sd) | ratio | upper 95% | bootstrap | "
             "diff nats (upper) | diff ppl | verdict | tokens | passes | model states vs vanilla | total vs vanilla |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in q.items():
        ni = r["ni"]
        loss = f"{r['mean']:.4f} +- {r['sd']:.4f}" if r["sd"] is not None else f"{r['mean']:.4f}"
        if ni is None:
            stats_cells = ["1 (reference)", "-", "-", "-", "-", "-"]
        else:
            stats_cells = [f"{ni.mean:.4f}", f"{ni.upper:.4f}" if ni.upper is not None else "-",
                           f"{r['boot_upper']:.4f}" if r["boot_upper"] is not None else "-",
                           f"{ni.diff_nats:+.4f} ({ni.diff_upper:+.4f})" if ni.diff_upper is not None else f"{ni.diff_nats:+.4f}",
                           f"{ni.diff_ppl:+.2f}", f"**{ni.verdict()}**"]
        m = mem.get(name.removesuffix("@tokens"), {})
        cells = [name, "/".join(map(str, r["steps"])), _tuning_cell(r["tuned"]), str(len(r["finals"])), loss, *stats_cells,
                 f"{r['tokens']:,}" if r["tokens"] else "-", f"{r['passes']:.2f}" if r["passes"] else "-",
                 f"{m['vs_vanilla']:.3f}x" if m.get("vs_vanilla") else "-",
                 f"{m['total_vs_vanilla']:.3f}x" if m.get("total_vs_vanilla") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goal_row_problem(goal_rows: dict[str, str], tuned: dict[str, Any]) -> str | None:
    """Why ``goal_rows`` (goal -> the row standing for it) breaks protocol 3, or None. A variant may stand
    for a goal only when the selection slice chose it: its tuned mean is no higher than the recipe's own."""
    for goal, row in goal_rows.items():
        if row != goal and goal in tuned and row in tuned:
            own, variant = (min(t["mean"] for t in tuned[r]["trials"]) for r in (goal, row))
            if variant > own:
                return (f"--goal-rows {goal}={row}: the selection slice prefers {goal} ({own:.4f} < {variant:.4f}); "
                        "a variant stands for a goal only when it was chosen there (docs/benchmark.md, Protocol 3)")
    return None


def target_rows(tag: str, q: dict[str, dict[str, Any]], mem: dict[str, dict[str, Any]], untuned: set[str],
                goal_rows: dict[str, str] | None = None) -> list[dict]:
    """The goal's rows for this corpus and budget: memory bound and loss bound per STEP goal, measured on the
    row standing for it (``goal_rows``, default the row of the goal's name). A loss verdict needs both the
    row and vanilla tuned (``untuned``: the rows without a tuning entry)."""
    out = []
    for goal, bound in MEMORY_GOALS.items():
        name = (goal_rows or {}).get(goal, goal)
        m = mem.get(name, {}).get("vs_vanilla")
        if m is not None:
            out.append({"tag": tag, "row": name, "goal": goal, "measure": "peak model states vs vanilla AdamW",
                        "target": f"<= {bound}", "value": f"{m:.3f}x", "met": "yes" if m <= bound else "no"})
        r = q.get(name)
        if r is None or r["ni"] is None:
            out.append({"tag": tag, "row": name, "goal": goal, "measure": "final loss vs tuned vanilla, one-sided 95% upper bound",
                        "target": f"<= {1 + MARGIN}", "value": "-", "met": "open: no report runs yet"})
        else:
            ni = r["ni"]
            verdict = ni.verdict()
            if {name, "vanilla"} & untuned:
                verdict = "open: a row is untuned"
            met = {"within 1%": "yes"}.get(verdict, "no" if verdict == "not shown" else verdict)
            up = f"{ni.upper:.4f}" if ni.upper is not None else "-"
            out.append({"tag": tag, "row": name, "goal": goal, "measure": "final loss vs tuned vanilla, one-sided 95% upper bound",
                        "target": f"<= {1 + MARGIN}", "value": f"{up} (mean {ni.mean:.4f}, {len(ni.seeds)} seeds)",
                        "met": met})
    return out


def targets_table(rows: list[dict]) -> list[str]:
    lines = ["| corpus, budget | row | measure | target | measured | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        met = r["met"] if r["met"] != "no" else "**no**"
        row = r["row"] if r.get("goal", r["row"]) == r["row"] else f"{r['row']} (for {r['goal']})"
        lines.append(f"| {r['tag']} | {row} | {r['measure']} | {r['target']} | {r['value']} | {met} |")
    return lines


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


def write_report(args: argparse.Namespace, shape: Any, frac: float, facts: dict[str, Any], quality: dict[str, dict],
                 memory: dict[str, dict], meta: dict[str, Any], from_ledger: list[str] | None = None,
                 tuned: dict[str, Any] | None = None, memory_ac: dict[str, dict] | None = None) -> Path:
    out, plot_dir = Path(args.out), Path(args.plots)
    tuned = tuned or {}
    mem = memory_rows(memory, memory_ac or {})
    q = quality_rows(quality, tuned, facts)
    sl = meta.get("slices", {})
    run_wall = sum(s.get("wall_s") or 0 for runs in (*quality.values(), *memory.values()) for s in runs.values())
    command = (f"`{portable(meta['report_command'], args)}` (report only; the last command that ran runs in that "
               f"folder: `{portable(meta.get('command', '?'), args)}`)" if meta.get("report_command")
               else f"`{portable(meta.get('command', 'steptitan bench'), args)}`")
    lines = [f"# Benchmark: {args.tag}", "",
             "Produced by `steptitan bench` (how and why: [docs/benchmark.md](../benchmark.md), section \"Protocol\").", "",
             f"Command: {command}  ",
             f"Shape: dim {shape.dim}, {shape.layers} layers at the end, {shape.heads} heads, FFN {shape.ffn}, vocab "
             f"{shape.vocab} (blocks hold {frac:.1%} of the parameters), seq {shape.seq_len}, batch {shape.batch} per "
             f"rank x {args.world_size} rank(s). Summed wall time of the runs: {run_wall / 60:.1f} min (a shared machine).  ",
             f"Data: train on `{Path(args.train).name}`; `{Path(args.val).name}` cut by document ({sl.get('rule', '?')} rule, "
             f"every {sl.get('select_every', '?')}rd document to selection): selection slice {sl.get('selection_documents', '?')} "
             f"documents / {sl.get('selection_chars', 0):,} characters (every choice), report slice "
             f"{sl.get('report_documents', '?')} documents / {sl.get('report_chars', 0):,} characters (these figures). "
             f"{args.seeds} report seeds (100..{99 + args.seeds}); selection seeds from 0; frozen weights stored in bf16 in every run "
             "(the memory column's policy), fp32 compute on the CPU.", ""]
    if from_ledger:
        lines += [f"{len(from_ledger)} of the runs were read from the results ledger (`{_rel(Path(args.ledger), out)}`), "
                  "their folders being gone; each is the same resolved recipe.", ""]
    untuned = [n for n in q if not q[n]["tuned"]]
    targets = target_rows(args.tag, q, mem, set(untuned), getattr(args, "goal_rows", None))
    lines += ["## Targets", ""] + (targets_table(targets) if targets else ["(no STEP row in this report)"]) + [""]
    if mem:
        lines += memory_section(mem, args)
        png = plots.plot_memory_stages({n: r["memory"] for n, r in memory.items()}, plot_dir / "memory_per_stage.png")
        lines += ["", f"![memory per stage]({_rel(png, out)})", ""]
    if q:
        lines += quality_section(q, mem, facts, args)
        van = q.get("vanilla")
        target = van["mean"] if van else None
        png = plots.plot_curves({n: r["curve"] for n, r in q.items()}, plot_dir / "loss_vs_flops.png", target)
        reach = []
        for n, r in q.items():
            f = flops_to_reach(r["curve"], target) if target is not None else None
            reach.append(f"{n} {f / van['flops']:.2f}" if f is not None and van else f"{n} not reached")
        lines += ["", "FLOPs to reach vanilla's final mean loss on the mean curve (share of vanilla's budget; the curve "
                  "points before the last use the first eval-batches x batch blocks of the report slice): "
                  + "; ".join(reach) + ".", "", f"![validation loss vs FLOPs]({_rel(png, out)})", ""]
        points = [(n, mem[n]["vs_vanilla"], r["ni"].mean, r["ni"].mean, r["ni"].upper) for n, r in q.items()
                  if r["ni"] is not None and r["ni"].upper is not None and mem.get(n, {}).get("vs_vanilla")]
        if points:
            png = plots.plot_pareto(points, plot_dir / "pareto.png")
            lines += ["## Pareto: memory vs quality", "", "Model states vs vanilla AdamW (x) against the loss ratio "
                      "(y; the bar runs up to the one-sided 95% upper bound).", "", f"![Pareto front]({_rel(png, out)})", ""]
    down = downstream_rows(quality)
    lines += downstream_section(down)
    lines += throughput_section(meta.get("throughput", {}), {})
    if untuned:
        lines += [f"Untuned rows (recipe defaults; no claim is made for them): {', '.join(untuned)}.", ""]
    text = "\n".join(lines) + "\n"
    if args.notes and Path(args.notes).is_file():
        text += "\n" + Path(args.notes).read_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"tag": args.tag, "report": _rel(out, results.parent.parent / "x"),
                                   "targets": targets, "command": portable(meta.get("report_command") or meta.get("command") or "", args),
                                   "rows": {n: {"mean": r["mean"], "seeds": len(r["finals"]),
                                                "ratio": r["ni"].mean if r["ni"] else None,
                                                "upper": r["ni"].upper if r["ni"] else None,
                                                "verdict": r["ni"].verdict() if r["ni"] else None,
                                                "downstream": down.get(n, {})}
                                            for n, r in q.items()}}, indent=1, default=float))
    print(f"wrote {out}, {results} and plots in {plot_dir}")
    return out


def downstream_summary_rows(data: dict[str, Any]) -> list[str]:
    """BENCHMARKS.md's downstream rows of one results file: mean [paired 95% interval of the difference]."""
    out = []
    for name, row in data.get("rows", {}).items():
        metrics = row.get("downstream") or {}
        if not metrics:
            continue
        cells = []
        for key, *_ in DOWNSTREAM_METRICS:
            c = metrics.get(key)
            if c is None:
                cells.append("-")
            elif c.get("low") is not None:
                cells.append(f"{c['mean']:.3f} [{c['low']:+.3f}, {c['high']:+.3f}]")
            else:
                cells.append(f"{c['mean']:.3f}")
        n = max(c["n"] for c in metrics.values())
        out.append(f"| {data['tag']} | {name} | {n} | " + " | ".join(cells) + " |")
    return out


def write_summary(results_dir: Path, out: Path, header: str) -> Path:
    """BENCHMARKS.md: the targets of every corpus and budget (docs/bench/results/*.json) in one table,
    each linking to its report, then ``header`` (the hand-written reading of the figures)."""
    rows, links, down = [], [], []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        rows += data["targets"]
        links.append(f"- [{data['tag']}](docs/bench/{data['tag']}.md): `{data['command']}`")
        down += downstream_summary_rows(data)
    lines = ["# Benchmarks", "", "Command: `steptitan bench --summary` (this page, from `docs/bench/results/*.json` and "
             "`docs/bench/notes/summary.md`).", "", "Every figure below comes from the per-corpus reports linked here, each made by "
             "`steptitan bench` under the protocol of [docs/benchmark.md](docs/benchmark.md) (\"Protocol\"): tuned "
             "baselines, choices on a selection slice only, fresh report seeds, the one-sided 95% bound.", "",
             "## Targets", ""] + targets_table(rows) + ["", "Reports:", ""] + links + [""]
    if down:
        lines += ["## Downstream (offline lm-eval tasks, each report's final weights)", "",
                  "Mean over report seeds; in brackets the paired difference to vanilla with its 95% interval "
                  "(each report's downstream section). Chance: 0.25 for kjv_choice, ~0 for kjv_cloze acc.", "",
                  "| corpus, budget | row | seeds | " + " | ".join(label for _, label, _, _ in DOWNSTREAM_METRICS) + " |",
                  "|---|---|---|" + "---|" * len(DOWNSTREAM_METRICS)] + down + [""]
    out.write_text("\n".join(lines) + "\n" + header)
    return out

