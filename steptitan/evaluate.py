"""Validation loss over a fixed set of blocks, the same whatever the world size.

The set is the first ``eval_batches * batch_size`` blocks of the (unshuffled)
validation split, or the whole split for ``eval_batches = 0``; each block
counts once. Ranks take turns in batches of ``batch_size``; the last round's
surplus slots are padding (a repeated block, masked out), so every rank runs
the same number of forwards (FSDP2's collectives) and 1 and N ranks give the
same loss up to float summation order. ``block_losses`` keeps each block's loss
(the benchmark bootstraps over them); the validation loss is their mean.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from steptitan.data import BlockSampler
from steptitan.distributed import DistEnv


@torch.no_grad()
def block_losses(model: nn.Module, val_data: BlockSampler, batch_size: int, eval_batches: int, env: DistEnv) -> torch.Tensor:
    """Mean cross-entropy of every evaluation block (float64, on the CPU, in block order); every rank
    calls it (a collective) and every rank gets the same tensor. Each block is computed by exactly one
    rank and written into a zero vector, so one all-reduce (a sum) assembles them."""
    model.eval()
    W, B, r = env.world_size, batch_size, env.rank
    n_eval = min(eval_batches * B, val_data.n_blocks) if eval_batches else val_data.n_blocks
    device = env.device
    per_block = torch.zeros(n_eval, dtype=torch.float64, device=device)  # on the device: one read at the end
    for k in range(math.ceil(n_eval / (W * B))):
        first = k * W * B + r * B
        indices = [g % n_eval for g in range(first, first + B)]
        n_valid = max(0, min(B, n_eval - first))  # slots g < n_eval: a prefix of the batch
        blocks = torch.from_numpy(np.stack([val_data.block(i) for i in indices]))
        logits = model(blocks[:, :-1].to(device))
        losses = F.cross_entropy(logits.flatten(0, 1).float(), blocks[:, 1:].flatten().to(device),
                                 reduction="none").view(B, -1).mean(dim=1)
        if n_valid:  # padding dropped by a slice, not a device mask
            per_block[first:first + n_valid] = losses[:n_valid].double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(per_block)
    return per_block.cpu()

