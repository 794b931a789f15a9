"""Width growth: bert2BERT (Chen et al. 2021, arXiv 2110.07143, Sec. 4), after Net2Net.

Three widths can grow, each through a mapping g: new unit -> old unit that is
the identity on the old units (cyclic, random) or a k-fold duplication
(uniform); C_u is how many new units copy old unit u.

* ``ffn_hidden``: SwiGLU w1 and w3 rows copied together, w2 columns split
  (divided by C) -- exact for any mapping (the activation is element-wise);
* ``n_heads`` / ``n_kv_heads`` with head_dim fixed: Q/K/V rows of a head copied,
  wo columns split. Heads grow per KV group, so every copied query head reads a
  copy of its own KV head (GQA included) -- exact for any mapping;
* ``dim`` (d_model): embedding columns, every RMSNorm weight and the rows of wo
  and w2 copied; the columns of wq, wk, wv, w1, w3 and of an untied LM head
  split. A tied head cannot be both copied and split, so the final norm's weight
  is divided by C instead. RMSNorm sees mean(x'^2) = sum_u C_u x_u^2 / D, which
  equals mean(x^2) only when every C_u = D / d: exact for uniform counts
  (D = k d with cyclic or uniform mapping), approximate otherwise.

FPI (function-preserving initialisation, Sec. 4.1) is all of the above. AKI
(advanced knowledge initialisation, Sec. 4.2) builds the new units of layer l
(new rows of its weights, new entries of its norms) from layer l+1, expanded
the same way; the top layer uses itself. AKI is not function-preserving.

Optimizer moments (``optimizer_state="copy"``) follow the gradient, which
transforms the other way round: a copied row's gradient is divided by C, a
split column's gradient is copied (docs/growth.md, "Optimizer state").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from steptitan.distributed import full_tensor, local_part, local_tensor, seeded_generator
from steptitan.growth import GrowthOperator, LayerSource, StatePolicy
from steptitan.model import ModelShape
from steptitan.registry import GROWTH

WidthMapping = Literal["cyclic", "random", "uniform"]  # new width position u -> old unit
MAPPINGS = get_args(WidthMapping)


@dataclass
class Bert2BertOptions:
    dim: int = field(default=0, metadata={"ge": 0})  # target d_model; 0 = unchanged
    ffn_hidden: int = field(default=0, metadata={"ge": 0})  # target SwiGLU hidden size; 0 = unchanged
    n_heads: int = field(default=0, metadata={"ge": 0})  # target query heads (head_dim stays fixed); 0 = unchanged
    n_kv_heads: int = field(default=0, metadata={"ge": 0})  # target KV heads; 0 = keep the group size n_heads / n_kv_heads
    method: Literal["fpi", "aki"] = "fpi"  # fpi = copy-and-split | aki = new units from the layer above (not exact)
    mapping: WidthMapping = "cyclic"  # cyclic (u mod n) | random (seeded) | uniform (each unit k times in a row)
    seed: int = 0  # seed of the random mapping
    optimizer_state: StatePolicy = "fresh"  # copy = moments grown like the gradient


@dataclass(frozen=True)
class Expansion:
    """One width's mapping, per new position: the old index, its copy count C, and whether it is a new unit."""

    index: torch.Tensor  # long
    count: torch.Tensor  # float
    new: torch.Tensor  # bool: not the first copy of its old unit (AKI's "new units")

    @staticmethod
    def of(index: torch.Tensor, n_old: int) -> "Expansion":
        n = len(index)
        first = torch.full((n_old,), n, dtype=torch.long).scatter_reduce(0, index, torch.arange(n), "amin")
        count = torch.bincount(index, minlength=n_old)[index].to(torch.float32)
        return Expansion(index, count, first[index] != torch.arange(n))

    def per_head(self, head_dim: int) -> "Expansion":
        """Head mapping -> mapping of the flat (head, head_dim) axis."""
        offs = torch.arange(head_dim)
        return Expansion((self.index[:, None] * head_dim + offs).flatten(),
                         self.count.repeat_interleave(head_dim), self.new.repeat_interleave(head_dim))

    def is_uniform(self) -> bool:
        return bool((self.count == self.count[0]).all())


