"""Memory accounting from live tensors, peak RSS, and console logging (trackers: steptitan/trackers.py)."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from steptitan.distributed import local_tensor

log = logging.getLogger("steptitan")


def _nbytes(t: torch.Tensor) -> int:
    t = local_tensor(t)
    if is_traceable_wrapper_subclass(t):  # e.g. torchao's 8-bit optimizer state: count the tensors it holds
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def memory_breakdown(model: nn.Module, optimizer: Any | None = None, extra: Iterable[int] = ()) -> dict[str, int]:
    """Bytes this rank holds for model states, counted from the local shards.

    Keys: params_trainable, params_frozen, params_<dtype>, grads, optimizer,
    adapter_pools, model_states (their sum without the per-dtype split).
    """
    out: dict[str, int] = defaultdict(int)
    for p in model.parameters():  # de-duplicates tied weights
        n = _nbytes(p)
        out["params_trainable" if p.requires_grad else "params_frozen"] += n
        out[f"params_{str(local_tensor(p).dtype).replace('torch.', '')}"] += n
        if p.grad is not None:
            out["grads"] += _nbytes(p.grad)
    if optimizer is not None:
        for opt in getattr(optimizer, "optimizers", [optimizer]):
            for state in opt.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        out["optimizer"] += _nbytes(v)
                    elif isinstance(getattr(v, "ortho_matrix", None), torch.Tensor):  # GaLore's projector
                        out["optimizer"] += _nbytes(v.ortho_matrix)
    out["adapter_pools"] = int(sum(extra))
    out["model_states"] = out["params_trainable"] + out["params_frozen"] + out["grads"] + out["optimizer"] + out["adapter_pools"]
    return dict(out)


def peak_rss_bytes() -> int:
    """This process's peak resident set size since the last ``reset_peak_rss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) so each stage gets its own peak
    (and CUDA's max-allocated mark, when on GPU)."""
    if cuda_in_use():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cuda_in_use() -> bool:
    """CUDA was initialised by this process (a gloo run on a GPU host never touches it: querying
    would create a context on GPU 0 for every rank)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def cuda_peak_bytes() -> int:
    """Peak bytes held by live tensors on this rank's GPU since the last reset (0 off CUDA)."""
    return torch.cuda.max_memory_allocated() if cuda_in_use() else 0


def cuda_reserved_bytes() -> int:
    """Peak bytes the caching allocator reserved from the driver (live tensors + cached blocks +
    fragmentation): what an out-of-memory error is about, logged next to ``cuda_peak_bytes``."""
    return torch.cuda.max_memory_reserved() if cuda_in_use() else 0


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


class _OwnOrErrors(logging.Filter):
    """On ranks > 0: steptitan's own records (they can be rank-specific: a full disk, a failed peer)
    and errors pass; a library's warnings -- the same text on every rank, e.g. bitsandbytes'
    import-time notice, Python ``warnings`` routed through ``py.warnings`` -- are left to rank 0."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("steptitan") or record.levelno >= logging.ERROR


def setup_logging(rank: int, verbose: bool = True) -> None:
    """Console logging: rank 0 shows INFO and up (``verbose``; else warnings); other ranks show
    steptitan's warnings and every error, each line prefixed with ``[rank<r>]``, so a library warning
    is printed once per job, not once per rank. Python ``warnings`` go through logging
    (``logging.captureWarnings``), so they get the same treatment (each still once per place)."""
    level = logging.INFO if rank == 0 and verbose else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(message)s" if rank else "%(message)s", force=True)
    logging.captureWarnings(True)
    if rank:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_OwnOrErrors())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
