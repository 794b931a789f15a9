"""``steptitan eval RUN_OR_CHECKPOINT --tasks T1,T2``: downstream tasks through EleutherAI's lm-evaluation-harness.

The checkpoint (a run folder's newest, or a given one) is exported as a merged
dense Hugging Face Llama folder into a temporary directory (steptitan/export.py:
PEFT adapters merged, tokenizer copied) and evaluated by lm-eval's ``HFLM`` on
the CPU (or CUDA when there is one). The scores go to
``<run>/eval/<tasks>.json`` and, as scalars ``eval/<task>/<metric>``, to the
trackers the run's recipe turned on (steptitan/trackers.py: ``log_eval_scores``).

Offline: the harness's own tasks (hellaswag, arc_easy, lambada_openai, piqa)
download their datasets from the hub; the repository's ``evaltasks/`` folder
(``kjv_cloze``, ``kjv_choice``) needs no network, and the export is a local folder,
so ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` works. That folder installs as the
package ``steptitan.evaltasks`` and is always on lm-eval's task path;
``--include-path DIR`` adds more task YAMLs (the checkout's ``evaltasks`` is the same folder).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import importlib.util
import json
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Sequence

BUNDLED_TASKS = "steptitan.evaltasks"  # the top-level evaltasks/ folder, installed as package data


class EvalError(ValueError):
    """Bad input for ``steptitan eval`` (the message says why); exit code 2."""


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder holding a checkpoint (``<run>/checkpoints/stageNN-stepNNNNNN``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def bundled_tasks() -> Path | None:
    """The folder of the offline tasks, from the installed package (a wheel's site-packages, or the
    checkout's evaltasks/ through an editable install); None when steptitan.evaltasks is not installed
    (an editable install older than that package: re-run ``pip install -e .``)."""
    try:
        folder = importlib.resources.files(BUNDLED_TASKS)
    except ModuleNotFoundError:
        return None
    # lm-eval reads task folders from the file system: a zip-imported steptitan is not supported
    return Path(str(folder)) if Path(str(folder)).is_dir() else None


def task_paths(include_path: str | None) -> list[str]:
    """lm-eval's extra task folders: the bundled offline tasks, then ``include_path`` (a later folder's
    task overrides an earlier one of the same name), each folder once (the checkout's evaltasks/ is
    the bundled folder in an editable install)."""
    paths = [p for p in (bundled_tasks(), Path(include_path) if include_path else None) if p is not None]
    return [str(p) for i, p in enumerate(paths) if p.resolve() not in {q.resolve() for q in paths[:i]}]


def task_manager(include_path: str | None):
    """lm-eval's TaskManager: its own tasks and those of ``task_paths``."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_paths(include_path))


