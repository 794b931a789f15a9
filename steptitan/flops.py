"""Activation and FLOP estimates of one stage's model (docs/benchmark.md, "Memory model").

``activation_bytes`` estimates the tensors autograd saves for backward in one
micro-batch, and ``flops_per_token`` counts forward + backward matmul FLOPs;
both know which layers need weight gradients and which only pass activation
gradients (frozen layers below every trainable parameter record nothing).
They build on the parameter inventory of steptitan/inventory.py (``ParamSpec``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from steptitan.inventory import BYTES, ParamSpec, Precision, param_specs
from steptitan.model import ModelShape, base_param_names


def first_grad_layer(specs: Iterable[ParamSpec], n_layers: int) -> int:
    """Index of the first block whose input needs a gradient path (n_layers if none).

    Autograd records (and saves activations for) a block only if a trainable
    parameter sits in it or below it; embeddings count as below layer 0."""
    first = n_layers
    for s in specs:
        if not s.trainable:
            continue
        if s.name.startswith("tok_embeddings"):
            return 0
        if s.name.startswith("layers."):
            first = min(first, int(s.name.split(".")[1]))
    return first


def activation_bytes(shape: ModelShape, batch: int, seq_len: int, precision: Precision = Precision(),
                     checkpointing: bool = False, first_layer_with_grad: int = 0, attention: str = "flash") -> int:
    """Estimated bytes of tensors saved for backward in one micro-batch on one rank.

    Counted from what autograd saves in torchtitan's llama3 block (measured
    with ``saved_tensors_hooks``; SDPA's flash kernel saves q, k, v, out and
    the logsumexp, never the seq x seq scores): per token, the two RMSNorm
    inputs and outputs, the flattened inputs of wq and w1, q and the attention
    output (8 dim), k and v (2 kv), and the w1/w3 outputs, silu(w1) and the w2
    input (4 ffn), all in the compute dtype. With activation checkpointing a
    block keeps only its input, and one block's full set lives during its
    recompute. Blocks below the first trainable parameter save nothing. The
    head keeps the final norm's input/output and the flattened head input
    (3 dim) and cross-entropy's fp32 log-softmax (vocab x 4 B); the token ids
    are int64. tests/test_memory.py holds it to 10% of the measured bytes.

    ``attention`` is the SDPA kernel (``device.attention_kernel``): "flash" and "efficient" save O(S)
    state; "math" (an fp32 model on a GPU before the memory-efficient kernel was allowed, or a head
    size no fused kernel takes) also saves the B x H x S x S attention probabilities per block
    (measured with saved_tensors_hooks: q, k, v and the probabilities, not the output)."""
    tokens = batch * seq_len
    cb = BYTES[precision.compute]
    kv = shape.n_kv_heads * shape.head_dim
    per_block = tokens * (8 * shape.dim + 2 * kv + 4 * shape.ffn_hidden) * cb
    if attention == "math":
        per_block += batch * shape.n_heads * seq_len * seq_len * cb
    n_saving = max(0, shape.n_layers - first_layer_with_grad)
    if checkpointing:
        blocks = n_saving * tokens * shape.dim * cb + (per_block if n_saving else 0)
    else:
        blocks = n_saving * per_block
    head = tokens * (3 * shape.dim * cb + shape.vocab_size * 4 + 8)
    return blocks + head


def overhead_bytes(specs: Sequence[ParamSpec], shape: ModelShape, batch: int, seq_len: int, precision: Precision,
                   world_size: int, rank: int, grad_accum: int = 1, grad_sync: str = "last",
                   device_type: str = "cpu", resident: int = 0) -> dict[str, int]:
    """Bytes one rank holds at its peak beyond model states and saved activations (issue 15, defect 8).

    * ``shard_padding``: FSDP2 stores every rank's shard padded to ceil(rows / W) rows (and reduce-
      scatters gradients into buffers of that size), so ranks with fewer rows still pay for the chunk;
    * ``collective_buffers``: all-gathered parameters in the compute dtype -- the root unit (embeddings,
      final norm, head) stays unsharded from forward to backward, and two blocks are in flight (the one
      running and the one prefetched) -- plus one block's unsharded gradient and its fp32 reduce-scatter input;
    * ``logits``: the head's output in the compute dtype, its fp32 gradient and the compute-dtype gradient
      (cross-entropy's fp32 log-softmax is a saved activation, in ``activation_bytes``);
    * ``accumulated_grads``: with grad_accum > 1 and grad_sync = "last", FSDP2 keeps the unsharded fp32
      gradients of every trainable parameter until the last micro-batch reduce-scatters them;
    * ``fragmentation``: on CUDA a 10% margin on everything (``resident``: model states + activations,
      plus the above) for the caching allocator's rounding and fragmentation -- a margin, not a
      measurement: compare ``cuda_max_reserved`` with ``cuda_max_allocated`` in the logs (docs/gpu.md).
    """
    cb = BYTES[precision.compute]
    padding = 0
    blocks: dict[int, list[ParamSpec]] = {}
    root_numel = trainable_numel = 0
    for s in specs:
        numel = math.prod(s.shape)
        if s.shape and world_size > 1:
            chunk = math.ceil(s.shape[0] / world_size)
            held = max(0, min(chunk, s.shape[0] - rank * chunk))
            per_row = numel // s.shape[0] if s.shape[0] else 0
            padding += (chunk - held) * per_row * ((4 + 4) if s.trainable else BYTES[precision.frozen])
        if s.name.startswith("layers."):
            blocks.setdefault(int(s.name.split(".")[1]), []).append(s)
        else:
            root_numel += numel
        if s.trainable:
            trainable_numel += numel
    block_numel = max((sum(math.prod(s.shape) for s in b) for b in blocks.values()), default=0)
    block_trainable = max((sum(math.prod(s.shape) for s in b if s.trainable) for b in blocks.values()), default=0)
    gathered = world_size > 1 or device_type == "cuda"  # FSDP2 on one rank still unshards into compute-dtype copies
    collective = (root_numel * cb + 2 * block_numel * cb + block_trainable * (cb + 4)) if gathered else 0
    tokens = batch * seq_len
    out = {"shard_padding": padding, "collective_buffers": collective,
           "logits": tokens * shape.vocab_size * (2 * cb + 4),
           "accumulated_grads": 4 * trainable_numel if grad_accum > 1 and grad_sync == "last" else 0}
    out["fragmentation"] = (resident + sum(out.values())) // 10 if device_type == "cuda" else 0
    return out


@dataclass
class FlopCount:
    forward: int = 0
    backward_activations: int = 0  # gradients w.r.t. inputs: needed where trainable params sit below
    backward_weights: int = 0  # gradients w.r.t. trainable weights only
    recompute: int = 0  # activation checkpointing re-runs the forward of recorded blocks

    @property
    def total(self) -> int:
        return self.forward + self.backward_activations + self.backward_weights + self.recompute

    def as_dict(self) -> dict[str, int]:
        return {"forward": self.forward, "backward_activations": self.backward_activations,
                "backward_weights": self.backward_weights, "recompute": self.recompute, "total": self.total}


_BLOCK_ORDER = ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "ffn_norm", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def _block_position(inner: str) -> int:
    """Execution order of a block parameter (adapters sit with the linear they adapt)."""
    for k, prefix in enumerate(_BLOCK_ORDER):
        if inner == prefix or inner.startswith(prefix + "."):
            return k
    return len(_BLOCK_ORDER)


def flops_per_token(specs: Sequence[ParamSpec], shape: ModelShape, seq_len: int, checkpointing: bool = False) -> FlopCount:
    """Training FLOPs per token of one stage's model, counted matmul by matmul.

    A 2-D parameter W used as a matmul costs 2|W| forward. Backward costs 2|W|
    for the input gradient if any trainable parameter sits before it in the
    graph (below it in the network, or earlier in a chain such as LoRA's A
    before B), and 2|W| for the weight gradient only if W is trainable. The
    attention core (QK^T and AV, counted without the causal discount, as
    torchtitan does) costs 4 seq dim forward and twice that backward when q/k/v
    need gradients. The embedding lookup, norms and element-wise ops are not
    counted. With checkpointing, recorded blocks pay their forward again."""
    fc = FlopCount()
    blocks: dict[int, list[ParamSpec]] = {}
    emb_trainable = False
    head: list[ParamSpec] = []
    for s in specs:
        if s.name.startswith("layers."):
            blocks.setdefault(int(s.name.split(".")[1]), []).append(s)
        elif s.name.startswith("tok_embeddings"):
            emb_trainable = s.trainable
            if shape.tie_embeddings:
                head.append(s)
        else:
            head.append(s)
    grad_below = emb_trainable  # does the running activation need a gradient?
    attn_core = 4 * seq_len * shape.dim
    for j in sorted(blocks):
        block_fwd = 0
        ordered = sorted(blocks[j], key=lambda s: _block_position(s.name.split(".", 2)[2]))
        by_pos: dict[int, list[ParamSpec]] = {}
        for s in ordered:
            by_pos.setdefault(_block_position(s.name.split(".", 2)[2]), []).append(s)
        recorded = grad_below
        for pos in sorted(by_pos):
            group = by_pos[pos]
            if pos == _BLOCK_ORDER.index("attention.wo"):  # the attention core runs before wo
                block_fwd += attn_core
                if grad_below:
                    fc.backward_activations += 2 * attn_core
            chain_grad = False
            for k, s in enumerate(group):
                if len(s.shape) == 2:
                    mm = 2 * math.prod(s.shape)
                    block_fwd += mm
                    # base weight and the first adapter factor read the block input; later factors
                    # read the previous factor's output, which needs a gradient if that factor trains
                    if grad_below or (k > 1 and chain_grad):
                        fc.backward_activations += mm
                    if s.trainable:
                        fc.backward_weights += mm
                chain_grad = chain_grad or (s.trainable and k >= 1)
            if any(s.trainable for s in group):
                grad_below = True
                recorded = True
        fc.forward += block_fwd
        if checkpointing and recorded:
            fc.recompute += block_fwd
    for s in head:
        if len(s.shape) == 2 and (s.name.startswith("output") or s.name.startswith("tok_embeddings")):
            mm = 2 * math.prod(s.shape)
            fc.forward += mm
            if grad_below:
                fc.backward_activations += mm
            if s.trainable:
                fc.backward_weights += mm
    return fc


def stage_flops_per_token(plan: Any, seq_len: int, checkpointing: bool = False) -> FlopCount:
    model = plan.build()
    return flops_per_token(param_specs(model, plan.old_layers, base_param_names(plan.shape)), plan.shape,
                           seq_len, checkpointing)
