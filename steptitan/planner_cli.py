"""``steptitan plan``: the command line of the stage-split planner (steptitan/planner.py).

Every setting that changes the answer is echoed before the table (stage count, precision,
optimizers, ranks, PEFT and its options, embedding freezing and its adapters, the activation
batch), and the columns are explained under it. With ``--recipe`` the target shape and those
settings come from the recipe (an explicit flag still wins), and what the planner cannot use
from the recipe is listed, so a number is never silently about another configuration.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from steptitan.inventory import PRECISIONS, Precision

if TYPE_CHECKING:  # the model stack (torch, torchtitan) is imported in plan_cli: `--help` needs none of it
    from steptitan.memory import OptimizerSpec
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


def _layout(args: Any, recipe_parallel: Any = None) -> tuple[int, int]:
    """(dp_replicate, dp_shard) from --dp-replicate / --dp-shard / --world-size (or the --recipe's
    [parallel]); sets ``args.world_size`` when it was left out. SystemExit on a bad layout."""
    from steptitan.recipe import ParallelConfig, RecipeError, parallel_degrees

    base = recipe_parallel or ParallelConfig()
    r = args.dp_replicate if args.dp_replicate is not None else base.dp_replicate
    s = args.dp_shard if args.dp_shard is not None else base.dp_shard
    if args.world_size is None:
        args.world_size = r * s if r > 0 and s > 0 else 1
    try:
        return parallel_degrees(ParallelConfig(r, s), args.world_size, "--world-size")
    except RecipeError as exc:
        raise SystemExit(f"steptitan plan: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="steptitan plan", allow_abbrev=False, description=(
        "Enumerate K-stage STEP splits of a target model and rank them by peak per-rank memory "
        "(steptitan/memory.py), write the chosen split as a recipe, or find the largest model that fits a budget."))
    ap.add_argument("--recipe", help="take the target shape (last stage), stage count, PEFT, precision, optimizers, "
                                     "embedding freezing and batch from this recipe (explicit flags still win)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12, help="target depth L")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ffn", type=int, default=None, help="SwiGLU hidden size (default: torchtitan's rule)")
    ap.add_argument("--tie-embeddings", action="store_true",
                    help="one tensor for embedding table and LM head (model.tie_embeddings), counted once")
    ap.add_argument("--stages", "-K", type=int, default=None, help="stages K (default 3, or the --recipe's)")
    ap.add_argument("--peft", default=None, help="PEFT method on old layers, or 'none' (default lora, or the --recipe's)")
    ap.add_argument("--peft-opt", action="append", default=[], metavar="KEY=VALUE", help="PEFT option (repeatable), e.g. rank=8")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                    help="fp32 | bf16 (bf16 compute, fp32 master/grads/Adam, fp32 frozen) | paper (bf16 frozen); "
                         "default paper, or the --recipe's training.dtype / frozen_dtype")
    ap.add_argument("--optim", action="append", default=[], metavar="GROUP=OPTIMIZER",
                    help="optimizer of a parameter group (repeatable; docs/optimizers.md): default | old | new | "
                         "embeddings | head | adapters = a registered optimizer, or a table with options, e.g. "
                         "--optim embeddings=adam_mini --optim 'default={name: galore, rank: 64}'")
    ap.add_argument("--optimizer", choices=("adamw", "galore"), default="adamw", help="old form of --optim default=NAME")
    ap.add_argument("--galore-rank", type=int, default=128, help="with --optimizer galore")
    ap.add_argument("--world-size", "-W", type=int, default=None,
                    help="ranks in the job (default: --dp-replicate x --dp-shard, else 1)")
    ap.add_argument("--dp-replicate", type=int, default=None,
                    help="HSDP replicas (parallel.dp_replicate; -1 = fill); default 1, or the --recipe's")
    ap.add_argument("--dp-shard", type=int, default=None,
                    help="ranks each parameter is sharded over (parallel.dp_shard; -1 = fill, the default); "
                         "per-rank bytes follow this, not the world size")
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per micro-batch (activation estimate)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    ap.add_argument("--freeze-embeddings-after", type=int, default=None, metavar="STAGE",
                    help="freeze embeddings and LM head from this stage on (default: never)")
    ap.add_argument("--embed-lora-rank", type=int, default=0, metavar="R",
                    help="from --freeze-embeddings-after on, put rank-R LoRA adapters on the frozen embedding and "
                         "LM head (PEFT lora_embed; one shared adapter when tied); 0 = none")
    ap.add_argument("--embed-lora-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="lora_embed option (repeatable), e.g. alpha=32 or 'targets=[head]'")
    ap.add_argument("--position", choices=("upper", "lower", "uniform"), default=None,
                    help="where new layers go (activation estimate and the written recipe); default upper, or the --recipe's")
    ap.add_argument("--objective", choices=("model_states", "total"), default="model_states",
                    help="rank by peak model states, or by model states + activations")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--write-recipe", metavar="PATH", help="write the chosen split as a recipe")
    ap.add_argument("--choose", type=int, default=1, help="which row of the table to write (1 = best)")
    ap.add_argument("--steps", default=None, help="comma-separated steps per stage for the written recipe")
    ap.add_argument("--budget", default=None, help="inverse mode: per-device bytes (e.g. 24GiB): largest model that fits")
    ap.add_argument("--dims", default="256,512,768,1024,1536,2048,2560,3072,4096", help="widths the inverse mode tries")
    ap.add_argument("--max-layers", type=int, default=96)
    return ap


def _given(ap: argparse.ArgumentParser, argv: Sequence[str], dest: str) -> bool:
    """Was the option with ``dest`` written on the command line (``--x v``, ``--x=v``, ``-Kv``)?"""
    opts = next(a.option_strings for a in ap._actions if a.dest == dest)
    return any(arg == o or arg.startswith(o + "=") or (len(o) == 2 and arg.startswith(o) and not arg.startswith("--"))
               for arg in argv for o in opts)


def _options(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in ("method", "layers")}


def from_recipe(args: argparse.Namespace, given: set[str]) -> tuple[ModelShape, Any, list[str], list[str]]:
    """Fill the planner's settings from ``args.recipe`` where no flag was given.

    Returns (target shape, the recipe's parallel table, what was taken, what was ignored)."""
    from steptitan.optim import legacy_assignment
    from steptitan.plan import build_plan
    from steptitan.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    plans = build_plan(recipe)
    shape, t = plans[-1].shape, recipe.training
    used = [f"target shape (stage {len(plans) - 1}: dim {shape.dim}, {shape.n_layers} layers)"]
    ignored = ["steps, learning rates and data (memory does not depend on them)",
               "the recipe's own split (the planner searches every split; the recipe's is marked *)"]
    args.batch, args.seq_len, args.checkpointing = t.batch_size, t.seq_len, t.activation_checkpointing
    used.append("batch, seq_len, activation_checkpointing")
    if "stages" not in given:
        args.stages = len(plans)
        used.append(f"stage count ({len(plans)})")
    if "precision" not in given:
        args.precision_obj = Precision.from_training(t)
        used.append(f"precision (training.dtype {t.dtype}, frozen_dtype {t.frozen_dtype})")
    if "optim" not in given and "optimizer" not in given:
        args.assignment = {**legacy_assignment(t), **t.optim}
        used.append("run-wide optimizers (training.optim)")
    if any(s.optim for s in recipe.stages):
        ignored.append("per-stage optim tables (the planner uses one assignment for every stage)")
    peft_stages = [(i, s.peft) for i, s in enumerate(recipe.stages) if s.peft]
    old = [(i, p) for i, p in peft_stages if p.get("layers", "all") == "old"]
    args.peft_spec = {"method": old[0][1]["method"], **_options(old[0][1])} if old else None
    if "peft" not in given:
        used.append(f"PEFT on old layers (stage {old[0][0]})" if old else "PEFT: none (no stage adapts its old layers)")
    for i, p in peft_stages:
        if p.get("layers", "all") != "old":
            ignored.append(f"stages.{i}.peft on {p.get('layers', 'all')} layers (the planner adapts old layers only)")
        elif {**p, "layers": "old"} != {**old[0][1], "layers": "old"}:
            ignored.append(f"stages.{i}.peft differs from stage {old[0][0]}'s (the planner uses one PEFT for every stage)")
    for i, s in enumerate(recipe.stages):
        for k, e in enumerate(s.extra_peft):
            if e.get("method") != "lora_embed":
                ignored.append(f"stages.{i}.extra_peft.{k} ({e.get('method')} on {e.get('layers', 'all')} layers)")
    froze = [i for i, s in enumerate(recipe.stages) if "embeddings" in s.freeze or "head" in s.freeze]
    if "freeze_embeddings_after" not in given and "embed_lora_rank" not in given and "embed_lora_opt" not in given:
        args.freeze_embeddings_after = froze[0] if froze else None
        used.append(f"embeddings/head frozen from stage {froze[0]}" if froze else "embeddings/head trained in every stage")
        emb = [e for e in (recipe.stages[froze[0]].extra_peft if froze else []) if e.get("method") == "lora_embed"]
        args.embed_spec = {"method": "lora_embed", **_options(emb[0])} if emb else None
        if emb:
            used.append(f"lora_embed adapters of stage {froze[0]}")
    for i in froze:
        if set(recipe.stages[i].freeze) & {"embeddings", "head"} != {"embeddings", "head"}:
            ignored.append(f"stages.{i} freezes only one of embeddings/head (the planner freezes both)")
    if froze and any(i not in froze for i in range(froze[0], len(plans))):
        ignored.append("stages that train embeddings/head again after freezing them")
    growth = {s.growth.get("name") for s in recipe.stages if s.growth}
    if growth - {"interpolate"}:
        ignored.append(f"growth {', '.join(sorted(growth - {'interpolate'}))} (the planner adds layers as interpolate does)")
    if "position" not in given:
        pos = [s.growth.get("position") for s in recipe.stages if s.growth.get("name") == "interpolate" and s.growth.get("position")]
        args.position = pos[0] if pos else "upper"
    if any(p.shape.dim != shape.dim for p in plans):
        ignored.append("width growth (the planner grows depth only, at the final width)")
    layers = [plans[0].shape.n_layers] + [b.shape.n_layers - a.shape.n_layers for a, b in zip(plans, plans[1:])]
    args.recipe_split = tuple(layers) if all(n > 0 for n in layers) and len(layers) == args.stages else None
    return shape, recipe.parallel, used, ignored


def settings_lines(args: argparse.Namespace, shape: ModelShape, precision: Precision, optimizer: OptimizerSpec,
                   peft: dict | None, embed_peft: dict | None, replicate: int, shard: int) -> list[str]:
    names = optimizer.names()
    optim_text = (names["old"] if len(set(names.values())) == 1 else ", ".join(f"{g} {n}" for g, n in names.items()))
    peft_text = (f"{peft['method']} " + " ".join(f"{k}={v}" for k, v in _options(peft).items())).strip() if peft else "none"
    emb = ("trained in every stage" if args.freeze_embeddings_after is None else
           f"frozen from stage {args.freeze_embeddings_after}"
           + (f" with {embed_peft['method']} " + " ".join(f"{k}={v}" for k, v in _options(embed_peft).items())
              if embed_peft else ", no adapters"))
    ranks = (f"{args.world_size} as {replicate} x {shard} HSDP (replicate x shard; bytes per rank follow the "
             f"{shard}-way sharding)" if replicate > 1 else f"{args.world_size} (each parameter sharded {shard} way(s))")
    return [
        "settings (each changes the answer; flags, or --recipe):",
        f"  stages: {args.stages}; new layers inserted: {args.position}; ranked by: "
        f"{'peak model states' if args.objective == 'model_states' else 'peak model states + activations'}",
        f"  precision: {precision.name} ({precision.compute} compute, {precision.frozen} frozen weights; trainable "
        f"weights, gradients and optimizer state fp32)",
        f"  optimizer: {optim_text}",
        f"  ranks: {ranks}",
        f"  PEFT on old layers: {peft_text}",
        f"  embeddings/head{' (tied)' if shape.tie_embeddings else ''}: {emb}",
        f"  activations: batch {args.batch} x seq {args.seq_len} per rank, "
        f"{'with' if args.checkpointing else 'no'} activation checkpointing",
    ]


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=110, subsequent_indent="    ", break_on_hyphens=False)


