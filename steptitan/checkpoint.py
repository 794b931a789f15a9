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
as that checkpoint.

``meta.json`` also records every file's size, so a damaged checkpoint (a
truncated shard, a missing ``extra-rank1.pt``, a ``meta.json`` of ``{}``) is
recognised before loading and resume falls back to the newest intact one
(``newest_intact``). A save first makes room: when the free space is short of
the newest checkpoint's size, ``keep_last`` pruning happens *before* the save
(``DiskSpaceError`` names the problem otherwise). docs/reliability.md lists
what this does and does not cover.
"""

from __future__ import annotations

import errno
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
_REQUIRED_META = ("stage", "step", "world_size", "samples_seen", "global_step")
SPACE_MARGIN = 1.2  # a save needs the newest checkpoint's size times this, free, before it starts


class DiskSpaceError(OSError):
    """No room for a checkpoint; the message names the folder, the sizes and what to do."""


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
    """An explicitly named checkpoint (``checkpoint.resume=<path>``), validated; ValueError says what is wrong."""
    m = _NAME.match(path.name)
    if not path.is_dir():
        raise ValueError(f"checkpoint.resume={str(path)!r}: no such checkpoint folder")
    if not m or not (path / "meta.json").is_file():
        raise ValueError(f"checkpoint.resume={str(path)!r} is not a complete steptitan checkpoint "
                         f"(expected a stageNN-stepNNNNNN folder with meta.json)")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint.resume={str(path)!r}: unreadable meta.json ({exc})") from None
    info = CheckpointInfo(path, int(m.group(1)), int(m.group(2)), meta if isinstance(meta, dict) else {})
    problem = checkpoint_problem(info)
    if problem:
        raise ValueError(f"checkpoint.resume={str(path)!r} is damaged: {problem}; pick another checkpoint")
    return info


def _file_sizes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file() and f.name != "meta.json"}


def checkpoint_problem(info: CheckpointInfo) -> str | None:
    """Why ``info`` cannot be loaded (None = intact): meta.json fields, and every file at its recorded size.

    Checks sizes, not checksums: that catches truncation and missing files
    (the failures of killed copies and full disks) at the cost of a ``stat``;
    silent bit flips inside a file are not detected.
    """
    meta = info.meta
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        return f"meta.json lacks {', '.join(missing)}"
    if (meta["stage"], meta["step"]) != (info.stage, info.step):
        return f"meta.json names stage {meta['stage']} step {meta['step']}, the folder name another"
    expected = meta.get("files")
    if expected is None:  # written before sizes were recorded: check what every load needs
        expected = {".metadata": None, **{f"extra-rank{r}.pt": None for r in range(int(meta["world_size"]))}}
    for name, size in expected.items():
        f = info.path / name
        if not f.is_file():
            return f"{name} is missing"
        if size is not None and f.stat().st_size != size:
            return f"{name} has {f.stat().st_size:,} bytes, {size:,} were written"
    return None


def newest_intact(root: Path, warn=None) -> CheckpointInfo | None:
    """The newest complete checkpoint that passes ``checkpoint_problem``; ``warn(msg)`` hears each one skipped."""
    for info in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(info)
        if problem is None:
            return info
        if warn is not None:
            warn(f"checkpoint {info.path} is damaged ({problem}); skipped, trying the one before it")
    return None


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class Checkpointer:
    def __init__(self, root: Path, rank: int, world_size: int, keep_last: int = 0, dp_shard: int | None = None):
        self.root = root
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        # HSDP (docs/scale-out.md): rank r holds shard r % dp_shard; replicas of a shard hold the same state.
        self.dp_shard = dp_shard or world_size

    def latest(self) -> CheckpointInfo | None:
        found = list_checkpoints(self.root)
        return found[-1] if found else None

    def latest_intact(self, warn=None) -> CheckpointInfo | None:
        return newest_intact(self.root, warn)

    def _make_room(self) -> None:
        """Rank 0, before a save: prune per ``keep_last`` now if the free space is short.

        Pruning after a save (the normal order) keeps ``keep_last`` checkpoints
        even while the new one is written, but on a nearly full disk every
        save then dies with ENOSPC and nothing ever frees space. So when the
        free space is below the newest checkpoint's size (x SPACE_MARGIN),
        delete down to ``keep_last - 1`` first. If the save still does not fit,
        its ENOSPC becomes a ``DiskSpaceError`` naming the sizes.
        """
        found = list_checkpoints(self.root)
        if not found or self.keep_last <= 0:
            return
        need = int(checkpoint_bytes(found[-1].path) * SPACE_MARGIN)
        if shutil.disk_usage(self.root).free < need:
            for info in found[: max(0, len(found) - (self.keep_last - 1))]:
                self._delete(info.path)

    def _delete(self, path: Path) -> None:
        doomed = self.root / f".del-{path.name}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

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
            self._make_room()
        _barrier()
        try:
            self._write_shards(tmp, model, optimizer, lr_schedulers, trainer_state, peft_state)
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            # torch.save's zip writer reports a short write as "unexpected pos", without the errno
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not (
                    is_enospc(exc) or shutil.disk_usage(self.root).free < 1 << 20):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back: the next attempt may fit
            raise DiskSpaceError(errno.ENOSPC, _space_message(self.root, shutil.disk_usage(self.root).free,
                                                              self.keep_last)) from None
        faults.pause_point("save", stage, step, self.rank)  # tests: kill a rank mid-save
        _barrier()
        if self.rank == 0:
            meta = {"stage": stage, "step": step, "world_size": self.world_size, "dp_shard": self.dp_shard,
                    **trainer_state,
                    "files": _file_sizes(tmp)}  # every rank's files are complete (barrier); load checks these
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

    def _write_shards(self, tmp: Path, model: nn.Module, optimizer: Any, lr_schedulers: Any,
                      trainer_state: dict[str, Any], peft_state: dict[str, Any]) -> None:
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
                    self._delete(info.path)

    def load(self, info: CheckpointInfo, model: nn.Module, optimizer: Any, lr_schedulers: Any) -> dict[str, Any]:
        """Load into an already built and sharded model (DCP reshards across world sizes).

        Returns ``{"trainer": ..., "peft": ...}``. RNG states are restored only
        when the world size is unchanged (exact resume); otherwise rank 0's
        trainer state is used and RNG streams start afresh.

        PEFT state may hold per-shard tensors (SwitchLoRA's candidate pools). With
        the shard degree unchanged, a rank gets the state saved by the rank that held
        the same shard (any replica: HSDP replicas are identical). With another shard
        degree it gets the loaded file's, and each non-empty method state also carries
        ``"shards"``: the states saved by shard 0, 1, ... of replica 0, to re-shard from.
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
        return {"trainer": extra["trainer"], "peft": self._peft_state(info, extra)}

    def _peft_state(self, info: CheckpointInfo, extra: dict[str, Any]) -> dict[str, Any]:
        saved_shard = int(info.meta.get("dp_shard", info.meta.get("world_size", 1)))  # before HSDP: flat FSDP2
        shard = self.rank % self.dp_shard
        if saved_shard == self.dp_shard:  # rank `shard` is replica 0's holder of this shard
            same_file = info.meta.get("world_size") == self.world_size or shard == 0
            return extra["peft"] if same_file else self._read_extra(info, shard)["peft"]
        peft = extra["peft"]
        if any(peft.values()):
            shards = [self._read_extra(info, k)["peft"] for k in range(saved_shard)]
            peft = {key: {**state, "shards": [s.get(key, {}) for s in shards]} if state else state
                    for key, state in peft.items()}
        return peft

    @staticmethod
    def _read_extra(info: CheckpointInfo, rank: int) -> dict[str, Any]:
        return torch.load(info.path / f"extra-rank{rank}.pt", weights_only=False)


def is_enospc(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in ``exc``: DCP wraps per-rank write errors in a CheckpointException."""
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        seen += [x for x in (e.__cause__, e.__context__) if x is not None]
        for value in getattr(e, "failures", {}).values() if isinstance(getattr(e, "failures", None), dict) else ():
            if isinstance(value, BaseException):
                seen.append(value)
    return False


def _space_message(root: Path, free: int, keep_last: int) -> str:
    from steptitan.metrics import fmt_bytes

    prune = (f"checkpoint.keep_last={keep_last} already pruned what it may" if keep_last
             else "set checkpoint.keep_last=N to delete old checkpoints")
    return (f"not enough disk space for a checkpoint in {root} (No space left on device, {fmt_bytes(free)} free); "
            f"{prune}; free space there (or raise checkpoint.interval), then run the same command to resume "
            f"from the newest checkpoint")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
