"""The parameter inventory of a stage's (meta) model and the precision policies, which both the
memory model (steptitan/memory.py) and the activation / FLOP estimate (steptitan/flops.py) count from.

Kept apart so that neither of those two reaches into the other: memory.py builds on flops.py's
activation estimate, and flops.py on this inventory (issue 23, item 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a type only: `steptitan plan --help` reads PRECISIONS without importing torch
    from torch import nn

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Precision:
    """Where bytes go per parameter.

    ``compute`` is FSDP2's all-gather/compute dtype (training.dtype). Trainable
    shards, their gradients and optimizer state are always fp32 (master weights:
    FSDP2 keeps the sharded parameter in its original dtype and reduces
    gradients in fp32). ``frozen`` is the storage dtype of frozen weights
    (training.frozen_dtype): the STEP paper's mixed-precision policy keeps them
    in bf16 only, 2 bytes per parameter.
    """

    compute: str = "float32"
    frozen: str = "float32"

    @property
    def name(self) -> str:
        for key, value in PRECISIONS.items():
            if value == self:
                return key
        return f"{self.compute}/{self.frozen}"

    @classmethod
    def from_training(cls, training: Any) -> "Precision":
        """training.dtype "auto" resolves for the device the backend runs on (steptitan/device.py)."""
        from steptitan.device import compute_dtype_name, device_type_for

        compute = compute_dtype_name(training.dtype, device_type_for(getattr(training, "backend", "auto")))
        return cls(compute, getattr(training, "frozen_dtype", "float32"))


PRECISIONS = {
    "fp32": Precision("float32", "float32"),
    "bf16": Precision("bfloat16", "float32"),  # bf16 compute, fp32 master/grads/Adam, fp32 frozen
    "paper": Precision("bfloat16", "bfloat16"),  # STEP's policy: frozen weights in bf16 only (2 B)
}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    trainable: bool
    group: str  # old | new | embeddings | head | adapters
    step_dim: int | None = None  # per-slice optimizer step counts along this dim (SwitchLoRA), None = scalar


def param_specs(model: nn.Module, old_layers: set[int] | None = None, base_names: set[str] | None = None) -> list[ParamSpec]:
    """One entry per distinct parameter of a (meta) model, tied weights counted once."""
    from steptitan.model import layer_group_of

    old_layers = old_layers or set()
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        group = layer_group_of(name, old_layers) if base_names is None or name in base_names else "adapters"
        out.append(ParamSpec(name, tuple(p.shape), p.requires_grad, group))
    return out
