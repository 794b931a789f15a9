#!/usr/bin/env python
"""Paired comparison of two arms of a seeded sweep (docs/bench/issue14.md).

    python tools/paired_seeds.py /work/benchruns/issue14_apex apex lora --plot docs/bench/issue14_apex.png

Reads every ``<out>/<label>,seed=<s>/summary.json`` of the two labels (runs made by tools/sweep.py),
pairs the runs by seed (same seed = same stage 0, same data order) and prints, as a Markdown table:
per arm the mean and sample sd over seeds of the final val loss, of each stage's end val loss and
the trainable parameters of the last stage; then the paired difference (A - B) per seed, its mean and
sd, and the verdict: "no difference" when |mean difference| is smaller than its sd (the brief's rule),
else which arm is lower. ``--plot`` draws the validation loss against training tokens (every
``training.eval_interval`` evaluation in ``_logs/<run>.log``), mean over seeds, with a min-max band.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

VAL_LINE = re.compile(r"^\[stage (\d+)\] step (\d+): val loss ([0-9.]+)")


def runs_of(out: Path, label: str) -> dict[int, Path]:
    found = {}
    for d in out.glob(f"{label},seed=*"):
        if (d / "summary.json").exists():
            found[int(d.name.split("seed=")[1])] = d
    return dict(sorted(found.items()))


def val_curve(out: Path, run: Path) -> list[tuple[int, float]]:
    """(training tokens so far, val loss) of every evaluation of the run's last attempt."""
    recipe = json.loads((run / "recipe.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    t = recipe["training"]
    step_tokens = t["batch_size"] * t.get("seq_len", 128) * t.get("grad_accum", 1) * summary["world_size"]
    offsets, total = [], 0
    for stage in summary["stages"]:
        offsets.append(total)
        total += stage["steps"]
    text = (out / "_logs" / f"{run.name}.log").read_text().split("=====")[-1]  # the last attempt
    return [((offsets[int(m[1])] + int(m[2])) * step_tokens, float(m[3]))
            for m in (VAL_LINE.match(line) for line in text.splitlines()) if m]


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the sweep's output folder")
    ap.add_argument("a", help="label of arm A")
    ap.add_argument("b", help="label of arm B")
    ap.add_argument("--plot", type=Path, help="write val loss vs tokens here (PNG)")
    args = ap.parse_args(argv)
    ra, rb = runs_of(args.out, args.a), runs_of(args.out, args.b)
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        raise SystemExit(f"no finished pair of {args.a!r} and {args.b!r} runs in {args.out}")
    sums = {arm: {s: json.loads((runs[s] / "summary.json").read_text()) for s in seeds}
            for arm, runs in ((args.a, ra), (args.b, rb))}
    n_stages = len(next(iter(sums[args.a].values()))["stages"])
    print(f"seeds {seeds}\n")
    print("| arm | final val loss (mean ± sd) | " + " | ".join(f"stage {k} end val" for k in range(n_stages))
          + " | last-stage trainable params | per seed final val loss |")
    print("|---|---:|" + "---:|" * n_stages + "---:|---|")
    for arm in (args.a, args.b):
        final = [sums[arm][s]["final_val_loss"] for s in seeds]
        stages = [mean_sd([sums[arm][s]["stages"][k]["val_loss"] for s in seeds]) for k in range(n_stages)]
        trainable = sorted({sums[arm][s]["stages"][-1]["trainable_params"] for s in seeds})
        print(f"| {arm} | {mean_sd(final)} | " + " | ".join(stages) + f" | {', '.join(f'{t:,}' for t in trainable)} | "
              + ", ".join(f"{x:.4f}" for x in final) + " |")
    diffs = [sums[args.a][s]["final_val_loss"] - sums[args.b][s]["final_val_loss"] for s in seeds]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    verdict = ("no difference" if abs(mean) < sd else f"{args.a if mean < 0 else args.b} lower")
    print(f"\npaired difference {args.a} - {args.b} (final val loss), per seed: "
          + ", ".join(f"{d:+.4f}" for d in diffs) + f"; mean {mean:+.4f}, sd {sd:.4f} -> {verdict}")
    if args.plot:
        plot(args, seeds, ra, rb)
    return 0


def plot(args: argparse.Namespace, seeds: list[int], ra: dict[int, Path], rb: dict[int, Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arm, runs, color in ((args.a, ra, "tab:red"), (args.b, rb, "tab:blue")):
        curves = [val_curve(args.out, runs[s]) for s in seeds]
        n = min(len(c) for c in curves)
        xs = [curves[0][i][0] for i in range(n)]
        ys = [[c[i][1] for c in curves] for i in range(n)]
        ax.plot(xs, [statistics.mean(y) for y in ys], "o-", ms=3, color=color, label=f"{arm} (mean of {len(seeds)} seeds)")
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2)
    summary = json.loads((ra[seeds[0]] / "summary.json").read_text())
    recipe = json.loads((ra[seeds[0]] / "recipe.json").read_text())["training"]
    boundary = summary["stages"][0]["steps"] * recipe["batch_size"] * recipe.get("seq_len", 128) * summary["world_size"]
    ax.axvline(boundary, color="grey", ls=":", lw=1)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{args.out.name}: {args.a} vs {args.b} (band: min-max over seeds)")
    ax.legend()
    tail = [v for arm in (ra, rb) for s in seeds for _, v in val_curve(args.out, arm[s])[len(val_curve(args.out, arm[s])) // 2:]]
    ax.set_ylim(min(tail) - 0.05, max(tail) + 0.1)  # zoom on the stage after the boundary
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    raise SystemExit(main())
