"""Adam-mini (Zhang et al. 2024, arXiv 2406.16793, v1.1.1 of the ``adam-mini`` package).

Adam with one second-moment value per Hessian block instead of per element
(Sec. 2-3): one per row ("neuron" / token) of the embedding, the LM head and
the other 2-D weights, one per attention head of wq / wk. The first moment
stays per element, so the state is ~4 bytes per parameter instead of 8: the
cheap-state optimizer for embeddings and head (docs/optimizers.md).

How steptitan hands parameters to the package: it picks Adam-mini's branch by
substrings of the name, so the plugin gives each parameter a name that selects
the branch the paper assigns and nothing else (an adapter ``...wq.lora_A`` must
not be read as a query): 1-D parameters (norm weights) -> its ``bias`` branch
(plain Adam, no weight decay: a norm weight is tiny, and the package's
one-value-per-tensor branch all-reduces only over CUDA devices); wq / wk of a
block -> per head (``per_head_qk``; under FSDP2 this needs every rank's dim-0
shard to hold whole heads, else the plugin falls back to per row); every
other 2-D parameter -> per row. Under FSDP2 the package works on DTensors:
a row's statistics live on the rank holding the row, so the sharded update is
the single-device update.

State per parameter (fp32, local shard of m x n, m_local rows): ``m`` m_local x n
and ``vmean`` m_local x 1 (per row) or heads_local x 1 (per head); 1-D: ``m``
and ``v``. Steps are Python ints (0 bytes). Exact bytes: tests/test_optim.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from steptitan.distributed import shard_degree
from steptitan.optim import OptimizerHParams, OptimizerPlugin
from steptitan.registry import OPTIM


@dataclass
class AdamMiniOptions:
    per_head_qk: bool = True  # one v per attention head for wq / wk (paper); false = one per row


@OPTIM.register("adam_mini")
class AdamMini(OptimizerPlugin):
    Options = AdamMiniOptions
    description = "Adam-mini: one second moment per row/head, ~4 B/param of state (adam-mini package)"
    growth_state_policy = "fresh"  # v is per block: it does not follow a weight's rows through growth
    resumable = True
    requires = "adam_mini"
    imports = ("adam_mini",)

    def branch(self, name: str, global_shape: Sequence[int], world_size: int) -> str:
        """"adam" (1-D), "head" (wq/wk per head) or "row"."""
        if len(global_shape) != 2:
            return "adam"
        qk = name.startswith("layers.") and name.endswith((".attention.wq.weight", ".attention.wk.weight"))
        if qk and self.options.per_head_qk and self.shape is not None:
            head_dim = self.shape.dim // self.shape.n_heads
            rows = global_shape[0]
            chunk = math.ceil(rows / world_size)  # FSDP2's dim-0 chunk: every shard must hold whole heads
            if global_shape[1] == self.shape.dim and rows % head_dim == 0 and chunk % head_dim == 0:
                return "head"
        return "row"

    def build(self, named_params: Sequence[tuple[str, nn.Parameter]], hparams: OptimizerHParams) -> torch.optim.Optimizer:
        self.check_available()
        from adam_mini import Adam_mini

        # the shard degree (HSDP: parallel.dp_shard), which decides the dim-0 chunk, not the world size
        world = shard_degree(named_params[0][1]) if named_params else 1
        suffix = {"adam": "bias", "head": "wq", "row": "mlp"}  # the package's branch keywords
        renamed = [(f"p{k}.{suffix[self.branch(n, tuple(p.shape), world)]}", p) for k, (n, p) in enumerate(named_params)]
        shape = self.shape
        dim, heads = (shape.dim, shape.n_heads) if shape is not None else (1, 1)
        opt = Adam_mini(renamed, lr=hparams.lr, betas=hparams.betas, eps=hparams.eps, weight_decay=hparams.weight_decay,
                        dim=dim, n_heads=heads, verbose=False)
        opt.check_block_name = False  # its name census prints warnings about names we chose on purpose
        return opt

    def state_bytes(self, name: str, local_shape: Sequence[int], global_shape: Sequence[int],
                    world_size: int = 1, step_slices: int = 1) -> int:
        numel = math.prod(local_shape)
        kind = self.branch(name, global_shape, world_size)
        if kind == "adam":
            return 8 * numel
        if kind == "head":
            head_numel = self.shape.dim * (self.shape.dim // self.shape.n_heads)
            return 4 * numel + 4 * (numel // head_numel)
        return 4 * numel + 4 * local_shape[0]
