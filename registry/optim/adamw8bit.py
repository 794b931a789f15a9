"""8-bit AdamW (Dettmers et al., ICLR 2022, arXiv 2110.02861) through torchao's ``AdamW8bit``.

AdamW whose two moments are stored block-wise quantised: 8-bit codes into a
dynamic (signed for ``exp_avg``, unsigned for ``exp_avg_sq``) 256-entry
quantisation map plus one fp32 absmax scale per block of ``block_size``
elements (Sec. 2). Every step dequantises, runs AdamW in fp32 and
requantises, so the update is AdamW's up to the quantisation error.

torchao, not bitsandbytes: torchao's optimizer state is a tensor subclass
(``OptimState8bit``) that it wraps in a DTensor sharded like the FSDP2
parameter, so the update runs per shard and DCP saves and reshards the state
(codes, scales, map). bitsandbytes 0.50's 8-bit optimizers run on CPU but
not on DTensor parameters (docs/optimizers.md).

Eager by default. torchao compiles its per-parameter step with
``torch.compile(fullgraph=True)``, once per distinct shape, which on a CPU
took minutes for the first step; ``compile = false`` (the default) runs the
same function eagerly (``torch.compiler.set_stance("force_eager")``).

State per parameter, decided by the rank's local shard (torchao quantises a
tensor of >= 4096 elements divisible by ``block_size``, as bitsandbytes does;
smaller ones keep fp32 moments): two 8-bit moments -> numel codes (1 B) +
4 B per block + the 256-entry fp32 map (1 KiB) each; otherwise two fp32
moments (8 B/element); + a 0-d fp32 ``step``. Exact bytes: tests/test_optim.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from steptitan.optim import OptimizerHParams, OptimizerPlugin
from steptitan.registry import OPTIM

QMAP_ENTRIES = 256  # torchao's dynamic quantisation map (create_dynamic_map): one fp32 per 8-bit code
MIN_QUANTIZED_NUMEL = 4096  # torchao's _AdamBase._new_buffer: smaller tensors keep fp32 moments


@dataclass
class AdamW8bitOptions:
    block_size: int = field(default=256, metadata={"gt": 0})  # elements per absmax scale (torchao's default)
    compile: bool = False  # torch.compile torchao's step function (a compile per distinct shape)


def _adamw8bit_class(compile: bool) -> type[torch.optim.Optimizer]:
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit

    class AdamW8bit(TorchaoAdamW8bit):
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            if compile:
                return super().step(closure)
            with torch.compiler.set_stance("force_eager"):  # torchao's torch.compile(...) call runs eagerly
                return super().step(closure)

    return AdamW8bit


@OPTIM.register("adamw8bit")
class AdamW8bit(OptimizerPlugin):
    Options = AdamW8bitOptions
    description = "8-bit AdamW: block-wise quantised moments, ~2 B/param of state (torchao AdamW8bit)"
    # The state is Adam's, but quantised: growth would carry it as fp32 tensors (zeros_like the
    # parameter), which torchao would then keep using at 8 B/param. It restarts instead.
    growth_state_policy = "fresh"
    resumable = True
    requires = "adamw8bit"
    imports = ("torchao.optim",)

    def build(self, named_params: Sequence[tuple[str, nn.Parameter]], hparams: OptimizerHParams) -> torch.optim.Optimizer:
        self.check_available()
        return _adamw8bit_class(self.options.compile)(
            [p for _, p in named_params], lr=hparams.lr, betas=hparams.betas, eps=hparams.eps,
            weight_decay=hparams.weight_decay, block_size=self.options.block_size)

    def quantized(self, local_shape: Sequence[int]) -> bool:
        numel = math.prod(local_shape)
        return numel >= MIN_QUANTIZED_NUMEL and numel % self.options.block_size == 0

    def state_bytes(self, name: str, local_shape: Sequence[int], global_shape: Sequence[int],
                    world_size: int = 1, step_slices: int = 1) -> int:
        numel = math.prod(local_shape)
        step = 4  # a 0-d fp32 tensor
        if not self.quantized(local_shape):
            return 8 * numel + step
        one_moment = numel + 4 * (numel // self.options.block_size) + 4 * QMAP_ENTRIES
        return 2 * one_moment + step
