"""``steptitan plan`` (also ``tools/plan_stages.py``): the stage-split planner's command line.

It ranks every K-stage split of a target model by peak per-rank memory, writes
the best one as a recipe, or finds the largest model and schedule that fit a
per-device budget. The memory model it queries is steptitan/memory.py.
"""

from __future__ import annotations

from typing import Any, Sequence

from steptitan.memory import (
    PRECISIONS,
    OptimizerSpec,
    largest_fitting,
    layer_inventory,
    plan_splits,
    schedule_recipe,
    vanilla_memory,
)
from steptitan.model import ModelShape


def _parse_bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(float(t))


def _parse_value(raw: str) -> Any:
    from steptitan.recipe import parse_overrides

    return parse_overrides([f"v={raw}"])[0][1]


def plan_cli(argv: Sequence[str] | None = None) -> int:
    """``steptitan plan`` / ``tools/plan_stages.py``: best stage splits, a recipe, or the largest model for a budget."""
    import argparse
    from pathlib import Path

    from steptitan.metrics import fmt_bytes

    ap = argparse.ArgumentParser(prog="steptitan plan", description=(
        "Enumerate K-stage STEP splits of a target model and rank them by peak per-rank memory "
        "(steptitan/memory.py), write the chosen split as a recipe, or find the largest model that fits a budget."))
    ap.add_argument("--recipe", help="take the target shape (last stage) and training settings from this recipe")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12, help="target depth L")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ffn", type=int, default=None, help="SwiGLU hidden size (default: torchtitan's rule)")
    ap.add_argument("--tie-embeddings", action="store_true")
    ap.add_argument("--stages", "-K", type=int, default=3)
    ap.add_argument("--peft", default="lora", help="PEFT method on old layers, or 'none'")
    ap.add_argument("--peft-opt", action="append", default=[], metavar="KEY=VALUE", help="PEFT option (repeatable), e.g. rank=8")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="paper",
                    help="fp32 | bf16 (bf16 compute, fp32 master/grads/Adam, fp32 frozen) | paper (bf16 frozen)")
    ap.add_argument("--optimizer", choices=("adamw", "galore"), default="adamw")
    ap.add_argument("--galore-rank", type=int, default=128)
    ap.add_argument("--world-size", "-W", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per micro-batch (activation estimate)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--freeze-embeddings-after", type=int, default=None, metavar="STAGE",
                    help="freeze embeddings and LM head from this stage on (default: never)")
    ap.add_argument("--position", choices=("upper", "lower", "uniform"), default="upper")
    ap.add_argument("--objective", choices=("model_states", "total"), default="model_states",
                    help="rank by peak model states, or by model states + activations")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--write-recipe", metavar="PATH", help="write the chosen split as a recipe")
    ap.add_argument("--choose", type=int, default=1, help="which row of the table to write (1 = best)")
    ap.add_argument("--steps", default=None, help="comma-separated steps per stage for the written recipe")
    ap.add_argument("--budget", default=None, help="inverse mode: per-device bytes (e.g. 24GiB): largest model that fits")
    ap.add_argument("--dims", default="256,512,768,1024,1536,2048,2560,3072,4096", help="widths the inverse mode tries")
    ap.add_argument("--max-layers", type=int, default=96)
    args = ap.parse_args(argv)

    from steptitan.model import torchtitan_ffn_hidden

    precision = PRECISIONS[args.precision]
    if args.recipe:
        from steptitan.plan import build_plan
        from steptitan.recipe import load_recipe

        recipe = load_recipe(args.recipe)
        shape = build_plan(recipe)[-1].shape
        t = recipe.training
        args.batch, args.seq_len, args.checkpointing = t.batch_size, t.seq_len, t.activation_checkpointing
    else:
        shape = ModelShape(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads,
                           vocab_size=args.vocab, tie_embeddings=args.tie_embeddings, max_seq_len=args.seq_len,
                           ffn_hidden=args.ffn or torchtitan_ffn_hidden(args.dim, 256 if args.dim >= 1024 else 32, None))
    peft = None
    if args.peft != "none":
        peft = {"method": args.peft}
        for item in args.peft_opt:
            key, _, raw = item.partition("=")
            peft[key] = _parse_value(raw)
    optimizer = OptimizerSpec(args.optimizer, args.galore_rank)
    common = dict(world_size=args.world_size, precision=precision, optimizer=optimizer,
                  freeze_embeddings_after=args.freeze_embeddings_after, batch=args.batch, seq_len=args.seq_len,
                  checkpointing=args.checkpointing, position=args.position)
    where = (f"precision {args.precision}, optimizer {args.optimizer}, {args.world_size} rank(s), PEFT on old layers: "
             f"{peft or 'none'}, activations for batch {args.batch} x seq {args.seq_len}"
             f"{' with checkpointing' if args.checkpointing else ''}")

    if args.budget:
        budget = _parse_bytes(args.budget)
        dims = [int(d) for d in args.dims.split(",")]
        print(f"largest models whose best {args.stages}-stage split fits {fmt_bytes(budget)} per device "
              f"({'model states' if args.objective == 'model_states' else 'model states + activations'}); {where}")
        fits = largest_fitting(budget, shape, args.stages, peft, dims, args.max_layers,
                               objective=args.objective, **common)
        vanilla = largest_fitting(budget, shape, 1, None, dims, args.max_layers, objective=args.objective, **common)
        van_by_dim = {f.shape.dim: f for f in vanilla}
        print(f"{'dim':>6}{'layers':>8}{'params':>16}{'split':>22}{'peak':>12}   vanilla fits")
        for f in fits:
            v = van_by_dim.get(f.shape.dim)
            peak = f.split.peak_model_states if args.objective == "model_states" else f.split.peak_total
            print(f"{f.shape.dim:>6}{f.shape.n_layers:>8}{f.params:>16,}{str(list(f.split.layers)):>22}{fmt_bytes(peak):>12}"
                  f"   {f'{v.shape.n_layers} layers, {v.params:,} params' if v else 'nothing'}")
        if not fits:
            print("nothing fits: lower --stages' first stage, the vocabulary, or raise the budget")
            return 1
        best = fits[0]
        shape, chosen = best.shape, best.split
        print(f"largest: dim {shape.dim}, {shape.n_layers} layers, {best.params:,} parameters, split {list(chosen.layers)}")
    else:
        inv = layer_inventory(shape, peft)
        results = plan_splits(inv, args.stages, top=max(args.top, args.choose), objective=args.objective, **common)
        if not results:
            print(f"no split of {shape.n_layers} layers into {args.stages} stages")
            return 1
        van = vanilla_memory(inv, **common)
        print(f"target: dim {shape.dim}, {shape.n_layers} layers, vocab {shape.vocab_size}, {shape.num_params():,} params "
              f"(blocks {shape.n_layers * shape.layer_params() / shape.num_params():.0%}); P = {inv.layer_params:,} per block, "
              f"E(P) = {inv.adapter_params:,}; {where}")
        print(f"vanilla: peak model states {fmt_bytes(van.peak_model_states)}, + activations {fmt_bytes(van.peak_total)}")
        head = f"{'#':>3} {'split':<16}{'peak states':>12}{'vs vanilla':>11}{'+ acts':>11}   per stage: model states / trainable params"
        print(head)
        for k, r in enumerate(results[: max(args.top, args.choose)], 1):
            stages = "  ".join(f"{fmt_bytes(s['model_states'])}/{t:,}" for s, t in zip(r.per_stage, r.trainable))
            print(f"{k:>3} {str(list(r.layers)):<16}{fmt_bytes(r.peak_model_states):>12}"
                  f"{r.peak_model_states / van.peak_model_states:>10.3f}x{fmt_bytes(r.peak_total):>11}   {stages}")
        chosen = results[args.choose - 1]
    if args.write_recipe:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else None
        if steps is not None and len(steps) != len(chosen.layers):
            raise SystemExit(f"--steps needs {len(chosen.layers)} values, got {len(steps)}")
        text = schedule_recipe(shape, chosen.layers, peft, name=Path(args.write_recipe).stem, steps=steps,
                               position=args.position, precision=precision,
                               freeze_embeddings_after=args.freeze_embeddings_after,
                               extra={"batch_size": args.batch, "seq_len": args.seq_len,
                                      "activation_checkpointing": args.checkpointing})
        Path(args.write_recipe).write_text(text)
        print(f"wrote {args.write_recipe} (split {list(chosen.layers)})")
    return 0
