"""Memory accounting from live tensors, peak RSS, and the log sinks (console + TensorBoard)."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from steptitan.distributed import local_tensor

log = logging.getLogger("steptitan")


def _nbytes(t: torch.Tensor) -> int:
    t = local_tensor(t)
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
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cuda_peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


class MetricsLogger:
    """Rank 0 writes TensorBoard scalars; every call is a no-op on other ranks."""

    def __init__(self, log_dir: Path | None, enabled: bool):
        self.tb = None
        if enabled and log_dir is not None:
            from torchtitan.components.metrics import TensorBoardLogger

            log_dir.mkdir(parents=True, exist_ok=True)
            self.tb = TensorBoardLogger(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            self.tb.log(values, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(message)s" if rank else "%(message)s", force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
