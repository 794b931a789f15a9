"""Width growth that is exact and breaks symmetry: LEMON (Wang et al., ICLR 2024, arXiv 2310.07999, Fig. 3).

bert2BERT's FPI (registry/growth/bert2bert.py) splits a copied unit's fan-out
weights evenly (1/C each), so the copies receive identical gradients and stay
identical forever. LEMON splits them unevenly -- alpha and 1 - alpha, and for
widths that are not a multiple of the old one alpha, beta, gamma, ... with sum 1
(Fig. 3) -- which keeps the function exactly and lets the copies drift
apart: after the first step the fan-out columns are no longer proportional, so
the copies' fan-in rows get different gradients (docs/growth.md, "lemon").

Split coefficients of the C copies of one old unit, in position order (the old
unit first): stick-breaking a_m = alpha (1 - alpha)^m for m < C - 1 and
a_{C-1} = (1 - alpha)^(C-1); they sum to 1 and are pairwise different for
alpha not in {0, 1/2, 1}.

* FFN hidden size and heads (head_dim fixed, grown per KV group as in bert2bert,
  so GQA is exact): fan-in rows copied, fan-out columns (w2, wo) times a_m. A query
  head's share is a_kv * a_in (its KV group's copy, its slot's copy in the group).
* d_model through RMSNorm, for any counts (96 -> 160 included). Copying a
  residual coordinate C_u times changes RMSNorm's mean square unless every
  C_u = D/d (why bert2bert's uneven d_model growth is not exact). Here copy m
  of coordinate u carries c = sqrt((D/d) a_m) x_u, so sum over copies of c^2 is
  D/d for every u and mean(x'^2) = mean(x^2) exactly: RMSNorm's scale is the old
  one, with the same eps. Writers of the stream (embedding columns, wo and w2
  rows) are scaled by c; readers (wq, wk, wv, w1, w3 columns and an untied LM
  head) by s = c d/D, so sum_m s_m c_m = 1; norm weights are copied. A tied LM
  head is the embedding (scaled by c), so the final norm's weight is multiplied
  by d/D instead: sum_m c_m^2 (d/D) = 1. (LEMON's LayerNorm "average expansion"
  pads with the mean; for RMSNorm this norm-preserving scaled copy is the
  analogue, and it keeps the asymmetry: copies differ in scale.)

Every position p of a grown axis has an activation out_p times the old unit's
and a gradient in_p times the old unit's gradient (out = c, in = s on d_model;
out = 1, in = a on FFN and heads). So a weight W'[i, j] = out_i in_j W[u, v] has
gradient in_i out_j dW[u, v]: ``optimizer_state = "copy"`` grows exp_avg with
(in, out) and exp_avg_sq with their squares, the FPI policy of bert2bert with
LEMON's coefficients (docs/growth.md, "Optimizer state").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from steptitan.distributed import full_tensor, local_part, local_tensor, seeded_generator
from steptitan.model import ModelShape
from steptitan.registry import GROWTH
from steptitan.growth import GrowthOperator
from steptitan.registry.growth.bert2bert import LAYER_AXES, Bert2Bert, WidthMapping, unit_mapping


@dataclass
class LemonOptions:
    dim: int = field(default=0, metadata={"ge": 0})  # target d_model; 0 = unchanged (any D >= d is exact, e.g. 96 -> 160)
    ffn_hidden: int = field(default=0, metadata={"ge": 0})  # target SwiGLU hidden size; 0 = unchanged
    n_heads: int = field(default=0, metadata={"ge": 0})  # target query heads (head_dim stays fixed); 0 = unchanged
    n_kv_heads: int = field(default=0, metadata={"ge": 0})  # target KV heads; 0 = keep the group size n_heads / n_kv_heads
    # split of a copied unit's fan-out: old unit alpha, copies the stick-broken rest; 0.5 with 2 copies = FPI
    alpha: float = field(default=0.6, metadata={"gt": 0, "lt": 1})
    mapping: WidthMapping = "cyclic"  # cyclic (u mod n) | random (seeded) | uniform (each unit k times in a row)
    seed: int = 0  # seed of the random mapping
    optimizer_state: Literal["fresh", "copy"] = "fresh"  # fresh | copy (moments grown like the gradient)


@dataclass(frozen=True)
class Split:
    """One grown axis: per new position its old index, activation factor ``out`` and gradient factor ``into``."""

    index: torch.Tensor  # long
    out: torch.Tensor  # float64: the position carries out * old activation
    into: torch.Tensor  # float64: readers take it with this factor (sum over copies of out * into = 1)


def copy_order(index: torch.Tensor) -> torch.Tensor:
    """m for each position: how many earlier positions copy the same old unit (0 = the first copy)."""
    seen: dict[int, int] = {}
    order = []
    for u in index.tolist():
        order.append(seen.get(u, 0))
        seen[u] = order[-1] + 1
    return torch.tensor(order, dtype=torch.long)


def split_coefficients(index: torch.Tensor, alpha: float) -> torch.Tensor:
    """Stick-breaking a_m per position (float64): alpha (1-alpha)^m, the last copy of a unit the remainder."""
    count = torch.bincount(index)[index]
    m = copy_order(index).to(torch.float64)
    rest = (1 - alpha) ** m
    return torch.where(m < count - 1, alpha * rest, rest)


# Roles: "out" rows/columns are copied (times out), "in" ones read the axis (times into), "norm" weights
# are copied as they are, "tied_norm" is the final norm of a tied head (times d/D = into / out).
ROLES = dict(LAYER_AXES)
ROLES["attention_norm.weight"] = [(0, "dim", "norm")]
ROLES["ffn_norm.weight"] = [(0, "dim", "norm")]


def param_roles(name: str, tied: bool) -> list[tuple[int, str, str]]:
    if name.startswith("layers."):
        return ROLES[name.split(".", 2)[2]]
    if name == "tok_embeddings.weight":
        return [(1, "dim", "out")]
    if name == "norm.weight":
        return [(0, "dim", "tied_norm" if tied else "norm")]
    if name == "output.weight":
        return [(1, "dim", "in")]
    raise KeyError(f"lemon: no width layout for parameter {name!r}")


def factor(split: Split, role: str, kind: str) -> torch.Tensor:
    """Per-position factor of a tensor of ``kind`` along an axis of ``role``.

    Weights: out / in / 1 / d/D. Gradients go the other way round (a weight out_i in_j W has gradient
    in_i out_j dW): exp_avg takes in / out / in*out / out^2, exp_avg_sq their squares."""
    weight = {"out": split.out, "in": split.into, "norm": torch.ones_like(split.out), "tied_norm": split.into / split.out}
    grad = {"out": split.into, "in": split.out, "norm": split.into * split.out, "tied_norm": split.out * split.out}
    if kind == "weight":
        return weight[role]
    return grad[role] if kind == "exp_avg" else grad[role] ** 2


def expand(t: torch.Tensor, roles: list[tuple[int, str, str]], splits: dict[str, Split | None], kind: str) -> torch.Tensor:
    for dim, axis, role in roles:
        split = splits[axis]
        if split is None:
            continue
        t = t.index_select(dim, split.index.to(t.device))  # CPU mapping -> the tensor's device (bert2bert.expand)
        shape = [1] * t.dim()
        shape[dim] = -1
        t = t * factor(split, role, kind).to(t.device, t.dtype).view(shape)
    return t


@GROWTH.register("lemon")
class Lemon(Bert2Bert):
    Options = LemonOptions
    description = "LEMON width growth: exact, asymmetric (alpha / 1-alpha) splits that break symmetry; any d_model through RMSNorm"

    def __init__(self, options: LemonOptions | None = None):
        options = options if options is not None else LemonOptions()  # ranges and choices: checked by the schema
        GrowthOperator.__init__(self, options)  # Bert2Bert's own checks are about FPI / AKI

    def is_exact(self, src: ModelShape | None = None) -> bool:
        return True  # every width, any counts (up to float rounding; docs/growth.md)

    def splits(self, src: ModelShape) -> dict[str, Split | None]:
        """bert2bert's mappings (per KV group for heads) with LEMON's coefficients."""
        dst = self.target_shape(src)
        alpha, o = self.options.alpha, self.options
        maps = self.expansions(src)
        out: dict[str, Split | None] = {axis: None for axis in maps}
        if maps["ffn"] is not None:
            out["ffn"] = Split(maps["ffn"].index, torch.ones(dst.ffn_hidden, dtype=torch.float64),
                               split_coefficients(maps["ffn"].index, alpha))
        if maps["dim"] is not None:  # norm-preserving scaled copies (module docstring)
            ratio = dst.dim / src.dim
            c = (ratio * split_coefficients(maps["dim"].index, alpha)).sqrt()
            out["dim"] = Split(maps["dim"].index, c, c / ratio)
        # Heads: a query head's share factorises as a_kv(its KV copy) * a_in(its slot copy), so the query
        # heads of one KV copy sum to a_kv times the old group: the KV copy's gradient is a_kv times the old
        # one (what the moment transform needs), and every copy still gets its own share.
        rep_old, rep_new = src.n_heads // src.n_kv_heads, dst.n_heads // dst.n_kv_heads
        gkv = unit_mapping(src.n_kv_heads, dst.n_kv_heads, o.mapping, seeded_generator(o.seed, "kv"))
        gin = unit_mapping(rep_old, rep_new, o.mapping, seeded_generator(o.seed, "q"))
        a_kv, a_in = split_coefficients(gkv, alpha), split_coefficients(gin, alpha)
        hd = src.head_dim
        if maps["kv"] is not None:
            out["kv"] = Split(maps["kv"].index, torch.ones(len(maps["kv"].index), dtype=torch.float64),
                              a_kv.repeat_interleave(hd))
        if maps["q"] is not None:
            a_q = (a_kv[:, None] * a_in[None, :]).flatten().repeat_interleave(hd)
            out["q"] = Split(maps["q"].index, torch.ones_like(a_q), a_q)
        return out

    @torch.no_grad()
    def grow_tensors(self, src, dst, src_shape, kind):
        splits = self.splits(src_shape)
        tied = src_shape.tie_embeddings
        filled = {}
        for name, t in dst.items():
            if name not in src:
                continue  # no source tensor (e.g. no optimizer state): keep fresh
            # One parameter at a time is gathered, expanded and cut back to this rank's shard.
            full = expand(full_tensor(src[name]), param_roles(name, tied), splits, kind)
            local_tensor(t).copy_(local_part(full.to(t.dtype), t))
            filled[name] = name
        return filled
