"""The stage-split planner: search how L layers split over K stages, by peak per-rank memory.

``plan_splits`` enumerates every K-stage split of a target model and ranks the
splits by their peak per-rank bytes, using per-layer inventories built once
from meta models (``layer_inventory``); ``largest_fitting`` answers the inverse
question (the largest model whose best split fits a budget); ``schedule_recipe``
writes a split as a recipe; ``plan_cli`` is ``steptitan plan``. The bytes come
from steptitan/memory.py and the activation estimate from steptitan/flops.py.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import tomli_w

from steptitan.flops import activation_bytes
from steptitan.memory import (
    MEMORY_KEYS,
    PRECISIONS,
    OptimizerSpec,
    ParamSpec,
    Precision,
    model_state_bytes,
    param_specs,
)
from steptitan.model import ModelShape, base_param_names, build_model

# --------------------------------------------------------------------------- split search


@dataclass
class LayerInventory:
    """Parameters of the model pieces a split is made of, from meta models of the target shape.

    ``new``: a fully trainable block; ``old``: a carried block with the stage's
    PEFT applied and its dense weights frozen; ``emb_trainable`` / ``emb_frozen``:
    embeddings + final norm + LM head (a tied pair once), trained or frozen; when
    frozen they carry the ``embed_peft`` adapters (``lora_embed``), if any."""

    shape: ModelShape
    new: list[ParamSpec]
    old: list[ParamSpec]
    emb_trainable: list[ParamSpec]
    emb_frozen: list[ParamSpec]
    peft_name: str = "none"
    embed_peft: dict[str, Any] | None = None  # e.g. {"method": "lora_embed", "rank": 16}: adapters of frozen emb/head

    @property
    def layer_params(self) -> int:
        return sum(math.prod(s.shape) for s in self.new)

    @property
    def adapter_params(self) -> int:
        return sum(math.prod(s.shape) for s in self.old if s.trainable)


def _peft_instance(peft: dict[str, Any] | None, layers: list[int], seed: int = 0):
    if not peft:
        return None
    from steptitan.recipe import options_from_dict
    from steptitan.registry import PEFT

    cls = PEFT.get(peft["method"])
    opts = options_from_dict(cls.Options, {k: v for k, v in peft.items() if k not in ("method", "layers")}, "peft")
    return cls(opts, layers, seed=seed)


def layer_inventory(shape: ModelShape, peft: dict[str, Any] | None = None,
                    embed_peft: dict[str, Any] | None = None) -> LayerInventory:
    """Build the per-piece inventories once (a 1-block meta model with and without the PEFT).

    ``embed_peft``: a PEFT method for the frozen embeddings/head (``lora_embed``); its
    adapters join ``emb_frozen``, as a stage that freezes them and adds it builds."""
    one = shape.replace(n_layers=1)
    base = base_param_names(one)
    model = build_model(one)
    new = [s for s in param_specs(model, set(), base) if s.name.startswith("layers.")]
    emb = [s for s in param_specs(model, set(), base) if not s.name.startswith("layers.")]
    old_model = build_model(one)
    method = _peft_instance(peft, [0])
    if method is not None:
        method.apply(old_model)
    for name, p in old_model.named_parameters():
        if name in base and name.startswith("layers."):
            p.requires_grad_(False)
    old = [s for s in param_specs(old_model, {0}, base) if s.name.startswith("layers.")]
    frozen_emb = [ParamSpec(s.name, s.shape, False, s.group) for s in emb]
    emb_method = _peft_instance(embed_peft, [0])
    if emb_method is not None:
        emb_model = build_model(one)
        emb_method.apply(emb_model)
        for name, p in emb_model.named_parameters():
            if name in base and not name.startswith("layers."):  # the stage's freeze = [..., "embeddings", "head"]
                p.requires_grad_(False)
        frozen_emb = [s for s in param_specs(emb_model, set(), base) if not s.name.startswith("layers.")]
    return LayerInventory(shape, new, old, emb, frozen_emb, peft["method"] if peft else "none", embed_peft)


@dataclass
class SplitResult:
    layers: tuple[int, ...]  # n_i: layers added per stage (stage 0 = the first model)
    per_stage: list[dict[str, int]]  # rank-0 (largest shard) model-state bytes per stage
    trainable: list[int]
    activations: list[int]

    @property
    def peak_model_states(self) -> int:
        return max(s["model_states"] for s in self.per_stage)

    @property
    def peak_total(self) -> int:
        return max(s["model_states"] + a for s, a in zip(self.per_stage, self.activations))


def compositions(total: int, parts: int, min_part: int = 1) -> Iterable[tuple[int, ...]]:
    """Every ordered split of ``total`` into ``parts`` parts of at least ``min_part``."""
    if parts == 1:
        if total >= min_part:
            yield (total,)
        return
    for cuts in itertools.combinations(range(1, total), parts - 1):
        sizes = [b - a for a, b in zip((0,) + cuts, cuts + (total,))]
        if all(s >= min_part for s in sizes):
            yield tuple(sizes)


def split_memory(inv: LayerInventory, layers: Sequence[int], world_size: int = 1,
                 precision: Precision = Precision(), optimizer: OptimizerSpec = OptimizerSpec(),
                 freeze_embeddings_after: int | None = None, batch: int = 8, seq_len: int = 128,
                 checkpointing: bool = False, position: str = "upper") -> SplitResult:
    """Per-stage rank-0 bytes of one split. Stage i trains n_i new blocks and carries
    N_{i-1} old blocks with the PEFT (exactly what the recipe ``schedule_recipe`` writes builds).

    Rank 0 always holds the largest dim-0 chunk, so its bytes are the peak.
    ``freeze_embeddings_after``: stage index from which embeddings and head are frozen (None = never)."""
    per_stage, trainable, acts = [], [], []
    n_old = 0
    for i, n_new in enumerate(layers):
        frozen_emb = freeze_embeddings_after is not None and i >= freeze_embeddings_after
        emb = inv.emb_frozen if frozen_emb else inv.emb_trainable
        totals = dict.fromkeys(MEMORY_KEYS, 0)
        for specs, copies in ((inv.new, n_new), (inv.old, n_old), (emb, 1)):
            if copies == 0:
                continue
            one = model_state_bytes(specs, world_size, 0, precision, optimizer)
            for k in MEMORY_KEYS:
                totals[k] += copies * one[k]
        per_stage.append(totals)
        trainable.append(n_new * inv.layer_params + n_old * inv.adapter_params
                         + sum(math.prod(s.shape) for s in emb if s.trainable))
        shape = inv.shape.replace(n_layers=n_new + n_old)
        if any(s.trainable and s.name.startswith("tok_embeddings") for s in emb):
            first = 0  # a trainable embedding (or its adapter) needs gradients through every block
        elif n_old and inv.adapter_params:
            first = 0  # adapters on the bottom old block
        else:  # new blocks only: upper insertion puts them on top of the old ones
            first = n_old if position == "upper" else 0
        local_batch = batch
        acts.append(activation_bytes(shape, local_batch, seq_len, precision, checkpointing, first))
        n_old += n_new
    return SplitResult(tuple(layers), per_stage, trainable, acts)


def plan_splits(inv: LayerInventory, n_stages: int, top: int = 5, objective: str = "model_states",
                **kwargs) -> list[SplitResult]:
    """The ``top`` splits of ``inv.shape.n_layers`` into ``n_stages`` with the smallest peak.

    Ties are broken toward more layers in the first stage (more full-rank training)."""
    results = [split_memory(inv, split, **kwargs) for split in compositions(inv.shape.n_layers, n_stages)]
    key = (lambda r: (r.peak_model_states, -r.layers[0])) if objective == "model_states" else (
        lambda r: (r.peak_total, -r.layers[0]))
    return sorted(results, key=key)[:top]


def vanilla_memory(inv: LayerInventory, **kwargs) -> SplitResult:
    return split_memory(inv, (inv.shape.n_layers,), **kwargs)


@dataclass
class FitResult:
    shape: ModelShape
    params: int
    split: SplitResult | None


def largest_fitting(budget_bytes: int, base: ModelShape, n_stages: int, peft: dict[str, Any] | None,
                    dims: Sequence[int], max_layers: int = 128, head_dim: int = 64, objective: str = "total",
                    embed_peft: dict[str, Any] | None = None, **kwargs) -> list[FitResult]:
    """For each width in ``dims``, the deepest model whose best ``n_stages`` split fits the budget.

    Peak per-rank bytes grow with depth for any fixed stage count, so a binary
    search over L finds the limit. Returns one result per width, largest model first."""
    from steptitan.model import torchtitan_ffn_hidden

    out = []
    for dim in dims:
        heads = max(1, dim // head_dim)
        shape = base.replace(dim=dim, n_heads=heads, n_kv_heads=heads,
                             ffn_hidden=torchtitan_ffn_hidden(dim, 256 if dim >= 1024 else 32, None))
        inv = layer_inventory(shape.replace(n_layers=n_stages), peft, embed_peft)

        def best(L: int) -> SplitResult | None:
            if L < n_stages:
                return None
            inv_l = LayerInventory(shape.replace(n_layers=L), inv.new, inv.old, inv.emb_trainable, inv.emb_frozen,
                                   inv.peft_name, inv.embed_peft)
            res = plan_splits(inv_l, n_stages, top=1, objective="model_states" if objective == "model_states" else "total", **kwargs)
            return res[0] if res else None

        def fits(r: SplitResult | None) -> bool:
            return r is not None and (r.peak_model_states if objective == "model_states" else r.peak_total) <= budget_bytes

        lo, hi = n_stages - 1, max_layers
        if not fits(best(n_stages)):
            continue
        lo = n_stages
        while lo < hi:  # largest L with fits(best(L))
            mid = (lo + hi + 1) // 2
            if fits(best(mid)):
                lo = mid
            else:
                hi = mid - 1
        final = shape.replace(n_layers=lo)
        out.append(FitResult(final, final.num_params(), best(lo)))
    return sorted(out, key=lambda f: -f.params)


def schedule_recipe(shape: ModelShape, layers: Sequence[int], peft: dict[str, Any] | None, name: str = "planned",
                    steps: Sequence[int] | None = None, position: str = "upper", precision: Precision = Precision(),
                    freeze_embeddings_after: int | None = None, extra: dict[str, Any] | None = None,
                    embed_peft: dict[str, Any] | None = None) -> str:
    """A TOML recipe that builds the split: stage 0 has n_0 layers, stage i inserts n_i new
    layers by interpolation and puts the PEFT on the old ones. From stage
    ``freeze_embeddings_after`` on, embeddings and head are frozen and carry ``embed_peft``
    (``lora_embed``) in ``extra_peft``, if given."""
    steps = list(steps or [100] * len(layers))
    model: dict[str, Any] = {"dim": shape.dim, "n_layers": layers[0], "n_heads": shape.n_heads,
                             "n_kv_heads": shape.n_kv_heads, "vocab_size": shape.vocab_size, "ffn_hidden": shape.ffn_hidden}
    if shape.tie_embeddings:
        model["tie_embeddings"] = True
    training = {"dtype": precision.compute, "frozen_dtype": precision.frozen, **(extra or {})}
    stages: list[dict[str, Any]] = []
    n_old = layers[0]
    for i, n in enumerate(layers):
        stage: dict[str, Any] = {"name": f"stage{i}", "steps": steps[i]}
        freeze = []
        if i > 0:
            pos = position if n <= n_old else "uniform"
            stage["growth"] = {"name": "interpolate", "n_new": n, "position": pos, "init": "copy"}
            if peft:
                stage["peft"] = {**{k: v for k, v in peft.items() if k != "layers"}, "layers": "old"}
            freeze = ["old"]
            n_old += n
        if freeze_embeddings_after is not None and i >= freeze_embeddings_after:
            freeze += ["embeddings", "head"]
            if embed_peft:
                stage["extra_peft"] = [{k: v for k, v in embed_peft.items() if k != "layers"}]
        if freeze or i > 0:
            stage["freeze"] = freeze
        stages.append(stage)
    doc = {"name": name, "output_dir": "runs/{name}", "model": model, "training": training, "stages": stages}
    return (f"# Written by `steptitan plan`: a {len(layers)}-stage split {list(layers)} of {shape.n_layers} layers.\n"
            + tomli_w.dumps(doc))


# --------------------------------------------------------------------------- command line


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
    """``steptitan plan``: best stage splits, a recipe, or the largest model for a budget."""
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
    ap.add_argument("--tie-embeddings", action="store_true",
                    help="one tensor for embedding table and LM head (model.tie_embeddings), counted once")
    ap.add_argument("--stages", "-K", type=int, default=3)
    ap.add_argument("--peft", default="lora", help="PEFT method on old layers, or 'none'")
    ap.add_argument("--peft-opt", action="append", default=[], metavar="KEY=VALUE", help="PEFT option (repeatable), e.g. rank=8")
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="paper",
                    help="fp32 | bf16 (bf16 compute, fp32 master/grads/Adam, fp32 frozen) | paper (bf16 frozen)")
    ap.add_argument("--optim", action="append", default=[], metavar="GROUP=OPTIMIZER",
                    help="optimizer of a parameter group (repeatable; docs/optimizers.md): default | old | new | "
                         "embeddings | head | adapters = a registered optimizer, or a table with options, e.g. "
                         "--optim embeddings=adam_mini --optim 'default={name: galore, rank: 64}'")
    ap.add_argument("--optimizer", choices=("adamw", "galore"), default="adamw", help="old form of --optim default=NAME")
    ap.add_argument("--galore-rank", type=int, default=128, help="with --optimizer galore")
    ap.add_argument("--world-size", "-W", type=int, default=1)
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
    from steptitan.optim import resolve_assignment
    from steptitan.recipe import RecipeError

    embed_peft = None
    if args.embed_lora_rank < 0:
        raise SystemExit(f"--embed-lora-rank must be >= 0, got {args.embed_lora_rank}")
    if args.embed_lora_rank or args.embed_lora_opt:
        if args.freeze_embeddings_after is None:
            raise SystemExit("--embed-lora-rank puts adapters on the embeddings and LM head once they are frozen: "
                             "also pass --freeze-embeddings-after STAGE (e.g. 1: trained in stage 0, adapted after)")
        embed_peft = {"method": "lora_embed", "rank": args.embed_lora_rank or 16}
        for item in args.embed_lora_opt:
            key, _, raw = item.partition("=")
            embed_peft[key] = _parse_value(raw)
    if args.freeze_embeddings_after is not None and args.freeze_embeddings_after < 0:
        raise SystemExit(f"--freeze-embeddings-after must be a stage index >= 0, got {args.freeze_embeddings_after}")

    assignment: dict[str, Any] = {"default": {"name": "galore", "rank": args.galore_rank}} if args.optimizer == "galore" else {}
    for item in args.optim:
        group, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--optim {item!r}: expected GROUP=OPTIMIZER, e.g. embeddings=adam_mini")
        assignment[group.strip()] = _parse_value(raw)
    try:
        optimizer = OptimizerSpec.of(resolve_assignment([(assignment, "--optim")], shape))
    except RecipeError as exc:
        raise SystemExit(f"steptitan plan: {exc}") from None
    common = dict(world_size=args.world_size, precision=precision, optimizer=optimizer,
                  freeze_embeddings_after=args.freeze_embeddings_after, batch=args.batch, seq_len=args.seq_len,
                  checkpointing=args.checkpointing, position=args.position)
    optim_names = optimizer.names()
    optim_text = (optim_names["old"] if len(set(optim_names.values())) == 1
                  else ", ".join(f"{g} {n}" for g, n in optim_names.items()))
    emb_text = ("trained" if args.freeze_embeddings_after is None else
                f"frozen from stage {args.freeze_embeddings_after}"
                + (f" with {embed_peft}" if embed_peft else ""))
    where = (f"precision {args.precision}, optimizer {optim_text}, {args.world_size} rank(s), PEFT on old layers: "
             f"{peft or 'none'}, embeddings/head{' (tied)' if shape.tie_embeddings else ''}: {emb_text}, "
             f"activations for batch {args.batch} x seq {args.seq_len}"
             f"{' with checkpointing' if args.checkpointing else ''}")
    vanilla_common = {**common, "freeze_embeddings_after": None}  # vanilla trains everything

    if args.budget:
        budget = _parse_bytes(args.budget)
        dims = [int(d) for d in args.dims.split(",")]
        print(f"largest models whose best {args.stages}-stage split fits {fmt_bytes(budget)} per device "
              f"({'model states' if args.objective == 'model_states' else 'model states + activations'}); {where}")
        try:
            fits = largest_fitting(budget, shape, args.stages, peft, dims, args.max_layers,
                                   objective=args.objective, embed_peft=embed_peft, **common)
        except ValueError as exc:
            raise SystemExit(f"steptitan plan: {exc}") from None
        vanilla = largest_fitting(budget, shape, 1, None, dims, args.max_layers, objective=args.objective, **vanilla_common)
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
                               freeze_embeddings_after=args.freeze_embeddings_after, embed_peft=embed_peft,
                               extra={"batch_size": args.batch, "seq_len": args.seq_len,
                                      "activation_checkpointing": args.checkpointing,
                                      **({"optim": assignment} if assignment else {})})
        Path(args.write_recipe).write_text(text)
        print(f"wrote {args.write_recipe} (split {list(chosen.layers)})")
    return 0
