"""How a run stops before its end on purpose: SIGTERM (preemption) and Ctrl-C, with their exit codes.

* **SIGTERM** is what cluster schedulers (and ``torchrun``, when it is itself
  SIGTERMed) send before they kill a job. Before the process group exists it
  ends the process at once (nothing to save). Afterwards the handler only sets
  a flag; at the next step boundary every rank all-reduces it (so ranks that
  got the signal at slightly different moments, or not at all, agree on one
  step), saves a checkpoint of that step and leaves with ``EXIT_PREEMPTED``.
  torchrun gives its workers 30 s between its SIGTERM and its SIGKILL, so a
  step plus a save must fit in the scheduler's grace period.
* **Ctrl-C / SIGINT** (and a ``SystemExit`` raised inside training) stop the
  rank at once, without a save and without the shutdown barrier; the rank
  marks itself failed in the heartbeat store so its peers leave within one
  heartbeat interval (steptitan/watchdog.py). The rank prints one line: where
  it stopped and the newest checkpoint a re-run resumes from.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch

# Process exit codes beyond train.py's 0-4 (docs/reliability.md).
EXIT_PREEMPTED = 5  # SIGTERM: a checkpoint of the current step was saved; run the same command to resume
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT or SystemExit (128 + SIGINT, the shell convention); no save

_state = {"sigterm_at": 0.0, "deferred": False}


class Preempted(Exception):
    """SIGTERM was honoured: the checkpoint of this step is saved; the message says where."""


def _on_sigterm(signum, frame) -> None:
    _state["sigterm_at"] = _state["sigterm_at"] or time.monotonic()
    if not _state["deferred"]:  # nothing to save yet: leave now
        print("steptitan: preempted (SIGTERM) before training started; nothing to save", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)


def install_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def defer_sigterm() -> None:
    """From now on SIGTERM waits for the next step boundary (the trainer calls ``stop_requested``)."""
    _state["deferred"] = True


def stop_requested(device: torch.device) -> bool:
    """True on every rank if any rank got SIGTERM (one all-reduce of a flag: all ranks take the same branch)."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if _state["sigterm_at"] else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def interrupted_message(rank: int, exc: BaseException, position: tuple[int, str, int] | None, run_dir: Path) -> str:
    """The one line a Ctrl-C (or SystemExit) prints instead of a traceback."""
    from steptitan.checkpoint import newest_intact

    cause = "Ctrl-C / SIGINT" if isinstance(exc, KeyboardInterrupt) else f"SystemExit({exc.code!r})"
    where = f"during stage {position[0]} ({position[1]}), step {position[2]}" if position else "before the first step"
    newest = newest_intact(run_dir / "checkpoints")
    resume = (f"newest checkpoint: {newest.path}; run the same command to resume from it" if newest is not None
              else "no checkpoint was written yet")
    return f"steptitan: interrupted ({cause}) on rank {rank} {where}; {resume}"

