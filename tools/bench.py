"""The benchmark: STEP and its alternatives at equal training FLOPs, memory per stage, throughput.

    python tools/bench.py                       # everything, writes BENCHMARKS.md and docs/bench/*.png
    python tools/bench.py --rows vanilla,step3  # a subset
    python tools/bench.py --budget-steps 60 --out /tmp/B.md --plots /tmp/plots   # a quick smoke run

Three parts, all launched as ``torchrun --nproc_per_node=N -m steptitan.train`` runs
(docs/benchmark.md says why each is built the way it is):

1. quality: every row trains on WikiText-2 valid.txt and is evaluated on the same
   blocks of test.txt, seed 0, at an equal budget of training FLOPs. The budget is
   vanilla's FLOPs for ``--budget-steps`` steps of the final model; each recipe's
   stage steps are scaled (keeping the recipe's proportions) so that its forward +
   backward FLOPs, counted per stage by ``steptitan.memory.flops_per_token``, match.
2. memory: the same rows on the memory-comparison shape (transformer blocks >= 80%
   of the parameters) under the STEP paper's mixed-precision policy (bf16 compute,
   fp32 master weights/gradients/Adam for trainable parameters, bf16 frozen weights),
   a few steps per stage: measured vs predicted peak per-rank model-state bytes.
3. throughput: steptitan's vanilla recipe and tools/bare_fsdp.py on the same final
   model, interleaved (bare, steptitan, bare, steptitan, ...) so that the load other
   processes put on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"

# name -> (recipe, overrides that put it on the quality shape: dim 128, 6 layers at the end, vocab 2048)
QUALITY_ROWS: dict[str, tuple[str, list[str]]] = {
    "vanilla": ("recipes/vanilla.toml", ["model.n_layers=6"]),
    "step3": ("recipes/step3.toml", []),
    "step3_trainemb": ("recipes/bench/step3_trainemb.toml", []),
    "step_noadapter": ("recipes/step_noadapter.toml", []),
    "step_lower": ("recipes/step_lower.toml", []),
    "step_relora": ("recipes/step_relora.toml", ["model.n_layers=3"]),  # 2 stages: 3 -> 6 (interpolation doubles)
    "step_switchlora": ("recipes/step_switchlora.toml", ["model.n_layers=3"]),
    "relora": ("recipes/relora.toml", ["model.n_layers=6"]),
    "switchlora": ("recipes/switchlora.toml", ["model.n_layers=6"]),
    "galore": ("recipes/galore.toml", []),
}
# the memory-comparison shape: dim 256, 12 layers at the end (blocks 90% of the parameters)
MEM_SHAPE = ["model.dim=256", "model.ffn_hidden=688"]
MEM_ROWS: dict[str, list[str]] = {
    "vanilla": ["model.n_layers=12"],
    "step3": ["model.n_layers=4", "stages.1.growth.n_new=4", "stages.2.growth.n_new=4"],
    "step3_trainemb": ["model.n_layers=4", "stages.1.growth.n_new=4", "stages.2.growth.n_new=4"],
    "step_noadapter": ["model.n_layers=4", "stages.1.growth.n_new=4", "stages.2.growth.n_new=4"],
    "step_lower": ["model.n_layers=4", "stages.1.growth.n_new=4", "stages.2.growth.n_new=4"],
    "step_relora": ["model.n_layers=6"],
    "step_switchlora": ["model.n_layers=6"],
    "relora": ["model.n_layers=12"],
    "switchlora": ["model.n_layers=12"],
    "galore": ["model.n_layers=12", "training.galore.rank=64"],
}
PAPER_POLICY = ["training.dtype=bfloat16", "training.frozen_dtype=bfloat16"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def common_overrides(cache: str, nproc: int, eval_batches: int) -> list[str]:
    return [f"data.files=[{WIKITEXT / 'valid.txt'}]", f"data.val_files=[{WIKITEXT / 'test.txt'}]",
            f"data.cache_dir={cache}", "data.max_chars=0", "training.seed=0", "checkpoint.enabled=false",
            f"training.eval_batches={eval_batches}", "training.steps_per_log=20", "overwrite=true"]


def torchrun(args: list[str], nproc: int, log_path: Path, module: str | None = "steptitan.train") -> float:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    cmd += (["-m", module] if module else []) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    with open(log_path, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}); see {log_path}")
    return wall


def stage_flops(recipe_path: str, overrides: list[str], nproc: int) -> tuple[list[int], list[int]]:
    """(training FLOPs per optimizer step of each stage, the recipe's steps per stage)."""
    from steptitan.memory import stage_flops_per_token
    from steptitan.plan import build_plan
    from steptitan.recipe import load_recipe

    recipe = load_recipe(REPO / recipe_path, overrides)
    t = recipe.training
    tokens = nproc * t.batch_size * t.grad_accum * t.seq_len
    plans = build_plan(recipe)
    return ([stage_flops_per_token(p, t.seq_len, t.activation_checkpointing).total * tokens for p in plans],
            [p.steps for p in plans])


def equal_flop_steps(per_step: list[int], proportions: list[int], budget: float) -> list[int]:
    """Stage steps keeping the recipe's proportions whose total FLOPs is closest to ``budget``."""
    unit = budget / sum(w * f for w, f in zip(proportions, per_step))
    return [max(1, round(w * unit)) for w in proportions]


def val_curve(run_dir: Path, stages: list[dict]) -> list[tuple[float, float]]:
    """(cumulative training FLOPs, val loss) for every evaluation logged to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted((run_dir / "tb").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "val/loss" in acc.Tags()["scalars"]:
            for ev in acc.Scalars("val/loss"):
                points[ev.step] = ev.value
    bounds, start, flops_before = [], 0, 0.0
    for s in stages:
        per_step = s["train_flops"] / s["steps"]
        bounds.append((start, start + s["steps"], flops_before, per_step))
        start += s["steps"]
        flops_before += s["train_flops"]
    out = []
    for step, loss in sorted(points.items()):
        for lo, hi, before, per_step in bounds:
            if lo < step <= hi:
                out.append((before + (step - lo) * per_step, loss))
                break
    return out


def run_quality(rows, args, common) -> dict[str, dict]:
    van_flops, _ = stage_flops(*QUALITY_ROWS["vanilla"], args.nproc)
    budget = van_flops[0] * args.budget_steps
    log(f"FLOP budget {budget:.3e} (= vanilla's {args.budget_steps} steps)")
    results = {}
    for name in rows:
        recipe, over = QUALITY_ROWS[name]
        per_step, proportions = stage_flops(recipe, over, args.nproc)
        steps = equal_flop_steps(per_step, proportions, budget)
        step_over = [f"stages.{i}.steps={n}" for i, n in enumerate(steps)]
        run_dir = Path(args.runs) / f"q_{name}"
        interval = max(1, args.budget_steps // 4)
        cmd = [recipe, *over, *common, *step_over, f"output_dir={run_dir}", f"name=q_{name}",
               f"training.eval_interval={interval}"]
        log(f"quality {name}: steps {steps} (FLOPs {sum(s * f for s, f in zip(steps, per_step)):.3e})")
        wall = torchrun(cmd, args.nproc, Path(args.runs) / f"q_{name}.log")
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["wall_s"] = wall
        summary["command"] = "torchrun --nproc_per_node={} -m steptitan.train {}".format(args.nproc, " ".join(cmd))
        summary["curve"] = val_curve(run_dir, summary["stages"])
        results[name] = summary
        log(f"  -> val loss {summary['final_val_loss']:.4f} in {wall:.0f}s")
    return results


def run_memory(rows, args, common) -> dict[str, dict]:
    results = {}
    for name in rows:
        recipe, _ = QUALITY_ROWS[name]
        over = MEM_SHAPE + MEM_ROWS[name] + PAPER_POLICY
        from steptitan.recipe import load_recipe

        n_stages = len(load_recipe(REPO / recipe, over).stages)
        run_dir = Path(args.runs) / f"m_{name}"
        cmd = [recipe, *over, *common, *[f"stages.{i}.steps={args.mem_steps}" for i in range(n_stages)],
               "training.eval_batches=1", "training.warmup_steps=1", f"output_dir={run_dir}", f"name=m_{name}"]
        log(f"memory {name}")
        wall = torchrun(cmd, args.nproc, Path(args.runs) / f"m_{name}.log")
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["wall_s"] = wall
        summary["command"] = "torchrun --nproc_per_node={} -m steptitan.train {}".format(args.nproc, " ".join(cmd))
        results[name] = summary
    return results


def run_throughput(args, common) -> dict[str, list[float]]:
    """Interleaved steptitan-vanilla / bare-FSDP2 runs of the quality shape's final model."""
    from steptitan.data import prepare_data
    from steptitan.recipe import load_recipe

    recipe_path, over = QUALITY_ROWS["vanilla"]
    recipe = load_recipe(REPO / recipe_path, over + common)
    data = prepare_data(recipe.data, recipe.model.vocab_size)
    m, t = recipe.model, recipe.training
    out: dict[str, list] = {"steptitan": [], "bare": [], "bare_runs": []}
    for k in range(args.throughput_rounds):
        bare_json = Path(args.runs) / f"bare_{k}.json"
        bare_cmd = ["tools/bare_fsdp.py", "--tokens", str(data.train_path), "--dtype", data.dtype, "--dim", str(m.dim),
                    "--layers", str(m.n_layers), "--heads", str(m.n_heads), "--vocab", str(m.vocab_size),
                    "--ffn", str(m.ffn_hidden), "--batch", str(t.batch_size), "--seq-len", str(t.seq_len),
                    "--steps", str(args.throughput_steps), "--lr", str(t.lr), "--out", str(bare_json)]
        order = ["bare", "steptitan"] if k % 2 == 0 else ["steptitan", "bare"]
        for which in order:
            if which == "bare":
                wall = torchrun(bare_cmd, args.nproc, Path(args.runs) / f"bare_{k}.log", module=None)
                res = json.loads(bare_json.read_text())
                res["wall_s"] = wall
                res["command"] = f"torchrun --nproc_per_node={args.nproc} " + " ".join(bare_cmd)
                out["bare"].append(res["tokens_per_s"])
                out["bare_runs"].append(res)
            else:
                run_dir = Path(args.runs) / f"t_vanilla_{k}"
                cmd = [recipe_path, *over, *common, f"stages.0.steps={args.throughput_steps}", "training.eval_batches=1",
                       f"output_dir={run_dir}", "training.steps_per_log=1000"]
                torchrun(cmd, args.nproc, Path(args.runs) / f"t_vanilla_{k}.log")
                s = json.loads((run_dir / "summary.json").read_text())
                out["steptitan"].append(s["stages"][0]["step_tokens_per_s"])
            log(f"throughput round {k} {which}: {out[which][-1]:,.0f} tok/s")
    if args.ab_steps:
        ab_json = Path(args.runs) / "ab.json"
        ab_over = [x for o in over + common + [f"output_dir={Path(args.runs) / 'ab_steptitan'}"] for x in ("--override", o)]
        ab_cmd = bare_cmd[:bare_cmd.index("--steps")] + ["--steps", str(args.ab_steps), "--lr", str(t.lr),
                                                          "--out", str(ab_json), "--ab", recipe_path, *ab_over]
        wall = torchrun(ab_cmd, args.nproc, Path(args.runs) / "ab.log", module=None)
        res = json.loads(ab_json.read_text())
        res["wall_s"], res["command"] = wall, f"torchrun --nproc_per_node={args.nproc} " + " ".join(ab_cmd)
        out["ab"] = res
        log(f"throughput A/B (alternating steps in one run): steptitan {res['steptitan_tokens_per_s']:,.0f} "
            f"vs bare {res['tokens_per_s']:,.0f} tok/s")
    return out


# --------------------------------------------------------------------------- report


def gib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def plots(quality: dict, memory: dict, plot_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    files = []
    if quality:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, s in quality.items():
            if s["curve"]:
                xs, ys = zip(*s["curve"])
                ax.plot(xs, ys, marker="o", ms=3, label=name, lw=2 if name in ("vanilla", "step3") else 1)
        ax.set_xlabel("training FLOPs (forward + backward, all ranks)")
        ax.set_ylabel("validation loss (WikiText-2 test blocks)")
        ax.set_title("validation loss vs training FLOPs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_dir / "loss_vs_flops.png", dpi=120)
        plt.close(fig)
        files.append("loss_vs_flops.png")
    if memory:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labels, parts = [], {"params_trainable": [], "params_frozen": [], "grads": [], "optimizer": [], "adapter_pools": []}
        for name, s in memory.items():
            for st in s["stages"]:
                labels.append(f"{name}\n{st['name']}")
                peak = max((r["peak_step_memory"] for r in st["ranks"]), key=lambda m: m.get("model_states", 0))
                for k in parts:
                    parts[k].append(peak.get(k, 0) / 2**20)
        bottom = [0.0] * len(labels)
        for k, vals in parts.items():
            ax.bar(range(len(labels)), vals, bottom=bottom, label=k)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=5, rotation=90)
        ax.set_ylabel("MiB per rank (measured, peak step)")
        ax.set_title("model-state memory per stage (memory shape, paper's bf16 policy)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_dir / "memory_per_stage.png", dpi=120)
        plt.close(fig)
        files.append("memory_per_stage.png")
    return files


def peak_bytes(summary: dict) -> tuple[int, int]:
    """(predicted, measured) peak per-rank model-state bytes over a run's stages."""
    meas = max(st["peak_model_state_bytes"] for st in summary["stages"])
    pred = max(max(st["predicted_model_state_bytes"]) for st in summary["stages"])
    return pred, meas


def report(quality, memory, throughput, args, wall, command) -> tuple[str, dict]:
    ratios: dict[str, float | None] = {}
    lines = ["# Benchmarks", "", "Produced by `tools/bench.py` (how and why: [docs/benchmark.md](docs/benchmark.md)).", "",
             f"Command: `{command}`  ", f"Wall time of the whole benchmark: {wall / 60:.1f} min on {args.nproc} CPU ranks "
             "(a 2-core machine shared with other jobs: absolute times and tokens/s are noisy; ratios are measured "
             "within this run).", ""]
    if memory:
        van = memory.get("vanilla")
        lines += ["## Memory: peak per-rank model-state bytes", "",
                  "Memory-comparison shape: dim 256, 12 layers at the end, vocab 2048 (transformer blocks hold "
                  f"90% of the parameters), {args.nproc} ranks, the STEP paper's mixed-precision policy (bf16 compute; "
                  "fp32 master weights, gradients and AdamW moments for trainable parameters; bf16 frozen weights), "
                  f"{args.mem_steps} steps per stage. *Predicted* is `steptitan.memory` (no run needed), *measured* "
                  "is `metrics.memory_breakdown` of the live FSDP2 shards at the step with the largest model states "
                  "(gradients and optimizer state alive).", "",
                  "| recipe | stages (layers) | peak predicted | peak measured | pred/meas | vs vanilla | peak RSS | wall |",
                  "|---|---|---|---|---|---|---|---|"]
        worst = 0.0
        for name, s in memory.items():
            pred, meas = peak_bytes(s)
            worst = max(worst, abs(pred / meas - 1))
            rel = f"{meas / max(st['peak_model_state_bytes'] for st in van['stages']):.3f}x" if van else "-"
            layers = "/".join(str(st["n_layers"]) for st in s["stages"])
            lines.append(f"| {name} | {layers} | {gib(pred)} | {gib(meas)} | {pred / meas:.4f} | {rel} | "
                         f"{gib(s['peak_rss_bytes'])} | {s['wall_s']:.0f} s |")
        for variant in ("step3", "step3_trainemb"):
            if van and variant in memory:
                ratios[f"{variant}_memory_vs_vanilla"] = (
                    max(st["peak_model_state_bytes"] for st in memory[variant]["stages"])
                    / max(st["peak_model_state_bytes"] for st in van["stages"]))
        ratios["planner_worst_error_memory_shape"] = worst
        lines += ["", "![memory per stage](docs/bench/memory_per_stage.png)", ""]
    if quality:
        van = quality.get("vanilla")
        lines += ["## Quality at equal training FLOPs", "",
                  f"Quality shape: dim 128, 6 layers at the end, vocab 2048, seq 128, batch 8 per rank x {args.nproc} ranks, "
                  "fp32. Train on WikiText-2 valid.txt, evaluate on the same "
                  f"{quality[next(iter(quality))]['recipe_resolved']['training']['eval_batches'] * args.nproc * 8} "
                  "blocks of test.txt for every recipe, seed 0. Each recipe's stage steps are scaled (keeping the "
                  f"recipe's proportions) to vanilla's FLOPs for {args.budget_steps} steps. Memory columns: peak per-rank "
                  "model-state bytes in this fp32 run. tokens/s: steady-state training steps (eval excluded).", "",
                  "| recipe | steps per stage | train FLOPs | final val loss | ppl | vs vanilla | model states pred. | measured | peak RSS | tokens/s | wall |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        worst = 0.0
        for name, s in quality.items():
            pred, meas = peak_bytes(s)
            worst = max(worst, abs(pred / meas - 1))
            flops = sum(st["train_flops"] for st in s["stages"])
            toks = sum(st["step_tokens_per_s"] * st["steps"] for st in s["stages"]) / sum(st["steps"] for st in s["stages"])
            rel = f"{s['final_val_loss'] / van['final_val_loss']:.4f}x" if van else "-"
            steps = "/".join(str(st["steps"]) for st in s["stages"])
            lines.append(f"| {name} | {steps} | {flops:.3e} | {s['final_val_loss']:.4f} | {s['final_val_ppl']:.1f} | {rel} | "
                         f"{gib(pred)} | {gib(meas)} | {gib(s['peak_rss_bytes'])} | {toks:,.0f} | {s['wall_s']:.0f} s |")
        if throughput and throughput["bare_runs"]:
            b = throughput["bare_runs"]
            lines.append(f"| bare FSDP2 loop | {b[0]['steps']} | - | (train loss {b[-1]['final_train_loss']:.3f}) | - | - | - | "
                         f"{gib(max(r['model_state_bytes'] for r in b))} | {gib(max(r['peak_rss_bytes'] for r in b))} | "
                         f"{statistics.median(throughput['bare']):,.0f} | {statistics.median(r['wall_s'] for r in b):.0f} s |")
        for variant in ("step3", "step3_trainemb"):
            if van and variant in quality:
                ratios[f"{variant}_val_loss_vs_vanilla"] = quality[variant]["final_val_loss"] / van["final_val_loss"]
        ratios["planner_worst_error_quality_shape"] = worst
        lines += ["", "![validation loss vs FLOPs](docs/bench/loss_vs_flops.png)", ""]
    if throughput and throughput["steptitan"]:
        st_med, bare_med = statistics.median(throughput["steptitan"]), statistics.median(throughput["bare"])
        ratios["vanilla_tokens_per_s_vs_bare_runs"] = st_med / bare_med
        lines += ["## Throughput: steptitan vs a bare FSDP2 loop", ""]
        if "ab" in throughput:
            ab = throughput["ab"]
            ratios["vanilla_tokens_per_s_vs_bare"] = ab["steptitan_tokens_per_s"] / ab["tokens_per_s"]
            lines += [f"**Alternating steps in one run** (the primary figure): `tools/bare_fsdp.py --ab` builds the bare "
                      f"FSDP2 model and steptitan's Trainer for recipes/vanilla.toml (6 layers) in the same 2 processes and "
                      f"alternates their steps (bare, steptitan, steptitan, bare, ...), {ab['steps']} steps each, so both see "
                      f"the same machine load: steptitan {ab['steptitan_tokens_per_s']:,.0f} tok/s, bare "
                      f"{ab['tokens_per_s']:,.0f} tok/s, ratio **{ratios['vanilla_tokens_per_s_vs_bare']:.3f}** "
                      f"({ab['wall_s']:.0f} s).", "", "Command: `" + ab["command"] + "`", "",
                      "Separate runs, interleaved:", ""]
        lines += [
                  f"The quality shape's final model (6 layers), {args.throughput_steps} steps per run, "
                  f"{args.throughput_rounds} interleaved rounds (bare/steptitan, then steptitan/bare, ...); "
                  "tokens/s over steps 2.. of each run.", "",
                  "| round | steptitan vanilla tok/s | bare FSDP2 tok/s | ratio |", "|---|---|---|---|"]
        for k, (a, b) in enumerate(zip(throughput["steptitan"], throughput["bare"])):
            lines.append(f"| {k} | {a:,.0f} | {b:,.0f} | {a / b:.3f} |")
        lines.append(f"| median | {st_med:,.0f} | {bare_med:,.0f} | {st_med / bare_med:.3f} |")
        lines.append("")
    return "\n".join(lines) + "\n", ratios


TARGETS = {
    "step3_memory_vs_vanilla": ("3-stage STEP (step3) peak model states vs vanilla (paper policy, embeddings included)", "<=", 0.45),
    "step3_val_loss_vs_vanilla": ("3-stage STEP (step3) final val loss vs vanilla at equal FLOPs", "<=", 1.01),
    "step3_trainemb_memory_vs_vanilla": ("step3_trainemb peak model states vs vanilla (same policy)", "<=", 0.45),
    "step3_trainemb_val_loss_vs_vanilla": ("step3_trainemb final val loss vs vanilla at equal FLOPs", "<=", 1.01),
    "vanilla_tokens_per_s_vs_bare": ("steptitan vanilla tokens/s vs bare FSDP2 (alternating steps, one run)", ">=", 0.97),
    "vanilla_tokens_per_s_vs_bare_runs": ("steptitan vanilla tokens/s vs bare FSDP2 (separate runs, median)", ">=", 0.97),
    "planner_worst_error_memory_shape": ("planner vs measured model-state bytes, worst |error| (memory runs)", "<=", 0.05),
    "planner_worst_error_quality_shape": ("planner vs measured model-state bytes, worst |error| (quality runs)", "<=", 0.05),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(QUALITY_ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--parts", default="memory,quality,throughput")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--budget-steps", type=int, default=150, help="FLOP budget = vanilla's FLOPs for this many steps")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps per stage in the memory runs")
    ap.add_argument("--eval-batches", type=int, default=16, help="validation batches per rank (same blocks for every row)")
    ap.add_argument("--throughput-rounds", type=int, default=3)
    ap.add_argument("--throughput-steps", type=int, default=30)
    ap.add_argument("--ab-steps", type=int, default=60, help="steps of each loop in the alternating A/B run (0 = skip)")
    ap.add_argument("--mem-rows", default="vanilla,step3,step3_trainemb,step_noadapter,step_relora,step_switchlora,relora,switchlora,galore",
                    help="rows of the memory part (step_lower has step3's memory)")
    ap.add_argument("--runs", default="runs/bench")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/steptitan"))
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--plots", default="docs/bench")
    ap.add_argument("--notes", default="docs/bench/notes.md", help="appended to the report (findings written by hand)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report and plots from <runs>/results.json")
    ap.add_argument("--results", default=None, help="also write the raw results JSON here (default: <runs>/results.json)")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in QUALITY_ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(QUALITY_ROWS)}")
    parts = set(args.parts.split(","))
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    common = common_overrides(args.cache, args.nproc, args.eval_batches)
    command = "python tools/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results_path = Path(args.results or Path(args.runs) / "results.json")
    if args.report_only:
        raw = json.loads(results_path.read_text())
        return write_report(raw["quality"], raw["memory"], raw["throughput"], args, raw["wall_s"], raw["command"])
    t0 = time.perf_counter()
    memory = run_memory([r for r in args.mem_rows.split(",") if r in rows], args, common) if "memory" in parts else {}
    quality = run_quality(rows, args, common) if "quality" in parts else {}
    throughput = run_throughput(args, common) if "throughput" in parts else {}
    wall = time.perf_counter() - t0
    raw = {"memory": memory, "quality": quality, "throughput": throughput, "wall_s": wall, "command": command.strip()}
    results_path.write_text(json.dumps(raw, indent=1, default=str))
    return write_report(quality, memory, throughput, args, wall, command.strip())


def write_report(quality, memory, throughput, args, wall, command) -> int:
    text, ratios = report(quality, memory, throughput, args, wall, command)
    plots(quality, memory, Path(args.plots))
    lines = ["## Targets", "", "| measure | target | this run | met |", "|---|---|---|---|"]
    print("\ntarget ratios:")
    for key, (what, op, target) in TARGETS.items():
        if key not in ratios or ratios[key] is None:
            continue
        v = ratios[key]
        ok = v <= target if op == "<=" else v >= target
        shown = f"{v:.2%}" if key.startswith("planner") else f"{v:.3f}x"
        print(f"  {what}: {shown} (target {op} {target}) {'MET' if ok else 'MISSED'}")
        lines.append(f"| {what} | {op} {target} | {shown} | {'yes' if ok else '**no**'} |")
    text = text.replace("## Memory", "\n".join(lines) + "\n\n## Memory", 1) if memory else text + "\n".join(lines) + "\n"
    if args.notes and Path(args.notes).is_file():
        text += "\n" + Path(args.notes).read_text()
    Path(args.out).write_text(text)
    log(f"wrote {args.out} and plots in {args.plots} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
