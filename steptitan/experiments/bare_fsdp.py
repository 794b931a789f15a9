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

``--variant k=v[,k=v]`` (repeatable, with ``--ab``) builds one Trainer per variant instead, e.g.
``--variant training.compile=false --variant training.compile=true``, and every step runs the bare
loop and each variant in an order that rotates by one each step; ``variants`` in the JSON gives each
one's tokens/s. ``--compile`` compiles the bare model's blocks as steptitan does (``device.compile_blocks``,
torchtitan's per-block compile; ``--compile-backend`` as ``training.compile_backend``), so compiled
steptitan can be compared with compiled bare FSDP2 (docs/bench/compile.md). ``--rounds N`` splits the
timed steps into N consecutive rounds and reports each loop's tokens/s and every pair's ratio per round
(median, min, max): the spread of a ratio measured under one and the same machine load. The process group and device come from ``steptitan.distributed.init_distributed``
(``--backend auto``: NCCL and the rank's GPU where there is one, gloo on the CPU otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
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
    sync = torch.cuda.synchronize if trainer.env.device.type == "cuda" else (lambda: None)
    plan = plans[0]
    model = trainer.build_stage_model(plan)
    trainer.build_optimizer(plan, model)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(i: int) -> float:
        sync()
        t = time.perf_counter()
        # as the stage loop calls it: memory is counted on the first two steps and on log steps
        trainer.train_step(plan, model, trainable, i, measure_memory=i <= 2 or i % trainer.cfg.steps_per_log == 0)
        sync()  # a GPU runs ahead of the host: time the work, not its queueing
        return time.perf_counter() - t

    return step


def per_round(step_s: dict[str, list[float]], step_tokens: int, n_rounds: int) -> dict[str, Any]:
    """Tokens/s of every loop in each of ``n_rounds`` consecutive runs of steps, and the ratio of every
    later loop to every earlier one per round (median, min, max): the spread of a ratio measured under
    the same load, which one total per loop does not show."""
    n = min(len(ts) for ts in step_s.values())
    bounds = [round(i * n / n_rounds) for i in range(n_rounds + 1)]
    tps = {name: [step_tokens * (b - a) / sum(ts[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
           for name, ts in step_s.items()}
    names = list(tps)
    ratios = {}
    for j, num in enumerate(names):
        for den in names[:j]:
            r = sorted(x / y for x, y in zip(tps[num], tps[den]))
            ratios[f"{num} / {den}"] = {"median": statistics.median(r), "min": r[0], "max": r[-1],
                                        "per_round": [x / y for x, y in zip(tps[num], tps[den])]}
    return {"tokens_per_s": tps, "ratios": ratios}


def main(argv: list[str] | None = None) -> None:
    from steptitan.device import DTYPES, compile_blocks, compute_dtype_name, configure_numerics
    from steptitan.distributed import init_distributed

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
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="FSDP2 param dtype, as training.dtype (auto: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block, as training.compile=true")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend, as training.compile_backend")
    ap.add_argument("--rounds", type=int, default=1,
                    help="split the timed steps into this many rounds: per-round tokens/s and ratios (the spread)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ab", default=None, metavar="RECIPE", help="alternate steps with steptitan's Trainer on this recipe")
    ap.add_argument("--override", action="append", default=[], help="recipe override for --ab (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="K=V[,K=V]",
                    help="with --ab: one Trainer per variant (its overrides on top of --override); repeatable")
    args = ap.parse_args(argv)

    env = init_distributed(args.backend)
    rank, world, device = env.rank, env.world_size, env.device
    configure_numerics(device, deterministic=False)  # as steptitan.train: TF32 on CUDA
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(args.seed)
    base = int(2 * (4 * args.dim) / 3)
    margs = TransformerModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                                 vocab_size=args.vocab, multiple_of=1, ffn_dim_multiplier=(args.ffn + 0.5) / base,
                                 max_seq_len=args.seq_len, attn_type="sdpa", depth_init=True)
    with torch.device("meta"):
        model = Transformer(margs)
    compute = DTYPES[compute_dtype_name(args.compute_dtype, device.type)]
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=env.mesh, mp_policy=mp)
    fully_shard(model, mesh=env.mesh, mp_policy=mp)
    if args.compile:
        compile_blocks(model, args.compile_backend)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (args.warmup + 1)) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))))

    tokens = np.memmap(args.tokens, dtype=args.dtype, mode="r")
    block = args.seq_len + 1
    n_blocks = len(tokens) // block
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(n_blocks)
    loss_val = float("nan")

    def bare_step(step: int) -> float:
        nonlocal loss_val
        sync()
        t = time.perf_counter()
        first = (step * world + rank) * args.batch
        idx = [order[(first + k) % n_blocks] for k in range(args.batch)]
        batch = torch.from_numpy(np.stack([tokens[i * block:(i + 1) * block].astype(np.int64) for i in idx])).to(device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        loss_val = loss.item()
        sync()
        return time.perf_counter() - t

    # The loops to time, by name: the bare one and one steptitan Trainer per variant (or one for --ab alone).
    loops = {"bare": bare_step}
    if args.ab:
        variants = args.variant or [""]
        for v in variants:
            extra = [kv for kv in v.split(",") if kv]
            loops[v or "steptitan"] = (lambda fn: lambda step: fn(step + 1))(build_steptitan(args.ab, args.override + extra))
    names = list(loops)
    step_s: dict[str, list[float]] = {name: [] for name in names}
    for step in range(args.steps):
        k = step % len(names)
        for name in names[k:] + names[:k]:  # the order rotates by one each step: no loop always runs first
            dt = loops[name](step)
            if step > 0:  # steady state (step 0 compiles): the same convention as steptitan's step_tokens_per_s
                step_s[name].append(dt)
    step_tokens = world * args.batch * args.seq_len
    tps = {name: step_tokens * len(ts) / sum(ts) if sum(ts) else 0.0 for name, ts in step_s.items()}
    rounds = per_round(step_s, step_tokens, args.rounds) if args.rounds > 1 else None

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    states = sum(local_bytes(p) for p in params) + sum(
        local_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    with open("/proc/self/status") as fh:
        rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    result = {"tokens_per_s": tps["bare"], "steps": args.steps, "compile": args.compile,
              "final_train_loss": loss_val, "rank": rank, "peak_rss_bytes": rss,
              # grads were freed by zero_grad; add them back (one fp32 grad per parameter)
              "model_state_bytes": states + sum(local_bytes(p) for p in params)}
    if args.ab:
        result["steptitan_tokens_per_s"] = tps[names[1]]
        if args.variant:
            result["variants"] = {name: tps[name] for name in names[1:]}
    if rounds is not None:
        result["rounds"] = rounds
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
