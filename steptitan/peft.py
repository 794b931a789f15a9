"""The PEFT-plugin contract: ``PeftMethod`` declares every hook the trainer calls, with its default.

A PEFT method is built for one stage and one set of layers (docs/peft.md, "A
PEFT plugin must / may"). The trainer calls, in this order:

1. ``apply(model)`` on the meta-device model, before sharding;
2. ``init_weights(model)`` after the model is materialised, initialised and grown;
3. ``optimizer_class(model)`` when the optimizer is built;
4. ``lr_factor(step)`` inside the LR schedule, ``step`` = the optimizer step about to be taken (1-based);
5. ``before_optimizer_step(ctx)`` / ``after_optimizer_step(ctx)`` around every optimizer step
   that is taken (neither runs on a step skipped for a non-finite loss);
6. ``merge(model)`` at the end of the stage (before growth and export);
7. ``state_dict()`` / ``load_state_dict()`` for counters and pools on resume.

``steptitan export`` and ``generate`` use a shorter sequence on one unsharded CPU model: ``apply``,
the checkpoint's weights, ``load_state_dict`` (rank 0's state, whatever the saved shard degree) and
``merge``; never ``init_weights``. So ``load_state_dict`` must accept a method that did not
initialise (skip what only further training needs, e.g. SwitchLoRA's pools), and ``merge`` must
make the loaded state take effect (e.g. APEX's unit selection).

The trainer owns FSDP2 resharding: before every hook that reads or writes
weights (``init_weights``, the optimizer-step hooks, ``merge``, checkpoint
saves) it returns the model to its sharded state, so a hook always sees each
parameter as this rank's dim-0 shard (``distributed.local_tensor``) and never
calls ``reshard`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from steptitan.schema import check_options


@dataclass
class StepContext:
    step: int  # the optimizer step being taken in this stage, 1-based (1 for the first)
    model: nn.Module
    optimizer: Any  # torchtitan OptimizersContainer
    seed: int
    total_steps: int = 0  # the stage's step budget (0 = unknown)


@dataclass
class NoOptions:
    """Options of a method that has none."""


class PeftMethod:
    """Base class for PEFT plugins: override what the method needs; every default is a no-op.

    A method whose ``apply`` adds parameters must override ``merge`` (``build_plan``
    refuses it otherwise: what its parameters learned would be lost at the next
    growth and in the export).
    """

    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""
    registry_name: ClassVar[str]
    # True for a method that edits its adapters' optimizer state as Adam moments (exp_avg /
    # exp_avg_sq shaped like the parameter, e.g. ReLoRA's reset): the plan then refuses an
    # adapters optimizer whose state is not laid out so (OptimizerPlugin.growth_state_policy "fresh").
    edits_adam_state: ClassVar[bool] = False

    def __init__(self, options=None, layers: list[int] | None = None, seed: int = 0):
        self.options = options if options is not None else self.Options()
        # Options built in code meet the same declared choices and ranges as a recipe's (steptitan/schema.py).
        errors = check_options(self.options, getattr(self, "registry_name", type(self).__name__))
        if errors:
            raise ValueError("; ".join(errors))
        self.layers = list(layers or [])
        self.seed = seed

    def apply(self, model: nn.Module) -> None:
        """On the meta model, before sharding: add adapter parameters/modules (never renaming the
        dense model's parameters) and freeze what the method freezes. Raise ValueError for a
        model the method cannot adapt (it becomes a RecipeError)."""

    def modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) of the adapted modules this method owns on its layers, in
        module order (the same on every rank); empty for methods that own none."""
        return []

    def init_weights(self, model: nn.Module) -> None:
        """Draw the adapters' values on the sharded, initialised and grown model (an init may read
        or compensate the base weights). Use ``distributed.init_like`` with a
        ``distributed.seeded_generator`` so the values do not depend on the world size."""

    def optimizer_class(self, model: nn.Module) -> tuple[type, dict[str, Any]] | None:
        """``None`` (torch AdamW) or ``(class, extra kwargs)`` for a method that needs its own
        AdamW variant (SwitchLoRA's per-row step counts)."""
        return None

    def lr_factor(self, step: int) -> float:
        """Multiplier of the stage's LR schedule for optimizer step ``step`` (1-based, the step
        about to be taken, like ``StepContext.step``). Keep it a pure function of ``step``."""
        return 1.0

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Just before optimizer step ``ctx.step`` (gradients are alive), e.g. saving frozen vectors."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """Just after optimizer step ``ctx.step``, e.g. resets and switches."""

    def merge(self, model: nn.Module) -> None:
        """Fold the adapters into the dense weights, leaving the function unchanged, so that the
        dense model alone carries what was learned (before growth and export)."""

    def label(self) -> str:
        """What the --dry-run stage table prints in brackets after the method's name: by default how many
        layers it adapts (``lora[2L]``); a method that adapts something else says what (``lora_embed[emb+head]``)."""
        return f"{len(self.layers)}L"

    def counters(self) -> dict[str, float]:
        """Cumulative event counts of this stage, e.g. ``{"relora/resets": 2}``: the trainer logs them to
        the trackers at every log step and prints their change since the last one. Same on every rank."""
        return {}

    def extra_state_bytes(self) -> int:
        """Bytes this rank holds outside parameters/optimizer (e.g. candidate pools)."""
        return 0

    def predicted_extra_state_bytes(self, model: nn.Module, world_size: int, rank: int) -> int:
        """What ``extra_state_bytes`` will be on ``rank``, from the (meta) model's shapes (memory model).
        ``world_size`` / ``rank`` are the shard degree and shard index (under HSDP, parallel.dp_shard)."""
        return 0

    def extra_state_on_host(self, device_type: str) -> bool:
        """True when ``extra_state_bytes`` sit in host memory while the model runs on ``device_type``
        (SwitchLoRA's ``pool_device = "cpu"`` on a GPU): the memory model then keeps them out of the
        device's bytes (``StageMemory.host_bytes``), so ``check_memory_fits`` does not refuse a run
        that fits (issue 23, item 6)."""
        return False

    def predicted_saved_bytes(self, model: nn.Module, batch: int, seq_len: int, compute_bytes: int,
                              checkpointing: bool) -> int:
        """Bytes autograd saves for backward in one micro-batch beyond the dense model's activations
        (``flops.activation_bytes``), e.g. APEX's full effective weight per adapted linear. With
        activation checkpointing only one block's worth lives (during its recompute)."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        """Counters and pools to save in a checkpoint (tensors or plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output on resume (``{}`` for a checkpoint without it).

        ``state`` is what the rank holding the same shard saved. When the checkpoint was saved
        with another shard degree, it is rank 0's and ``state["shards"]`` lists what shards
        0, 1, ... saved (steptitan/checkpoint.py), so per-shard tensors can be re-sharded."""


def overrides(method: PeftMethod, hook: str) -> bool:
    """True when ``method``'s class overrides ``PeftMethod.<hook>``."""
    return getattr(type(method), hook) is not getattr(PeftMethod, hook)


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
