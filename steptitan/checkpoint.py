"""Stage-aware, crash-safe checkpoints with torch DCP.

Layout under ``<run>/checkpoints/``::

    stage01-step000040/      a complete checkpoint (has meta.json)
        .metadata, __0_0.distcp, ...   DCP shards (model, optimizer, LR schedule)
        extra-rank0.pt ...             per-rank RNG, trainer counters and PEFT state
        meta.json                      written last, by rank 0: the completion mark
    .tmp-stage01-step000040/  an unfinished save (ignored, removed by the next save)
    .old-stage01-step000040/  a checkpoint being replaced by a re-save of the same step
    .del-stage00-step000020/  a checkpoint being deleted by ``keep_last``

A save writes into the ``.tmp-`` folder and rank 0 renames it into place only
after every rank finished, so a crash mid-save never damages the last
complete checkpoint. Nothing ever deletes inside a complete checkpoint: it is
first renamed out of the ``stageNN-stepNNNNNN`` namespace (one atomic rename),
then removed. The only two-rename sequence, replacing a checkpoint of the same
step (``final -> .old-``, ``.tmp- -> final``), is recovered by
``list_checkpoints``: an ``.old-`` folder whose final name is missing counts
as that checkpoint. docs/reliability.md lists what this does and does not cover.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from steptitan import faults

_NAME = re.compile(r"^stage(\d+)-step(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    stage: int
    step: int
    meta: dict[str, Any]


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, oldest first."""
    out = []
    if not root.is_dir():
        return out
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if child.name.startswith(".old-") and not (root / child.name[len(".old-"):]).exists():
            m = _NAME.match(child.name[len(".old-"):])  # killed between the two renames of a re-save
        meta_path = child / "meta.json"
        if m and meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a torn meta.json means the save did not complete
            out.append(CheckpointInfo(child, int(m.group(1)), int(m.group(2)), meta))
    return sorted(out, key=lambda c: (c.stage, c.step))


def read_checkpoint(path: Path) -> CheckpointInfo:
    m = _NAME.match(path.name)
    if not m or not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete steptitan checkpoint (no meta.json)")
    return CheckpointInfo(path, int(m.group(1)), int(m.group(2)), json.loads((path / "meta.json").read_text()))


class Checkpointer:
    def __init__(self, root: Path, rank: int, world_size: int, keep_last: int = 0):
        self.root = root
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last

    def latest(self) -> CheckpointInfo | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    def save(
        self,
        stage: int,
        step: int,
        model: nn.Module,
        optimizer: Any,
        lr_schedulers: Any,
        trainer_state: dict[str, Any],
        peft_state: dict[str, Any],
    ) -> Path:
        name = f"stage{stage:02d}-step{step:06d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._cleanup()
        _barrier()
        state = {
            "model": get_model_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_schedulers.state_dict(),
        }
        dcp.save(state, checkpoint_id=str(tmp))
        # Small per-rank Python state goes beside the DCP shards: DCP needs a
        # template of every key to load into, these dicts do not have one.
        extra = {"rng": _rng_state(), "trainer": dict(trainer_state), "peft": peft_state}
        with open(tmp / f"extra-rank{self.rank}.pt", "wb") as fh:
            torch.save(extra, fh)
            fh.flush()
            os.fsync(fh.fileno())  # DCP fsyncs its shards (sync_files=True); do the same here
        faults.pause_point("save", stage, step, self.rank)  # tests: kill a rank mid-save
        _barrier()
        if self.rank == 0:
            meta = {"stage": stage, "step": step, "world_size": self.world_size, **trainer_state}
            with open(tmp / "meta.json", "w") as fh:
                json.dump(meta, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            old = self.root / f".old-{name}"
            if final.exists():  # re-saving the same step after a resume: swap, never delete in place
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            shutil.rmtree(old, ignore_errors=True)
            self._prune(keep=final)
        _barrier()
        return final

    def _cleanup(self) -> None:
        """Remove what killed saves and prunes left behind (rank 0, before a save)."""
        for stale in self.root.glob(".*-stage*"):
            final = self.root / stale.name.split("-", 1)[1]
            if stale.name.startswith(".old-") and not final.exists():
                os.replace(stale, final)  # finish the interrupted swap: it is a complete checkpoint
            else:
                shutil.rmtree(stale, ignore_errors=True)

    def _prune(self, keep: Path) -> None:
        """``keep_last``: rename old checkpoints out of the namespace (atomic), then delete them."""
        if self.keep_last > 0:
            for info in list_checkpoints(self.root)[: -self.keep_last]:
                if info.path != keep:
                    doomed = self.root / f".del-{info.path.name}"
                    os.replace(info.path, doomed)
                    shutil.rmtree(doomed, ignore_errors=True)

    def load(self, info: CheckpointInfo, model: nn.Module, optimizer: Any, lr_schedulers: Any) -> dict[str, Any]:
        """Load into an already built and sharded model (DCP reshards across world sizes).

        Returns ``{"trainer": ..., "peft": ...}``. RNG states are restored only
        when the world size is unchanged (exact resume); otherwise rank 0's
        trainer/PEFT state is used and RNG streams start afresh.
        """
        state = {
            "model": get_model_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_schedulers.state_dict(),
        }
        dcp.load(state, checkpoint_id=str(info.path))
        set_model_state_dict(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedulers.load_state_dict(state["lr_scheduler"])
        same_world = info.meta.get("world_size") == self.world_size
        extra = torch.load(info.path / f"extra-rank{self.rank if same_world else 0}.pt", weights_only=False)
        if same_world:
            _set_rng_state(extra["rng"])
        return {"trainer": extra["trainer"], "peft": extra["peft"]}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