def unit_mapping(n_old: int, n_new: int, mapping: str, gen: torch.Generator) -> torch.Tensor:
    if mapping == "cyclic":
        return torch.arange(n_new) % n_old
    if mapping == "uniform":
        return torch.arange(n_new) // (n_new // n_old)
    extra = torch.randint(0, n_old, (n_new - n_old,), generator=gen)
    return torch.cat([torch.arange(n_old), extra])


# Which axis each dim of a dense parameter lives on, and whether it is an output
# ("out": copied) or input ("in": split) dimension there.
LAYER_AXES = {
    "attention.wq.weight": [(0, "q", "out"), (1, "dim", "in")],
    "attention.wk.weight": [(0, "kv", "out"), (1, "dim", "in")],
    "attention.wv.weight": [(0, "kv", "out"), (1, "dim", "in")],
    "attention.wo.weight": [(0, "dim", "out"), (1, "q", "in")],
    "feed_forward.w1.weight": [(0, "ffn", "out"), (1, "dim", "in")],
    "feed_forward.w3.weight": [(0, "ffn", "out"), (1, "dim", "in")],
    "feed_forward.w2.weight": [(0, "dim", "out"), (1, "ffn", "in")],
    "attention_norm.weight": [(0, "dim", "out")],
    "ffn_norm.weight": [(0, "dim", "out")],
}


def param_axes(name: str, tied: bool) -> list[tuple[int, str, str]]:
    if name.startswith("layers."):
        return LAYER_AXES[name.split(".", 2)[2]]
    if name == "tok_embeddings.weight":
        return [(1, "dim", "out")]
    if name == "norm.weight":  # tied head: the final norm takes the split (see module docstring)
        return [(0, "dim", "in" if tied else "out")]
    if name == "output.weight":
        return [(1, "dim", "in")]
    raise KeyError(f"bert2bert: no width layout for parameter {name!r}")


def expand(t: torch.Tensor, axes: list[tuple[int, str, str]], maps: dict[str, Expansion | None], kind: str) -> torch.Tensor:
    """FPI on one full tensor. Weights: copy along "out" dims, split (/C) along "in" dims.
    Gradient-like tensors transform the other way: exp_avg /C along "out", exp_avg_sq /C^2."""
    for dim, axis, role in axes:
        e = maps[axis]
        if e is None:
            continue
        # The mapping is built on the CPU; the index and the counts go to the tensor's device
        # (a CUDA index_select rejects a CPU index, and only 0-d CPU tensors broadcast into CUDA ops).
        t = t.index_select(dim, e.index.to(t.device))
        shape = [1] * t.dim()
        shape[dim] = -1
        c = e.count.to(t.device, t.dtype).view(shape)
        if kind == "weight" and role == "in":
            t = t / c
        elif kind == "exp_avg" and role == "out":
            t = t / c
        elif kind == "exp_avg_sq" and role == "out":
            t = t / (c * c)
    return t


