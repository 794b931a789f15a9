"""Experiment trackers: TensorBoard and Weights & Biases, through torchtitan's own loggers.

Rank 0 writes; on other ranks every call is a no-op. What goes in (README, "Read the logs"):

* scalars at every log step and evaluation (loss, lr, tokens_seen, memory/..., val/...);
* the resolved recipe, once: TensorBoard text ``recipe`` (JSON) plus an hparams entry of its
  flattened keys (``training.lr``, ``stages.1.peft.rank``); W&B run config;
* text samples at stage ends (``metrics.sample_prompts``): TensorBoard text ``samples/stage<i>``,
  a W&B table ``samples/stage<i>``;
* end-of-run values (wall time, tokens seen, final val loss): the W&B run summary (they are
  in summary.json too);
* later, the downstream scores of ``steptitan eval`` (``log_eval_scores``): ``eval/<task>/<metric>``.

W&B: ``torchtitan.components.metrics.WandBLogger`` reads project / name / entity / run id from
environment variables; the recipe's ``metrics.wandb_*`` keys are put there for its ``wandb.init``.
The run id is kept in ``<output_dir>/wandb/run_id``, so a resumed run (after a crash or Ctrl-C)
continues the same W&B run (``WANDB_RESUME=allow``); W&B drops points of steps it already has
(those between the newest checkpoint and the interruption), with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import string
from pathlib import Path
from typing import Any, Iterator

from steptitan.recipe import Recipe, to_dict


class TrackerError(RuntimeError):
    """A tracker could not start (W&B not installed, not logged in, ...); the message says what to do."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"training": {"lr": 1e-3}, "stages": [{"steps": 5}]}`` -> ``{"training.lr": 1e-3, "stages.0.steps": 5}``;
    leaves are bool/int/float/str (None and empty containers become strings), what TensorBoard's hparams accept."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, (list, tuple)) and tree and any(isinstance(v, (dict, list)) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    value = tree if isinstance(tree, (bool, int, float, str)) else json.dumps(tree)
    return {prefix: value}


@contextlib.contextmanager
def _env(values: dict[str, str | None]) -> Iterator[None]:
    """Set environment variables (None = leave as is) for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _RecipeConfig:
    """What torchtitan's WandBLogger wants from a JobConfig: ``to_dict()`` (the W&B run config)."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        return self.data


def _new_wandb_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id alphabet


def wandb_run_id(folder: Path) -> str:
    """The W&B run id of this output folder: created at the first launch, reused on resume."""
    path = folder / "run_id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    run_id = _new_wandb_id()
    path.write_text(run_id + "\n")
    return run_id


def wandb_run_name(recipe: Recipe) -> str:
    return recipe.metrics.wandb_name or os.environ.get("WANDB_RUN_NAME") or recipe.name


def start_trackers(recipe: Recipe, is_main: bool) -> Trackers:
    """Rank 0's trackers; every rank calls it. A tracker that fails to start (rank 0 only) raises
    ``TrackerError`` on every rank, so they all stop together with one message from rank 0."""
    from steptitan.distributed import all_gather_object

    trackers, error = None, None
    try:
        trackers = Trackers(recipe, enabled=is_main)
    except TrackerError as exc:
        error = str(exc)
    problems = [e for e in all_gather_object(error) if e]
    if problems:
        if trackers is not None:
            trackers.close()
        raise TrackerError(problems[0])
    return trackers  # type: ignore[return-value]


