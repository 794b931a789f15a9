"""``steptitan eval RUN_OR_CHECKPOINT --tasks T1,T2``: downstream tasks through EleutherAI's lm-evaluation-harness.

The checkpoint (a run folder's newest, or a given one) is exported as a merged
dense Hugging Face Llama folder into a temporary directory (steptitan/export.py:
PEFT adapters merged, tokenizer copied) and evaluated by lm-eval's ``HFLM`` on
the CPU (or CUDA when there is one). The scores go to
``<run>/eval/<tasks>.json`` and, as scalars ``eval/<task>/<metric>`` at the
checkpoint's global step, to the run's TensorBoard folder.

Offline: the harness's own tasks (hellaswag, arc_easy, lambada_openai, piqa)
download their datasets from the hub; the repository's ``evaltasks/`` folder
(``--include-path evaltasks``: ``kjv_cloze``, ``kjv_choice``) needs no network, and
the export is a local folder, so ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` works.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

REPO_TASKS = Path(__file__).resolve().parents[1] / "evaltasks"


class EvalError(ValueError):
    """Bad input for ``steptitan eval`` (the message says why); exit code 2."""


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder holding a checkpoint (``<run>/checkpoints/stageNN-stepNNNNNN``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def evaluate_folder(hf_dir: Path, tasks: list[str], include_path: str | None, limit: int | None,
                    batch_size: int, device: str, max_length: int | None = None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` with ``HFLM`` on a local HF folder (model and tokenizer).

    ``max_length``: HFLM left-truncates context + continuation to it; None = config.json's
    max_position_embeddings, which for llama3 rope scaling is the scaled context, far beyond
    the sequence length a steptitan run trained at."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {', '.join(unknown)}"
                        + ("" if include_path else f" (the offline tasks need --include-path {REPO_TASKS.name})"))
    lm = HFLM(pretrained=str(hf_dir), tokenizer=str(hf_dir), batch_size=batch_size, device=device,
              dtype="float32", trust_remote_code=False, add_bos_token=False,
              max_length=max_length)  # steptitan trains without BOS
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False,
                           bootstrap_iters=0)


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


def log_to_tensorboard(run_dir: Path, step: int, values: dict[str, float]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    folder = run_dir / "tb" / "eval"
    writer = SummaryWriter(str(folder))
    for name, value in values.items():
        writer.add_scalar(f"eval/{name}", value, step)
    writer.close()
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="steptitan eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. kjv_cloze,kjv_choice")
    p.add_argument("--include-path", help=f"a folder of extra lm-eval task YAMLs (the offline ones: {REPO_TASKS.name}/)")
    p.add_argument("--limit", type=int, help="at most this many examples per task (quick checks)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", help="where to write the scores (default: <run>/eval/<tasks>.json)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if _has_cuda() else "cpu")  # torch only now: --help does not import it
    from steptitan.export import ExportError, export, find_checkpoint
    from steptitan.recipe import RecipeError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        if not tasks:
            raise EvalError("--tasks names no task")
        if args.limit is not None and args.limit < 1 or args.batch_size < 1:
            raise EvalError("--limit and --batch-size must be >= 1")
        if args.include_path and not Path(args.include_path).is_dir():
            raise EvalError(f"--include-path {args.include_path!r} is not a folder")
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise EvalError("steptitan eval needs lm-evaluation-harness: pip install 'steptitan[eval]'") from None
        info = find_checkpoint(args.checkpoint)
        with tempfile.TemporaryDirectory(prefix="steptitan-eval-") as tmp:
            hf_dir = export(info.path, tmp)
            if not (hf_dir / "tokenizer.json").is_file():
                raise EvalError(f"the tokenizer of {info.path} was not found (data.tokenizer or the cached BPE); "
                                f"lm-eval needs it")
            trained = json.loads((hf_dir / "steptitan_export.json").read_text())["trained_seq_len"]
            results = evaluate_folder(hf_dir, tasks, args.include_path, args.limit, args.batch_size, args.device,
                                      max_length=trained)
    except (EvalError, ExportError, RecipeError, FileNotFoundError) as exc:
        print(f"steptitan eval: error: {exc}", file=sys.stderr)
        return 2
    run_dir = run_folder_of(info.path)
    out = Path(args.out) if args.out else run_dir / "eval" / f"{re.sub(r'[^A-Za-z0-9_.,-]', '_', ','.join(tasks))}.json"
    values = scalars(results)
    record = {"checkpoint": str(info.path.resolve()), "stage": info.stage, "step": info.step,
              "global_step": info.meta.get("global_step"), "tasks": tasks, "limit": args.limit,
              "max_length": trained,
              "scores": values, "results": results.get("results", {}), "n_samples": results.get("n-samples", {}),
              "versions": results.get("versions", {}), "lm_eval": _version()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    step = int(info.meta.get("global_step") or info.step)
    if (run_dir / "tb").is_dir() or args.out is None:
        log_to_tensorboard(run_dir, step, values)
    for name, value in values.items():
        print(f"{name:<40} {value:.4f}")
    print(f"wrote {out}")
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