@GROWTH.register("bert2bert")
class Bert2Bert(GrowthOperator):
    Options = Bert2BertOptions
    description = "bert2BERT width growth (FPI copy-and-split or AKI) of d_model, FFN hidden size and heads"

    def target_shape(self, src: ModelShape) -> ModelShape:
        o = self.options
        dim, ffn = o.dim or src.dim, o.ffn_hidden or src.ffn_hidden
        heads = o.n_heads or src.n_heads
        kv = o.n_kv_heads or (heads * src.n_kv_heads // src.n_heads)
        if heads % kv:
            raise ValueError(f"bert2bert: n_heads {heads} must be a multiple of n_kv_heads {kv}")
        group, old_group = heads // kv, src.n_heads // src.n_kv_heads
        for what, new, old in (("dim", dim, src.dim), ("ffn_hidden", ffn, src.ffn_hidden),
                               ("n_kv_heads", kv, src.n_kv_heads), ("heads per KV group", group, old_group)):
            if new < old:
                raise ValueError(f"bert2bert: {what} can only grow ({old} -> {new})")
            if o.mapping == "uniform" and new % old:
                raise ValueError(f"bert2bert: mapping=uniform needs {what} to grow by a whole factor ({old} -> {new})")
        head_dim = src.head_dim  # fixed: growing it would change 1/sqrt(d_h) and the RoPE pairs
        return src.replace(dim=dim, ffn_hidden=ffn, n_heads=heads, n_kv_heads=kv,
                           fixed_head_dim=head_dim if head_dim != dim // heads else None)

    def layer_sources(self, src: ModelShape) -> list[LayerSource]:
        return [LayerSource((j,), new=False) for j in range(src.n_layers)]  # every layer carried, wider

    def expansions(self, src: ModelShape) -> dict[str, Expansion | None]:
        """The mapping of each axis (None = unchanged): dim, ffn, q (query heads x head_dim), kv."""
        dst = self.target_shape(src)

        def mapping(axis: str, n_old: int, n_new: int) -> Expansion | None:
            if n_new == n_old:
                return None
            gen = seeded_generator(self.options.seed, "bert2bert", axis)
            return Expansion.of(unit_mapping(n_old, n_new, self.options.mapping, gen), n_old)

        maps = {"dim": mapping("dim", src.dim, dst.dim), "ffn": mapping("ffn", src.ffn_hidden, dst.ffn_hidden)}
        # Heads grow per KV group: new KV group k' copies old group gkv(k'); inside it, new query
        # slot m copies old slot gin(m). A copied query head therefore reads a copy of its own KV head.
        kv_old, rep_old = src.n_kv_heads, src.n_heads // src.n_kv_heads
        kv_new, rep_new = dst.n_kv_heads, dst.n_heads // dst.n_kv_heads
        gkv = Expansion.of(unit_mapping(kv_old, kv_new, self.options.mapping, seeded_generator(self.options.seed, "kv")), kv_old)
        gin = Expansion.of(unit_mapping(rep_old, rep_new, self.options.mapping, seeded_generator(self.options.seed, "q")), rep_old)
        q_index = (gkv.index[:, None] * rep_old + gin.index[None, :]).flatten()
        heads = Expansion.of(q_index, src.n_heads)
        maps["q"] = heads.per_head(src.head_dim) if dst.n_heads != src.n_heads else None
        maps["kv"] = gkv.per_head(src.head_dim) if kv_new != kv_old else None
        return maps

    def is_exact(self, src: ModelShape | None = None) -> bool:
        if self.options.method != "fpi":
            return False
        if src is None:  # without the source shape: exact when d_model is unchanged or k-fold duplicated
            return not self.options.dim or self.options.mapping == "uniform"
        d = self.expansions(src)["dim"]
        return d is None or d.is_uniform()

    @torch.no_grad()
    def grow_tensors(self, src, dst, src_shape, kind):
        maps = self.expansions(src_shape)
        tied, top = src_shape.tie_embeddings, src_shape.n_layers - 1
        filled = {}
        for name, t in dst.items():
            if name not in src:
                continue  # the source had no such tensor (e.g. no optimizer state): keep fresh
            axes = param_axes(name, tied)
            # One parameter at a time is gathered, expanded and cut back to this rank's shard.
            full = expand(full_tensor(src[name]), axes, maps, kind)
            if self.options.method == "aki" and name.startswith("layers."):
                _, j, rest = name.split(".", 2)
                upper = f"layers.{min(int(j) + 1, top)}.{rest}"
                new = maps[axes[0][1]]  # dim 0 is the output axis of every block parameter
                if upper != name and new is not None and upper in src and new.new.any():
                    # rows as an index built on the CPU: a boolean mask on the device would be a host sync
                    rows = new.new.nonzero()[:, 0].to(full.device)
                    full.index_copy_(0, rows, expand(full_tensor(src[upper]), axes, maps, kind).index_select(0, rows))
            local_tensor(t).copy_(local_part(full.to(t.dtype), t))
            filled[name] = name
        return filled
