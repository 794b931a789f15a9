"""How a run stops before its end on purpose: SIGTERM (preemption) and Ctrl-C, with their exit codes.

* **SIGTERM** is what cluster schedulers (and ``torchrun``, when it is itself
  SIGTERMed) send before they kill a job. Before the process group exists it
  ends the process at once (nothing to save): exit 5 during data preparation,
  the kernel's default action while the process group starts (``sigterm_kills``).
  Afterwards the handler only sets
  a flag; the next training step all-reduces it together with its loss (so
  ranks that got the signal at slightly different moments, or not at all,
  agree on one step, at no extra host-device sync), saves a checkpoint of
  that step at its end and leaves with ``EXIT_PREEMPTED``.
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where a step needs it: train.py imports this module before deciding to train
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


def sigterm_kills() -> None:
    """While the process group starts, SIGTERM kills at once (the kernel's default action; nothing to save).

    A rank waits there for its peers inside C++ (the rendezvous store), where a
    Python signal handler never runs: when rank 0 refuses a bad input (a locked
    or foreign output folder, ...) and exits 2, torchrun SIGTERMs the waiting
    ranks, and with the handler installed they would linger until torchrun's
    SIGKILL 30 s later."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def defer_sigterm() -> None:
    """From now on SIGTERM waits for the next step boundary (the trainer calls ``stop_requested``)."""
    _state["deferred"] = True
    signal.signal(signal.SIGTERM, _on_sigterm)


def sigterm_flag() -> float:
    """1.0 if this rank got SIGTERM, else 0.0 (no communication). The trainer all-reduces it with the
    step's loss, so the ranks agree on the step to stop at without a second host-device sync."""
    return 1.0 if _state["sigterm_at"] else 0.0


def stop_requested(device: torch.device) -> bool:
    """True on every rank if any rank got SIGTERM (one all-reduce of a flag: all ranks take the same branch)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if _state["sigterm_at"] else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _on_sigint(signum, frame) -> None:
    if _state.get("sigint"):  # a second SIGINT must not interrupt the clean exit of the first
        return
    _state["sigint"] = True
    raise KeyboardInterrupt


def install_sigint_once() -> None:
    """Ctrl-C raises KeyboardInterrupt once; later SIGINTs are ignored. A terminal's Ctrl-C reaches
    torchrun, which sends its own SIGINT to every worker too; a second KeyboardInterrupt landing
    in the first one's exit path would end in a traceback instead of the one line."""
    signal.signal(signal.SIGINT, _on_sigint)


def reports_interrupt(rank: int, watchdog, wait_s: float = 2.0) -> bool:
    """Whether this rank prints the Ctrl-C line: rank 0 always; another rank unless rank 0 says within
    ``wait_s`` that it was interrupted too (a Ctrl-C that reached every rank gets one line, not one
    per rank). A rank interrupted alone still speaks, since its peers only see it leave."""
    if rank == 0 or watchdog is None:
        return True
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if (watchdog.failure() or "").startswith(f"rank {rank} failed:"):
            return True  # a peer already left naming this rank: it was interrupted alone, and says so now
        status = watchdog.peer_status(0) or ""
        if status.startswith("failed:interrupted"):
            return False
        if status.startswith("failed:") or status == "done":
            return True
        time.sleep(0.05)
    return True


def interrupted_message(rank: int, exc: BaseException, position: tuple[int, str, int] | None, run_dir: Path) -> str:
    """The one line a Ctrl-C (or SystemExit) prints instead of a traceback."""
    from steptitan.checkpoint import newest_intact

    cause = "Ctrl-C / SIGINT" if isinstance(exc, KeyboardInterrupt) else f"SystemExit({exc.code!r})"
    where = f"during stage {position[0]} ({position[1]}), step {position[2]}" if position else "before the first step"
    newest = newest_intact(run_dir / "checkpoints")
    resume = (f"newest checkpoint: {newest.path}; run the same command to resume from it" if newest is not None
              else "no checkpoint was written yet")
    return f"steptitan: interrupted ({cause}) on rank {rank} {where}; {resume}"

