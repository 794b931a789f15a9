"""Paired comparison of two arms of a seeded sweep: per-arm mean and sd, per-seed differences, a plot.

    steptitan paired RUNS/apex_vs_lora_cpt apex lora --plot docs/bench/apex_vs_lora_cpt.png

Reads every ``<out>/<label>,seed=<s>/summary.json`` of the two labels (runs made by ``steptitan
sweep``), pairs the runs by seed (same seed = same stage 0, same data order) and prints, as a
Markdown table: per arm the mean and sample sd over seeds of the final val loss, of each stage's end
val loss and the trainable parameters of the last stage; then the paired difference (A - B) per
seed, its mean and sd, and the verdict: "no difference" when |mean difference| is smaller than its
sd, else which arm is lower. ``--plot`` draws the validation loss against training tokens (every
evaluation line of the run's last attempt in ``_logs/<run>.log``), mean over seeds, with a min-max band.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Sequence

from steptitan.experiments.report import _pyplot, _save, read_summary
from steptitan.experiments.stats import mean_sd

VAL_LINE = re.compile(r"^\[stage (\d+)\] step (\d+): val loss ([0-9.]+)")


def runs_of(out: Path, label: str) -> dict[int, Path]:
    """{seed: run folder} of the finished runs of one label."""
    found = {int(d.name.split("seed=")[1]): d for d in out.glob(f"{label},seed=*") if (d / "summary.json").is_file()}
    return dict(sorted(found.items()))


def step_tokens(run: Path) -> int:
    recipe = json.loads((run / "recipe.json").read_text())["training"]
    world = read_summary(run)["world_size"]
    return recipe["batch_size"] * recipe.get("seq_len", 128) * recipe.get("grad_accum", 1) * world


def val_curve(out: Path, run: Path) -> list[tuple[int, float]]:
    """(training tokens so far, val loss) of every evaluation of the run's last attempt."""
    offsets, total = [], 0
    for stage in read_summary(run)["stages"]:
        offsets.append(total)
        total += stage["steps"]
    text = (out / "_logs" / f"{run.name}.log").read_text().split("=====")[-1]  # the last attempt
    tokens = step_tokens(run)
    return [((offsets[int(m[1])] + int(m[2])) * tokens, float(m[3]))
            for m in (VAL_LINE.match(line) for line in text.splitlines()) if m]


def _mean_sd_text(xs: Sequence[float]) -> str:
    mean, sd = mean_sd(xs)
    return f"{mean:.4f} ± {sd or 0.0:.4f}"


def paired_table(out: Path, a: str, b: str) -> tuple[list[str], list[int]]:
    """The report's lines, and the seeds both arms have."""
    ra, rb = runs_of(out, a), runs_of(out, b)
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        raise SystemExit(f"no finished pair of {a!r} and {b!r} runs in {out}")
    sums = {arm: {s: read_summary(runs[s]) for s in seeds} for arm, runs in ((a, ra), (b, rb))}
    n_stages = len(sums[a][seeds[0]]["stages"])
    lines = [f"seeds {seeds}", "",
             "| arm | final val loss (mean ± sd) | " + " | ".join(f"stage {k} end val" for k in range(n_stages))
             + " | last-stage trainable params | per seed final val loss |",
             "|---|---:|" + "---:|" * n_stages + "---:|---|"]
    for arm in (a, b):
        final = [sums[arm][s]["final_val_loss"] for s in seeds]
        stages = [_mean_sd_text([sums[arm][s]["stages"][k]["val_loss"] for s in seeds]) for k in range(n_stages)]
        trainable = sorted({sums[arm][s]["stages"][-1]["trainable_params"] for s in seeds})
        lines.append(f"| {arm} | {_mean_sd_text(final)} | " + " | ".join(stages) + " | "
                     + ", ".join(f"{t:,}" for t in trainable) + " | " + ", ".join(f"{x:.4f}" for x in final) + " |")
    diffs = [sums[a][s]["final_val_loss"] - sums[b][s]["final_val_loss"] for s in seeds]
    mean, sd = mean_sd(diffs)
    sd = sd or 0.0
    verdict = "no difference" if abs(mean) < sd else f"{a if mean < 0 else b} lower"
    lines += ["", f"paired difference {a} - {b} (final val loss), per seed: " + ", ".join(f"{d:+.4f}" for d in diffs)
              + f"; mean {mean:+.4f}, sd {sd:.4f} -> {verdict}"]
    return lines, seeds


def plot(out: Path, a: str, b: str, seeds: list[int], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ra, rb = runs_of(out, a), runs_of(out, b)
    tails = []
    for arm, runs, color in ((a, ra, "tab:red"), (b, rb, "tab:blue")):
        curves = [val_curve(out, runs[s]) for s in seeds]
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        ys = [[c[i][1] for c in curves] for i in range(n)]
        ax.plot(xs, [mean_sd(y)[0] for y in ys], "o-", ms=3, color=color, label=f"{arm} (mean of {len(seeds)} seeds)")
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2)
        tails += [v for c in curves for _, v in c[len(c) // 2:]]
    first = ra[seeds[0]]
    ax.axvline(read_summary(first)["stages"][0]["steps"] * step_tokens(first), color="grey", ls=":", lw=1)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{out.name}: {a} vs {b} (band: min-max over seeds)")
    ax.legend()
    ax.set_ylim(min(tails) - 0.05, max(tails) + 0.1)  # zoom on the stage after the boundary
    return _save(fig, path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="steptitan paired", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the sweep's output folder")
    ap.add_argument("a", help="label of arm A")
    ap.add_argument("b", help="label of arm B")
    ap.add_argument("--plot", type=Path, help="write val loss vs tokens here (PNG)")
    args = ap.parse_args(argv)
    lines, seeds = paired_table(args.out, args.a, args.b)
    print("\n".join(lines))
    if args.plot:
        print(f"wrote {plot(args.out, args.a, args.b, seeds, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