class Trackers:
    def __init__(self, recipe: Recipe, enabled: bool):
        self.tb = self.wandb = None
        if not enabled:
            return
        cfg, run_dir = recipe.metrics, recipe.run_dir
        resolved = to_dict(recipe)
        if cfg.tensorboard:
            from torchtitan.components.metrics import TensorBoardLogger

            (run_dir / "tb").mkdir(parents=True, exist_ok=True)
            self.tb = TensorBoardLogger(str(run_dir / "tb"))
            self._tb_recipe(resolved)
        if cfg.wandb:
            self.wandb = self._start_wandb(recipe, resolved)

    def _tb_recipe(self, resolved: dict[str, Any]) -> None:
        """The recipe as text (readable) and as hparams (comparable across runs in the HPARAMS tab)."""
        from torch.utils.tensorboard.summary import hparams

        writer = self.tb.writer  # type: ignore[union-attr]
        writer.add_text("recipe", "```json\n" + json.dumps(resolved, indent=1) + "\n```", 0)
        # hparams() written into this run's own event file (SummaryWriter.add_hparams would open a
        # sub-run); the metrics it names are the scalars this run logs anyway.
        for summary in hparams(flatten(resolved), {"val/loss": 0.0, "loss": 0.0}):
            writer.file_writer.add_summary(summary)

    @staticmethod
    def _start_wandb(recipe: Recipe, resolved: dict[str, Any], run_dir: Path | None = None,
                     env_overrides: dict[str, str] | None = None):
        """torchtitan's WandBLogger writing into ``run_dir`` (default: the recipe's output folder); by
        default on the run's own W&B run, ``env_overrides`` (WANDB_* variables) start another."""
        cfg = recipe.metrics
        run_dir = recipe.run_dir if run_dir is None else run_dir
        try:
            from torchtitan.components.metrics import WandBLogger

            folder = run_dir / "wandb"  # wandb.init(dir=run_dir) writes its files here
            env = {"WANDB_PROJECT": cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "steptitan",
                   "WANDB_RUN_NAME": wandb_run_name(recipe),
                   "WANDB_TEAM": cfg.wandb_entity,
                   "WANDB_RUN_ID": os.environ.get("WANDB_RUN_ID") or wandb_run_id(folder),
                   "WANDB_RESUME": os.environ.get("WANDB_RESUME") or "allow",
                   **(env_overrides or {})}
            with _env(env):
                return WandBLogger(str(run_dir), _RecipeConfig(resolved))
        except ImportError as exc:
            raise TrackerError(f"metrics.wandb = true needs the wandb package ({exc}): "
                               f"pip install 'steptitan[wandb]'") from None
        except Exception as exc:  # not logged in, no network, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TrackerError(f"metrics.wandb: W&B did not start: {first}; log in with `wandb login`, "
                               f"or set WANDB_MODE=offline (sync later with `wandb sync {run_dir / 'wandb'}`)"
                               ) from None

    # ------------------------------------------------------------------ logging

    def scalars(self, values: dict[str, float], step: int) -> None:
        for logger in (self.tb, self.wandb):
            if logger is not None:
                logger.log(values, step)

    def samples(self, stage: int, step: int, rows: list[tuple[str, str]]) -> None:
        """(prompt, completion) pairs sampled at the end of stage ``stage``; ``step`` = global step."""
        if self.tb is not None:
            text = "\n\n".join(f"**{prompt}**{completion}" for prompt, completion in rows)
            self.tb.writer.add_text(f"samples/stage{stage}", text, step)
        if self.wandb is not None:
            wandb = self.wandb.wandb
            table = wandb.Table(columns=["stage", "step", "prompt", "completion"],
                                data=[[stage, step, p, c] for p, c in rows])
            wandb.log({f"samples/stage{stage}": table}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """End-of-run values: W&B's run summary (TensorBoard has no such place; summary.json has them)."""
        if self.wandb is not None and self.wandb.wandb.run is not None:
            self.wandb.wandb.run.summary.update(values)

    def close(self) -> None:
        for logger in (self.tb, self.wandb):
            if logger is not None:
                logger.close()
        self.tb = self.wandb = None


def log_eval_scores(recipe: Recipe, run_dir: Path, global_step: int, values: dict[str, float],
                    about: dict[str, Any]) -> list[str]:
    """``steptitan eval``'s scores (``{"task/metric": value}``) as ``eval/<task>/<metric>`` into the
    trackers the run's recipe turned on; returns where they went. ``about``: what was evaluated
    (checkpoint, tasks, limit), W&B config.

    TensorBoard: ``<run>/tb/eval`` (its own event folder: a run "eval" beside the training scalars)
    at the checkpoint's global step. W&B: a run of its own (job type ``eval``, named
    ``<run name>-eval``, grouped under the training run's W&B id, the recipe and ``about`` as
    config), not the training run resumed: offline runs cannot be resumed, and ``wandb sync`` of a
    second offline run with the same id replaces the first one's history (wandb issues #3841, #5865).
    """
    written = []
    if recipe.metrics.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / "tb" / "eval"
        writer = SummaryWriter(str(folder))
        for name, value in values.items():
            writer.add_scalar(f"eval/{name}", value, global_step)
        writer.close()
        written.append(f"TensorBoard {folder}")
    if recipe.metrics.wandb:
        train_id = wandb_run_id(run_dir / "wandb")
        config = {**to_dict(recipe), "eval": {**about, "train_run_id": train_id}}
        env = {"WANDB_RUN_NAME": f"{wandb_run_name(recipe)}-eval", "WANDB_RUN_ID": _new_wandb_id(),
               "WANDB_RESUME": "never", "WANDB_RUN_JOB_TYPE": "eval", "WANDB_RUN_GROUP": train_id}
        logger = Trackers._start_wandb(recipe, config, run_dir, env)
        try:
            logger.log({f"eval/{k}": v for k, v in values.items()}, global_step)
            written.append(f"W&B run {logger.wandb.run.id} (group {train_id}, job type eval)")
        finally:
            logger.close()
    return written
