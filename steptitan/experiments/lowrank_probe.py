"""GaLore/Fira's step on dim-0 sharded weights: steptitan's sharded step next to the package's on DTensors.

    torchrun --nproc_per_node=2 -m steptitan.experiments.lowrank_probe --optimizer fira --dim 256 \
        --ffn 688 --layers 2 --rank 64 --steps 6 --gap 3

Builds the block linears of ``--layers`` llama blocks (wq, wk, wv, wo: dim x dim; w1, w3: ffn x dim;
w2: dim x ffn) as DTensors sharded on dim 0, and runs the same steps (same random gradients) with the
package's optimizer (``GaLoreAdamW`` / ``FiraAdamW`` straight on the DTensors: what steptitan ran before
issue 23, item 5) and with the plugin's (``steptitan.lowrank.ProjectedAdamW``), alternating step by
step so both see the same machine load. Prints one JSON line per rank: SVD calls, median seconds of
a refresh step and of a plain step per implementation, and the largest difference of the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist


def _svd_counter() -> tuple[list[int], Any]:
    calls = [0]
    svd = torch.linalg.svd

    def counted(*args, **kwargs):
        calls[0] += 1
        return svd(*args, **kwargs)

    return calls, counted


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", choices=("galore", "fira"), default="galore")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64, help="projection rank")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--gap", type=int, default=3, help="update_proj_gap")
    args = ap.parse_args(argv)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from steptitan.distributed import init_distributed, shutdown_distributed
    from steptitan.optim import OptimizerHParams
    from steptitan.registry import OPTIM

    env = init_distributed("gloo")
    mesh = init_device_mesh("cpu", (env.world_size,))
    d, f = args.dim, args.ffn
    block = {"attention.wq": (d, d), "attention.wk": (d, d), "attention.wv": (d, d), "attention.wo": (d, d),
             "feed_forward.w1": (f, d), "feed_forward.w2": (d, f), "feed_forward.w3": (f, d)}
    shapes = {f"layers.{k}.{n}.weight": s for k in range(args.layers) for n, s in block.items()}
    gen = torch.Generator().manual_seed(0)
    init = {n: torch.randn(s, generator=gen) * s[1] ** -0.5 for n, s in shapes.items()}
    cls = OPTIM.get(args.optimizer)
    plugin = cls(cls.Options(rank=args.rank, update_proj_gap=args.gap))
    hparams = OptimizerHParams(1e-3, (0.9, 0.999), 1e-8, 0.0)
    impls: dict[str, dict[str, Any]] = {}
    for impl in ("package", "steptitan"):
        params = {n: torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for n, t in init.items()}
        if impl == "steptitan":
            opt = plugin.build(list(params.items()), hparams)
        else:
            from fira import FiraAdamW
            from galore_torch import GaLoreAdamW

            package = FiraAdamW if args.optimizer == "fira" else GaLoreAdamW
            group = {"params": list(params.values()), **plugin.projection_options()}
            opt = package([group], lr=hparams.lr, betas=hparams.betas, eps=hparams.eps, weight_decay=0.0,
                          no_deprecation_warning=True)
        impls[impl] = {"params": params, "opt": opt, "refresh_s": [], "plain_s": [], "svd_calls": 0}
    calls, counted = _svd_counter()
    svd = torch.linalg.svd
    for step in range(args.steps):
        grads = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
        order = ("package", "steptitan") if step % 2 == 0 else ("steptitan", "package")
        for impl in order:
            run = impls[impl]
            for n, p in run["params"].items():
                p.grad = distribute_tensor(grads[n], mesh, [Shard(0)])
            calls[0] = 0
            torch.linalg.svd = counted
            dist.barrier()
            start = time.perf_counter()
            run["opt"].step()
            dist.barrier()
            elapsed = time.perf_counter() - start
            torch.linalg.svd = svd
            run["svd_calls"] += calls[0]
            run["refresh_s" if step % args.gap == 0 else "plain_s"].append(elapsed)
    diff = max((impls["package"]["params"][n].full_tensor() - impls["steptitan"]["params"][n].full_tensor()).abs().max().item()
               for n in shapes)
    out = {"rank": env.rank, "world_size": env.world_size, "optimizer": args.optimizer, "weights": len(shapes),
           "max_abs_weight_diff": diff}
    for impl, run in impls.items():
        out[impl] = {"svd_calls": run["svd_calls"], "refresh_step_s": statistics.median(run["refresh_s"]),
                     "plain_step_s": statistics.median(run["plain_s"]) if run["plain_s"] else None}
    print(json.dumps(out), flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