def _spec(method: str, rank_flag: int, opts: list[str], default_rank: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"method": method, **({"rank": rank_flag or default_rank} if default_rank else {})}
    for item in opts:
        key, _, raw = item.partition("=")
        spec[key] = _parse_value(raw)
    return spec


def plan_cli(argv: Sequence[str] | None = None) -> int:
    """``steptitan plan``: best stage splits, a recipe, or the largest model for a budget."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    # The model stack (torch, torchtitan) only once the arguments parsed: `--help` and a bad flag need none of it.
    from steptitan.memory import OptimizerSpec
    from steptitan.metrics import fmt_bytes
    from steptitan.model import ModelShape, torchtitan_ffn_hidden
    from steptitan.optim import resolve_assignment
    from steptitan.plan import format_table
    from steptitan.planner import largest_fitting, layer_inventory, plan_splits, schedule_recipe, split_memory, vanilla_memory
    from steptitan.recipe import RecipeError

    given = {a.dest for a in ap._actions if a.option_strings and _given(ap, argv, a.dest)}
    args.precision_obj = args.assignment = args.peft_spec = args.embed_spec = args.recipe_split = None
    recipe_parallel, used, ignored = None, [], []
    if args.recipe:
        try:
            shape, recipe_parallel, used, ignored = from_recipe(args, given)
        except RecipeError as exc:
            raise SystemExit(f"steptitan plan: --recipe {args.recipe}: {exc}") from None
    else:
        shape = ModelShape(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads,
                           vocab_size=args.vocab, tie_embeddings=args.tie_embeddings, max_seq_len=args.seq_len,
                           ffn_hidden=args.ffn or torchtitan_ffn_hidden(args.dim, 256 if args.dim >= 1024 else 32, None))
    args.stages = args.stages or 3
    args.position = args.position or "upper"
    precision = args.precision_obj or PRECISIONS[args.precision or "paper"]
    # PEFT: --peft replaces the method (and its options), --peft-opt sets options on top of the recipe's or lora's
    base = args.peft_spec if args.recipe and "peft" not in given else (
        None if args.peft == "none" else {"method": args.peft or "lora"})
    peft = {**base, **_spec(base["method"], 0, args.peft_opt)} if base else None

    if args.embed_lora_rank < 0:
        raise SystemExit(f"--embed-lora-rank must be >= 0, got {args.embed_lora_rank}")
    embed_peft = args.embed_spec
    if args.embed_lora_rank or args.embed_lora_opt:
        if args.freeze_embeddings_after is None:
            raise SystemExit("--embed-lora-rank puts adapters on the embeddings and LM head once they are frozen: "
                             "also pass --freeze-embeddings-after STAGE (e.g. 1: trained in stage 0, adapted after)")
        embed_peft = _spec("lora_embed", args.embed_lora_rank, args.embed_lora_opt, default_rank=16)
    if args.freeze_embeddings_after is not None and args.freeze_embeddings_after < 0:
        raise SystemExit(f"--freeze-embeddings-after must be a stage index >= 0, got {args.freeze_embeddings_after}")

    assignment: dict[str, Any] = dict(args.assignment or {})
    if args.optimizer == "galore":
        assignment["default"] = {"name": "galore", "rank": args.galore_rank}
    for item in args.optim:
        group, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--optim {item!r}: expected GROUP=OPTIMIZER, e.g. embeddings=adam_mini")
        assignment[group.strip()] = _parse_value(raw)
    try:
        optimizer = OptimizerSpec.of(resolve_assignment([(assignment, "--optim")], shape))
    except RecipeError as exc:
        raise SystemExit(f"steptitan plan: {exc}") from None
    replicate, shard = _layout(args, recipe_parallel)
    common = dict(world_size=shard, precision=precision, optimizer=optimizer,
                  freeze_embeddings_after=args.freeze_embeddings_after, batch=args.batch, seq_len=args.seq_len,
                  checkpointing=args.checkpointing, position=args.position)
    vanilla_common = {**common, "freeze_embeddings_after": None}  # vanilla trains everything
    settings = settings_lines(args, shape, precision, optimizer, peft, embed_peft, replicate, shard)
    if args.recipe:
        settings += [_wrap(f"from --recipe {args.recipe}: {'; '.join(used)}"),
                     _wrap(f"not used from --recipe: {'; '.join(ignored)}")]
        overridden = sorted(given & {"stages", "precision", "optim", "optimizer", "peft", "peft_opt", "position",
                                     "freeze_embeddings_after", "embed_lora_rank", "embed_lora_opt"})
        if overridden:
            settings.append(f"flags over the recipe: {', '.join('--' + g.replace('_', '-') for g in overridden)}")

    if args.budget:
        budget = _parse_bytes(args.budget)
        dims = [int(d) for d in args.dims.split(",")]
        print(f"largest models whose best {args.stages}-stage split fits {fmt_bytes(budget)} per device "
              f"({'model states' if args.objective == 'model_states' else 'model states + activations'})")
        print("\n".join(settings))
        try:
            fits = largest_fitting(budget, shape, args.stages, peft, dims, args.max_layers,
                                   objective=args.objective, embed_peft=embed_peft, **common)
        except ValueError as exc:
            raise SystemExit(f"steptitan plan: {exc}") from None
        vanilla = largest_fitting(budget, shape, 1, None, dims, args.max_layers, objective=args.objective, **vanilla_common)
        van_by_dim = {f.shape.dim: f for f in vanilla}
        rows = []
        for f in fits:
            v = van_by_dim.get(f.shape.dim)
            peak = f.split.peak_model_states if args.objective == "model_states" else f.split.peak_total
            rows.append([str(f.shape.dim), str(f.shape.n_layers), f"{f.params:,}", str(list(f.split.layers)),
                         fmt_bytes(peak), f"{v.shape.n_layers} layers, {v.params:,} params" if v else "nothing"])
        print("\n".join(format_table(["dim", "layers", "params", "split", "peak", "vanilla fits"], rows, right={0, 1, 2, 4})))
        print()
        print(_wrap("split = new layers per stage (stage 0 = the first model); peak = the largest per-rank "
                    f"{'model states' if args.objective == 'model_states' else 'model states + activations'} over the "
                    "stages; vanilla fits = the deepest model of that width trained in full from the start"))
        if not fits:
            print("nothing fits: lower --stages' first stage, the vocabulary, or raise the budget")
            return 1
        best = fits[0]
        shape, chosen = best.shape, best.split
        print(f"largest: dim {shape.dim}, {shape.n_layers} layers, {best.params:,} parameters, split {list(chosen.layers)}")
    else:
        try:
            inv = layer_inventory(shape, peft, embed_peft)
        except ValueError as exc:  # e.g. lora_embed targets one use of a tied pair
            raise SystemExit(f"steptitan plan: {exc}") from None
        results = plan_splits(inv, args.stages, top=max(args.top, args.choose), objective=args.objective, **common)
        if not results:
            print(f"no split of {shape.n_layers} layers into {args.stages} stages")
            return 1
        van = vanilla_memory(inv, **vanilla_common)
        print(f"target: dim {shape.dim}, {shape.n_layers} layers, vocab {shape.vocab_size}, {shape.num_params():,} params "
              f"(blocks {shape.n_layers * shape.layer_params() / shape.num_params():.0%}); P = {inv.layer_params:,} "
              f"parameters per block; E(P) = {inv.adapter_params:,} trainable adapter (PEFT) parameters per frozen old block")
        print("\n".join(settings))
        print(f"vanilla (all {shape.n_layers} layers trained from the start): peak model states "
              f"{fmt_bytes(van.peak_model_states)}, + activations {fmt_bytes(van.peak_total)}")
        rows = []
        shown = results[: max(args.top, args.choose)]
        if args.recipe_split and args.recipe_split not in [r.layers for r in shown]:
            shown = shown + [split_memory(inv, args.recipe_split, **common)]
        for k, r in enumerate(shown, 1):
            label = ("-" if k > len(results[: max(args.top, args.choose)]) else str(k)) + (
                "*" if r.layers == args.recipe_split else "")
            rows.append([label, str(list(r.layers)), fmt_bytes(r.peak_model_states),
                         f"{r.peak_model_states / van.peak_model_states:.3f}x", fmt_bytes(r.peak_total),
                         " | ".join(f"{fmt_bytes(s['model_states'])}/{t:,}" for s, t in zip(r.per_stage, r.trainable))])
        print("\n".join(format_table(["#", "split", "peak states", "vs vanilla", "+ acts",
                                      "per stage: model states / trainable params"], rows, right={0, 2, 3, 4})))
        print()
        if args.recipe_split:
            print(f"* = the recipe's own split {list(args.recipe_split)}")
        print(_wrap("split = new layers per stage (stage 0 = the first model); peak states = the largest per-rank "
                    "model states (params + grads + optimizer state) over the stages; vs vanilla = peak states / "
                    "vanilla's; + acts = the largest model states + estimated activations"))
        chosen = results[args.choose - 1]
    if args.write_recipe:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else None
        if steps is not None and len(steps) != len(chosen.layers):
            raise SystemExit(f"--steps needs {len(chosen.layers)} values, got {len(steps)}")
        text = schedule_recipe(shape, chosen.layers, peft, name=Path(args.write_recipe).stem, steps=steps,
                               position=args.position, precision=precision,
                               freeze_embeddings_after=args.freeze_embeddings_after, embed_peft=embed_peft,
                               extra={"batch_size": args.batch, "seq_len": args.seq_len,
                                      "activation_checkpointing": args.checkpointing,
                                      **({"optim": assignment} if assignment else {})},
                               parallel={"dp_replicate": replicate, "dp_shard": shard} if replicate > 1 else None)
        Path(args.write_recipe).write_text(text)
        print(f"wrote {args.write_recipe} (split {list(chosen.layers)})")
    return 0
