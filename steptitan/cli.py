"""The ``steptitan`` console script: ``steptitan train ...``, ``steptitan list-plugins``."""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

USAGE = """usage: steptitan <command> [args]

commands:
  train RECIPE.toml [key=value ...] [--dry-run]   run a recipe (one process; --nproc-per-node N: N ranks, torchrun in-process)
  list-plugins                                    list growth operators, PEFT methods and optimizers with their options
  prepare RECIPE.toml [key=value ...] [--workers N]  tokenize the corpus into the data cache ahead of training (resumable)
  plan [--dim D --layers L -K 3 --peft lora ...]  best STEP stage splits by peak memory; --write-recipe; --budget
  sweep SWEEP.toml [--list --check --report-only]  run a sweep of recipes, resumably (docs/sweeps.md)
  bench [--recipes a,b --seeds N --budget-tokens N] the equal-FLOP benchmark over seeds (docs/benchmark.md)
  paired SWEEP_OUT LABEL_A LABEL_B [--plot F]      two arms of a seeded sweep compared seed by seed
  export CHECKPOINT_OR_RUN OUT_DIR                 a checkpoint as a Hugging Face Llama folder
  eval CHECKPOINT_OR_RUN --tasks T1,T2             lm-evaluation-harness tasks on a checkpoint (offline: kjv_cloze,kjv_choice)
  generate CHECKPOINT_OR_RUN --prompt TEXT         sample text from a checkpoint (CPU, one process, no export)
"""


def list_plugins() -> str:
    from steptitan.registry import GROWTH, OPTIM, PEFT

    lines = []
    for title, registry in (("growth operators", GROWTH), ("PEFT methods", PEFT), ("optimizers", OPTIM)):
        lines.append(f"{title}:")
        for name in registry.names():
            cls = registry.get(name)
            # built-ins live in steptitan.registry; anything else came through the entry-point group
            origin = cls.__module__ if cls.__module__.startswith("steptitan.registry") else f"external: {cls.__module__}"
            extra = f" (pip extra: {cls.requires})" if getattr(cls, "requires", None) else ""
            lines.append(f"  {name:<18} {getattr(cls, 'description', '')}{extra}  [{origin}]")
            for f in dataclasses.fields(cls.Options):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                lines.append(f"      {f.name} = {default!r}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from steptitan.launch import launch, split_nproc
        from steptitan.train import main as train_main, parse_args, refuse_early

        try:
            nproc, rest = split_nproc(rest)
        except ValueError as exc:
            print(f"steptitan train: error: {exc}", file=sys.stderr)
            return 2
        if nproc is not None:
            # A finished run, a locked folder or an unreadable recipe: said here, before torchrun and its ranks start.
            refused = refuse_early(parse_args(rest), rank=0)
            if refused is not None:
                return refused
            launch(nproc, rest)  # does not return
        return train_main(rest)
    if command == "prepare":
        from steptitan.prepare import main as prepare_main

        return prepare_main(rest)
    if command == "plan":
        from steptitan.planner_cli import plan_cli

        return plan_cli(rest)
    if command == "sweep":
        from steptitan.experiments.sweep import main as sweep_main

        return sweep_main(rest)
    if command == "bench":
        from steptitan.experiments.bench import main as bench_main

        return bench_main(rest)
    if command == "paired":
        from steptitan.experiments.paired import main as paired_main

        return paired_main(rest)
    if command == "eval":
        from steptitan.lmeval import main as eval_main

        return eval_main(rest)
    if command == "generate":
        from steptitan.generate import main as generate_main

        return generate_main(rest)
    if command == "export":
        from steptitan.export_cli import main as export_main

        return export_main(rest)
    if command == "list-plugins":
        print(list_plugins())
        return 0
    print(f"steptitan: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
