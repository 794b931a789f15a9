"""A bare FSDP2 training loop: the throughput reference for steptitan's own overhead.

torchtitan's llama3 ``Transformer`` + ``fully_shard`` on every block and the root +
AdamW + warmup/cosine LR + grad clipping, on the same token file, batch, sequence
length and seed as a steptitan run -- and nothing else: no stage plan, no PEFT hooks,
no per-step memory accounting, no logging but a final JSON line. ``steptitan bench`` runs it
interleaved with steptitan's vanilla recipe on the same final model.

    torchrun --nproc_per_node=2 -m steptitan.experiments.bare_fsdp --tokens TRAIN.bin --dtype uint16 \
        --dim 128 --layers 6 --heads 4 --vocab 2048 --ffn 352 --steps 40 --out bare.json

``--ab RECIPE [--override k=v ...]`` also builds steptitan's Trainer for the recipe's first
stage in the same processes and alternates steps: bare, steptitan, steptitan, bare, ... Both
see the same machine load step by step, which separate runs on a shared machine cannot give.
It times ``Trainer.train_step`` (batch, forward, loss, backward, clipping, per-step memory
accounting, the loss all-reduce, optimizer and LR step), which is what the stage loop runs for a
vanilla recipe besides logging.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torchtitan.distributed.utils import clip_grad_norm_
from torchtitan.models.llama3 import Transformer, TransformerModelArgs


def build_steptitan(recipe_path: str, overrides: list[str]):
    """steptitan's Trainer on the recipe's first stage; returns step(i) -> seconds of one train_step."""
    from steptitan.data import prepare_data
    from steptitan.distributed import init_distributed
    from steptitan.plan import build_plan
    from steptitan.recipe import load_recipe
    from steptitan.trainer import Trainer

    recipe = load_recipe(recipe_path, overrides)
    plans = build_plan(recipe)
    data = prepare_data(recipe.data, recipe.model.vocab_size)
    trainer = Trainer(recipe, plans, data, init_distributed(recipe.training.backend))
    plan = plans[0]
    model = trainer.build_stage_model(plan)
    trainer.build_optimizer(plan, model)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(i: int) -> float:
        t = time.perf_counter()
        # as the stage loop calls it: memory is counted on the first two steps and on log steps
        trainer.train_step(plan, model, trainable, i, measure_memory=i <= 2 or i % trainer.cfg.steps_per_log == 0)
        return time.perf_counter() - t

    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", required=True, help="flat token file (steptitan's cached train split)")
    ap.add_argument("--dtype", default="uint16")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=352)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ab", default=None, metavar="RECIPE", help="alternate steps with steptitan's Trainer on this recipe")
    ap.add_argument("--override", action="append", default=[], help="recipe override for --ab (repeatable)")
    args = ap.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(args.seed)
    base = int(2 * (4 * args.dim) / 3)
    margs = TransformerModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                                 vocab_size=args.vocab, multiple_of=1, ffn_dim_multiplier=(args.ffn + 0.5) / base,
                                 max_seq_len=args.seq_len, attn_type="sdpa", depth_init=True)
    with torch.device("meta"):
        model = Transformer(margs)
    mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device="cpu")
    with torch.no_grad():  # torchtitan's own init on the shards: on a CPU mesh its ranks repeat one shard's draw
        # (issue 11), which steptitan.model.init_model_weights fixes; this loop is the no-steptitan-code
        # throughput reference, and the values of the weights do not change the time of a step.
        model.init_weights(buffer_device=torch.device("cpu"))
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (args.warmup + 1)) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))))

    tokens = np.memmap(args.tokens, dtype=args.dtype, mode="r")
    block = args.seq_len + 1
    n_blocks = len(tokens) // block
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(n_blocks)
    ab = build_steptitan(args.ab, args.override) if args.ab else None
    ab_time, ab_tokens = 0.0, 0
    step_time, timed_tokens, loss_val = 0.0, 0, float("nan")
    for step in range(args.steps):
        if ab is not None and step % 2 == 0:  # steptitan first on even steps, second on odd ones
            dt_ab = ab(step + 1)
            if step > 0:
                ab_time, ab_tokens = ab_time + dt_ab, ab_tokens + world * args.batch * args.seq_len
        t = time.perf_counter()
        first = (step * world + rank) * args.batch
        idx = [order[(first + k) % n_blocks] for k in range(args.batch)]
        batch = torch.from_numpy(np.stack([tokens[i * block:(i + 1) * block].astype(np.int64) for i in idx]))
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        loss_val = loss.item()
        dt = time.perf_counter() - t
        if step > 0:  # steady state: the same convention as steptitan's step_tokens_per_s
            step_time += dt
            timed_tokens += world * args.batch * args.seq_len
        if ab is not None and step % 2 == 1:
            dt_ab = ab(step + 1)
            ab_time, ab_tokens = ab_time + dt_ab, ab_tokens + world * args.batch * args.seq_len

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    states = sum(local_bytes(p) for p in params) + sum(
        local_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    with open("/proc/self/status") as fh:
        rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    result = {"tokens_per_s": timed_tokens / step_time if step_time else 0.0, "steps": args.steps,
              "final_train_loss": loss_val, "rank": rank, "peak_rss_bytes": rss,
              # grads were freed by zero_grad; add them back (one fp32 grad per parameter)
              "model_state_bytes": states + sum(local_bytes(p) for p in params)}
    if ab is not None:
        result["steptitan_tokens_per_s"] = ab_tokens / ab_time if ab_time else 0.0
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        summary = {**results[0], "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
                   "model_state_bytes": max(r["model_state_bytes"] for r in results)}
        print(json.dumps(summary))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(summary, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
