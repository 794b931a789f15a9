"""The PEFT-method interface (docs/peft.md).

A PEFT method is built for one stage and one set of layers. The trainer calls,
in this order:

1. ``apply(model)`` on the meta-device model, before sharding: add adapter
   parameters/modules (never renaming the dense model's parameters) and freeze
   what the method freezes;
2. ``init_weights(model)`` after the model is materialised, initialised and
   grown (so an init may read or compensate the base weights);
3. ``optimizer_class(model)`` on the sharded model, when the optimizer is
   built: ``None`` (torch AdamW) or ``(class, extra kwargs)`` for a method that
   needs its own optimizer (SwitchLoRA's per-row step counts);
4. ``lr_factor(step)`` inside the LR schedule (multiplies the base schedule;
   ``step`` is the 0-based scheduler step, so keep it a pure function of it);
5. ``before_optimizer_step(ctx)`` just before every optimizer step (freezes);
6. ``after_optimizer_step(ctx)`` after every optimizer step (resets, switches);
7. ``merge(model)`` at the end of the stage: fold adapters into the base
   weights exactly, leaving the function unchanged;
8. ``state_dict()`` / ``load_state_dict()`` for counters and pools on resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from steptitan.distributed import local_part, local_tensor


@dataclass
class StepContext:
    step: int  # optimizer steps completed in this stage (1 after the first step)
    model: nn.Module
    optimizer: Any  # torchtitan OptimizersContainer
    seed: int
    total_steps: int = 0  # the stage's step budget (0 = unknown)


class PeftMethod:
    """Base class for PEFT plugins. Subclasses set ``Options`` and override what they need."""

    Options: ClassVar[type]
    description: ClassVar[str] = ""
    registry_name: ClassVar[str]

    def __init__(self, options, layers: list[int], seed: int = 0):
        self.options = options
        self.layers = list(layers)
        self.seed = seed

    def apply(self, model: nn.Module) -> None:
        pass

    def init_weights(self, model: nn.Module) -> None:
        pass

    def optimizer_class(self, model: nn.Module) -> tuple[type, dict[str, Any]] | None:
        return None

    def lr_factor(self, step: int) -> float:
        return 1.0

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """``ctx.step`` is the step about to be taken (1 for the first)."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        pass

    def merge(self, model: nn.Module) -> None:
        pass

    def extra_state_bytes(self) -> int:
        """Bytes this rank holds outside parameters/optimizer (e.g. candidate pools)."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def target_linears(model: nn.Module, layers: list[int], patterns: list[str]) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, parent, attribute, linear) for every block linear matching ``patterns``.

    Patterns match the name inside a block ("attention.wq") or its last part ("wq").
    """
    import fnmatch

    found = []
    for j in layers:
        block = model.layers[str(j)]
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear) or not name:
                continue
            short = name.rsplit(".", 1)[-1]
            if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(short, p) for p in patterns):
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                found.append((f"layers.{j}.{name}", parent, attr, module))
    return found


def optimizer_state(optimizer: Any, param: torch.Tensor) -> dict[str, Any]:
    """The optimizer state of ``param`` (empty before its first step); works for a container or one optimizer."""
    for opt in getattr(optimizer, "optimizers", [optimizer]):
        if param in opt.state:
            return opt.state[param]
    return {}


def seeded_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded from (seed, keys): identical on every rank, any world size."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def init_like(param: torch.Tensor, init: Callable[[torch.Tensor, torch.Generator], None], gen: torch.Generator) -> None:
    """Initialise a (possibly sharded) parameter from a full tensor drawn on every rank.

    Drawing the full tensor with a shared generator makes the result the same
    for every world size (adapters are small, so this costs little).
    """
    full = torch.empty(param.shape, dtype=torch.float32)
    init(full, gen)
    local = local_tensor(param)
    local.copy_(local_part(full.to(local.device), param))
