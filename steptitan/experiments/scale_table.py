"""``steptitan bench --scale-table``: the planner's per-rank peak for a 1B-parameter shape beside the tiny
measured one (issue 22): at the paper's scale model states dominate, at the bench's tiny shape activations do.

Predicted, not measured (no GPU here): `steptitan.planner` (model states exactly as `steptitan.memory`,
tested byte for byte against runs; activations as `steptitan.flops.activation_bytes`, tested within 10%
of the saved tensors). Buffers (unsharded parameters in flight, logits) are not in these totals.
"""

from __future__ import annotations

from typing import Any

from steptitan.memory import PRECISIONS, OptimizerSpec
from steptitan.metrics import fmt_bytes
from steptitan.model import ModelShape
from steptitan.optim import resolve_assignment
from steptitan.planner import layer_inventory, plan_splits, vanilla_memory

# GaLore's LLaMA 1B (Zhao et al. 2024, Table 5; ../shared/reference/methods.md): 24 x 2048, FFN 5461, vocab 32000
SHAPE_1B = dict(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, vocab_size=32000, ffn_hidden=5461, max_seq_len=2048)


def scale_rows(shape: ModelShape, lora_rank: int, batch: int = 1, seq_len: int = 2048) -> list[dict[str, Any]]:
    """Vanilla AdamW, vanilla Adam-mini, the best 3- and 4-stage STEP splits (LoRA on old layers, Adam-mini),
    each without and with activation checkpointing, under the paper's precision policy on one rank."""
    precision = PRECISIONS["paper"]
    adamw = OptimizerSpec.of(resolve_assignment([({"default": "adamw"}, "table")], shape))
    mini = OptimizerSpec.of(resolve_assignment([({"default": "adam_mini"}, "table")], shape))
    peft = {"method": "lora", "rank": lora_rank, "alpha": 2 * lora_rank}
    rows = []
    for ckpt in (False, True):
        common = dict(world_size=1, precision=precision, batch=batch, seq_len=seq_len, checkpointing=ckpt)
        van_inv = layer_inventory(shape, None)
        van = vanilla_memory(van_inv, optimizer=adamw, **common)
        rows.append({"row": "vanilla AdamW", "ckpt": ckpt, "split": [shape.n_layers], "result": van, "ref": van})
        van_mini = vanilla_memory(van_inv, optimizer=mini, **common)
        rows.append({"row": "vanilla Adam-mini", "ckpt": ckpt, "split": [shape.n_layers], "result": van_mini,
                     "ref": van, "same": van_mini})
        inv = layer_inventory(shape, peft)
        for k in (3, 4):
            best = plan_splits(inv, k, top=1, objective="total", optimizer=mini, **common)[0]
            rows.append({"row": f"STEP {k} stages + Adam-mini, LoRA r{lora_rank}", "ckpt": ckpt,
                         "split": list(best.layers), "result": best, "ref": van, "same": van_mini})
    return rows


def scale_table(lora_rank: int = 64) -> list[str]:
    shape = ModelShape(**SHAPE_1B)
    lines = [f"Shape: dim {shape.dim}, {shape.n_layers} layers, FFN {shape.ffn_hidden}, vocab {shape.vocab_size} "
             f"({shape.num_params():,} parameters), micro-batch 1 x 2048 tokens, one rank, the paper's policy.", "",
             "| row | act. ckpt | split | model states | vs vanilla AdamW | vs same optimizer | model states + activations "
             "| vs vanilla AdamW | vs same optimizer |", "|---|---|---|---|---|---|---|---|---|"]
    for r in scale_rows(shape, lora_rank):
        res, ref, same = r["result"], r["ref"], r.get("same")
        lines.append(f"| {r['row']} | {'yes' if r['ckpt'] else 'no'} | {r['split']} | {fmt_bytes(res.peak_model_states)} | "
                     f"{res.peak_model_states / ref.peak_model_states:.3f}x | "
                     f"{f'{res.peak_model_states / same.peak_model_states:.3f}x' if same else '-'} | "
                     f"{fmt_bytes(res.peak_total)} | {res.peak_total / ref.peak_total:.3f}x | "
                     f"{f'{res.peak_total / same.peak_total:.3f}x' if same else '-'} |")
    return lines
