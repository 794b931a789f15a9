"""Depth growth by interpolation (STEP, Yano et al. 2025, Sec. 3): insert new layers
between existing ones.

Old layer i keeps its weights; a new layer placed after old layer i is
initialised as a copy of layer i (``init="copy"``), the mean of layers i and
i+1 (``"mean"``), or freshly (``"random"``). With ``zero_out=true`` the new
blocks' attention output and FFN down projections are zeroed, which makes each
new pre-norm block the identity, so the grown model is exactly the old one.
``mask_steps=N`` (MSG-style) instead scales the new blocks' branches from 0 to 1
over N steps: exact at growth time whatever the new weights are.
``optimizer_state="copy"`` gives new layers their source layers' Adam moments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from steptitan.growth import DepthGrowth, DepthOptions, LayerSource
from steptitan.model import ModelShape
from steptitan.registry import GROWTH

MAX_NEW_LAYERS = 1024  # the plan's layer limit (plan.SHAPE_LIMITS)


@dataclass
class InterpolateOptions(DepthOptions):  # + zero_out, mask_steps, optimizer_state (steptitan/growth.py)
    n_new: int = field(default=0, metadata={"ge": 0})  # new layers to insert; 0 = as many as there are old layers (doubling)
    position: Literal["uniform", "upper", "lower"] = "uniform"  # where the new layers go
    after: list[int] = field(default_factory=list)  # explicit old-layer indices to insert after (overrides position)
    init: Literal["copy", "mean", "random"] = "copy"  # a new layer's weights: copy of / mean of its neighbours, or random


@GROWTH.register("interpolate")
class Interpolate(DepthGrowth):
    Options = InterpolateOptions
    description = "STEP depth growth: insert new layers between old ones (copy / mean / random init)"

    def __init__(self, options: InterpolateOptions | None = None):
        super().__init__(options)  # checks the declared choices and ranges
        o = self.options
        if o.n_new > MAX_NEW_LAYERS or len(o.after) > MAX_NEW_LAYERS:  # checked before any list of that size is built
            raise ValueError(f"interpolate inserts at most {MAX_NEW_LAYERS} layers, got n_new={o.n_new}, {len(o.after)} after-indices")

    def insert_after(self, n_old: int) -> list[int]:
        """Old-layer indices after which a new layer goes (repeats allowed), sorted."""
        o = self.options
        if o.after:
            bad = [i for i in o.after if not 0 <= i < n_old]
            if bad:
                raise ValueError(f"interpolate.after: indices {bad} are outside 0..{n_old - 1}")
            return sorted(o.after)
        n_new = o.n_new or n_old
        if o.position == "uniform":
            # spread evenly: new layer k goes after old layer floor(k * n_old / n_new)
            return [k * n_old // n_new for k in range(n_new)]
        if n_new > n_old:
            raise ValueError(f"interpolate.position={o.position!r} inserts at most one layer per old layer ({n_old}), got n_new={n_new}")
        if o.position == "upper":
            return list(range(n_old - n_new, n_old))
        return list(range(n_new))  # lower

    def target_shape(self, src: ModelShape) -> ModelShape:
        return src.replace(n_layers=src.n_layers + len(self.insert_after(src.n_layers)))

    def layer_sources(self, src: ModelShape) -> list[LayerSource]:
        n_old = src.n_layers
        after = self.insert_after(n_old)
        out: list[LayerSource] = []
        for i in range(n_old):
            out.append(LayerSource((i,), new=False))
            for _ in range(after.count(i)):
                if self.options.init == "copy":
                    srcs: tuple[int, ...] = (i,)
                elif self.options.init == "mean":
                    srcs = (i, i + 1) if i + 1 < n_old else (i,)
                else:
                    srcs = ()
                out.append(LayerSource(srcs, new=True))
        return out
