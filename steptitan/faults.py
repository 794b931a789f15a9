"""Observation and fault-injection hooks for the reliability tests (docs/reliability.md).

All hooks are off unless their environment variable is set, so a normal run
pays one dict lookup per step. They exist so tests can kill *real* rank
processes at exactly chosen moments and compare loss trajectories bit for bit:

``STEPTITAN_LOSS_LOG=FILE``
    rank 0 appends one JSON line per optimizer step:
    ``{"stage", "step", "global_step", "loss", "skipped"}``; ``loss`` is the
    all-reduced float, written with ``repr`` precision (JSON floats round-trip
    exactly), so two runs can be compared for bit-exact equality.
``STEPTITAN_PID_DIR=DIR``
    every rank writes ``DIR/rank<r>.pid`` when training starts, so a test can
    ``os.kill`` one rank.
``STEPTITAN_PAUSE_AT=POINT:STAGE:STEP``
    every rank writes ``DIR/paused-rank<r>`` (DIR = ``STEPTITAN_PID_DIR``) and
    sleeps forever at that point, waiting to be killed. Points:
    ``step``  after step STEP of stage STAGE is done (and its checkpoint saved, if any);
    ``save``  inside the checkpoint save of (STAGE, STEP), after every shard is
              written and before the completion mark (meta.json) and the rename.
``STEPTITAN_PAUSE_AT=tokenizer:0:0``
    the process preparing data parks while it holds the cache entry's lock,
    just before training the tokenizer (a second process must wait for it).
``STEPTITAN_PIECE_LOG=FILE``
    data preparation appends ``pieces-<split>-<chars>/NNNNNN.bin`` for every piece it tokenizes
    (steptitan/pieces.py), so a test can check that a resume re-tokenized nothing that was finished.
``STEPTITAN_STEP_DELAY=SECONDS``
    every rank sleeps this long after each step (a test can then signal a run mid-stage).
``STEPTITAN_EXIT_AT=STAGE:STEP:RANK``
    that rank calls ``sys.exit(0)`` after that step (a plugin's stray ``exit``).
``STEPTITAN_INJECT_NAN=STAGE:STEP[,STAGE:STEP...]``
    rank 0's loss at those steps is multiplied by NaN before backward, so the
    NaN reaches the all-reduced loss and the gradients like a real blow-up.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _pairs(value: str) -> set[tuple[int, int]]:
    out = set()
    for item in value.split(","):
        if item.strip():
            stage, step = item.strip().split(":")
            out.add((int(stage), int(step)))
    return out


def inject_nan(stage: int, step: int, rank: int) -> bool:
    """True if the loss of (stage, step) must be poisoned on this rank."""
    value = os.environ.get("STEPTITAN_INJECT_NAN")
    return bool(value) and rank == 0 and (stage, step) in _pairs(value)


def pause_point(point: str, stage: int, step: int, rank: int) -> None:
    """Block forever here if ``STEPTITAN_PAUSE_AT`` names this point (the test then kills us)."""
    value = os.environ.get("STEPTITAN_PAUSE_AT")
    if not value:
        return
    name, _, where = value.partition(":")
    if name != point or (stage, step) not in _pairs(where):
        return
    marker_dir = Path(os.environ.get("STEPTITAN_PID_DIR", "."))
    marker_dir.mkdir(parents=True, exist_ok=True)
    (marker_dir / f"paused-rank{rank}").write_text(str(os.getpid()))
    while True:  # noqa: ASYNC110 - deliberately wait to be killed
        time.sleep(0.05)


def write_pid(rank: int) -> None:
    pid_dir = os.environ.get("STEPTITAN_PID_DIR")
    if pid_dir:
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"rank{rank}.pid").write_text(str(os.getpid()))


def log_loss(stage: int, step: int, global_step: int, loss: float, skipped: bool, rank: int) -> None:
    path = os.environ.get("STEPTITAN_LOSS_LOG")
    if path and rank == 0:
        with open(path, "a") as fh:
            fh.write(json.dumps({"stage": stage, "step": step, "global_step": global_step,
                                 "loss": loss, "skipped": skipped}) + "\n")


def step_boundary(stage: int, step: int, rank: int) -> None:
    """STEPTITAN_STEP_DELAY and STEPTITAN_EXIT_AT, called after every step."""
    delay = os.environ.get("STEPTITAN_STEP_DELAY")
    if delay:
        time.sleep(float(delay))
    where = os.environ.get("STEPTITAN_EXIT_AT")
    if where:
        s, n, r = (int(x) for x in where.split(":"))
        if (s, n, r) == (stage, step, rank):
            sys.exit(0)