def check_tasks(manager: Any, tasks: list[str]) -> None:
    """EvalError naming each task lm-eval does not know, with the nearest known names."""
    known = manager.all_tasks
    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return
    hints = []
    for t in unknown:
        near = difflib.get_close_matches(t, known, n=3)
        hints.append(f"{t!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    where = "" if bundled_tasks() is not None else \
        f"; the offline tasks need the package {BUNDLED_TASKS}: re-run pip install -e ."
    raise EvalError(f"unknown lm-eval task(s): {', '.join(hints)}; `lm-eval ls tasks` lists them, "
                    f"--include-path DIR adds a folder of task YAMLs{where}")


def evaluate_folder(hf_dir: Path, tasks: list[str], manager: Any, limit: int | None,
                    batch_size: int, device: str, max_length: int | None = None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` with ``HFLM`` on a local HF folder (model and tokenizer);
    ``manager`` from ``task_manager``.

    ``max_length``: HFLM left-truncates context + continuation to it; None = config.json's
    max_position_embeddings, which for llama3 rope scaling is the scaled context, far beyond
    the sequence length a steptitan run trained at."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(hf_dir), tokenizer=str(hf_dir), batch_size=batch_size, device=device,
              dtype="float32", trust_remote_code=False, add_bos_token=False,
              max_length=max_length)  # steptitan trains without BOS
    try:
        return simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False,
                               bootstrap_iters=0)
    except AssertionError as exc:  # HFLM asserts that every continuation fits max_length, without a message
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        if "continuation" not in (frame.line or ""):
            raise
        raise EvalError(f"a continuation of {', '.join(tasks)} is longer than the {lm.max_length}-token context "
                        f"(the sequence length the model was trained at); lm-eval cannot score it. Pass "
                        f"--max-length N to evaluate with a longer context than trained, or evaluate a model "
                        f"trained with a longer training.seq_len") from None


def scalars(results: dict[str, Any]) -> dict[str, float]:
    """``{"task/metric": value}`` of every score, without stderrs and counts (lm-eval names them ``metric,filter``)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name \
                    and name != "sample_len":  # lm-eval's example count, in n_samples
                out[f"{task}/{name}"] = float(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="steptitan eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. kjv_cloze,kjv_choice")
    p.add_argument("--include-path", help="a folder of extra lm-eval task YAMLs (the offline kjv_cloze and "
                                          "kjv_choice are always there)")
    p.add_argument("--limit", type=int, help="at most this many examples per task (quick checks)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", help="where to write the scores (default: <run>/eval/<tasks>.json)")
    p.add_argument("--max-length", type=int, default=None,
                   help="context tokens given to lm-eval (default: the sequence length the run trained at; longer "
                        "contexts are left-truncated, and a continuation must fit)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if _has_cuda() else "cpu")  # torch only now: --help does not import it
    from steptitan.export import ExportError, export, find_checkpoint, recipe_for
    from steptitan.recipe import RecipeError
    from steptitan.trackers import TrackerError, log_eval_scores

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if not tasks:
            raise EvalError("--tasks names no task")
        if args.limit is not None and args.limit < 1 or args.batch_size < 1 or \
                args.max_length is not None and args.max_length < 1:
            raise EvalError("--limit, --batch-size and --max-length must be >= 1")
        if args.include_path and not Path(args.include_path).is_dir():
            raise EvalError(f"--include-path {args.include_path!r} is not a folder")
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise EvalError("steptitan eval needs lm-evaluation-harness: pip install 'steptitan[eval]'") from None
        info = find_checkpoint(args.checkpoint)
        recipe = recipe_for(info)
        if recipe.metrics.wandb and importlib.util.find_spec("wandb") is None:
            raise EvalError(f"{run_folder_of(info.path)} logs to W&B (metrics.wandb = true) and the wandb "
                            f"package is not installed: pip install 'steptitan[wandb]'")
        manager = task_manager(args.include_path)
        check_tasks(manager, tasks)  # before the export, which takes a while for a large model
        with tempfile.TemporaryDirectory(prefix="steptitan-eval-") as tmp:
            hf_dir = export(info.path, tmp)
            if not (hf_dir / "tokenizer.json").is_file():
                raise EvalError(f"the tokenizer of {info.path} was not found (data.tokenizer or the cached BPE); "
                                f"lm-eval needs it")
            trained = json.loads((hf_dir / "steptitan_export.json").read_text())["trained_seq_len"]
            max_length = args.max_length or trained
            results = evaluate_folder(hf_dir, tasks, manager, args.limit, args.batch_size, args.device,
                                      max_length=max_length)
    except (EvalError, ExportError, RecipeError, FileNotFoundError) as exc:
        print(f"steptitan eval: error: {exc}", file=sys.stderr)
        return 2
    run_dir = run_folder_of(info.path)
    out = Path(args.out) if args.out else run_dir / "eval" / f"{re.sub(r'[^A-Za-z0-9_.,-]', '_', ','.join(tasks))}.json"
    values = scalars(results)
    step = int(info.meta.get("global_step") or info.step)
    record = {"checkpoint": str(info.path.resolve()), "stage": info.stage, "step": info.step,
              "global_step": info.meta.get("global_step"), "tasks": tasks, "limit": args.limit,
              "max_length": max_length, "trained_seq_len": trained,
              "scores": values, "results": results.get("results", {}), "n_samples": results.get("n-samples", {}),
              "versions": results.get("versions", {}), "lm_eval": _version()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    for name, value in values.items():
        print(f"{name:<40} {value:.4f}")
    print(f"wrote {out}")
    about = {k: record[k] for k in ("checkpoint", "stage", "step", "global_step", "tasks", "limit", "max_length")}
    try:
        for where in log_eval_scores(recipe, run_dir, step, values, about):
            print(f"logged to {where}")
    except TrackerError as exc:
        print(f"steptitan eval: error: the scores are in {out}, but {exc}", file=sys.stderr)
        return 2
    return 0


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
