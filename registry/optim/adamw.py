"""AdamW (Loshchilov & Hutter 2019), torch's foreach implementation: the default optimizer.

State per parameter: ``exp_avg`` and ``exp_avg_sq`` shaped like the (sharded)
parameter in fp32 and a 0-d fp32 ``step`` tensor: 8 bytes per element + 4 bytes.
A PEFT method may ask for its own AdamW variant (``PeftMethod.optimizer_class``,
SwitchLoRA's per-row step counts in ``steptitan.optim.AdamWSliceSteps``); the
trainer then builds that class for the parameters assigned to ``adamw``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from steptitan.optim import NoOptions, OptimizerHParams, OptimizerPlugin, adam_state_bytes
from steptitan.registry import OPTIM


@OPTIM.register("adamw")
class AdamW(OptimizerPlugin):
    Options = NoOptions
    description = "AdamW (torch, foreach): 8 B/param of fp32 moments + a 4-byte step per tensor"
    growth_state_policy = "copy"  # moments shaped like the parameter: growth can copy them
    resumable = True
    requires = None

    def build(self, named_params: Sequence[tuple[str, nn.Parameter]], hparams: OptimizerHParams) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for _, p in named_params], lr=hparams.lr, betas=hparams.betas, eps=hparams.eps,
                                 weight_decay=hparams.weight_decay, foreach=True)

    def state_bytes(self, name: str, local_shape: Sequence[int], global_shape: Sequence[int],
                    world_size: int = 1, step_slices: int = 1) -> int:
        return adam_state_bytes(local_shape, step_slices)
