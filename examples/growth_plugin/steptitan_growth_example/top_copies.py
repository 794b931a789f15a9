"""``top_copies``: grow depth by stacking ``n_new`` copies of the top layer on top.

A minimal growth plugin. It only says which old layer each grown layer comes
from; ``DepthGrowth`` (steptitan/growth.py) does the shard-local copy on FSDP2
and provides the exact modes (``zero_out``, ``mask_steps``) and the optimizer
state policy (``optimizer_state``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steptitan.growth import DepthGrowth, DepthOptions, LayerSource
from steptitan.model import ModelShape
from steptitan.registry import GROWTH


@dataclass
class TopCopiesOptions(DepthOptions):  # + zero_out, mask_steps, optimizer_state
    n_new: int = field(default=1, metadata={"ge": 1})  # copies of the top layer to add (a declared range: no check to write)


@GROWTH.register("top_copies")
class TopCopies(DepthGrowth):
    Options = TopCopiesOptions
    description = "add n_new copies of the top layer on top (example external plugin)"

    def target_shape(self, src: ModelShape) -> ModelShape:
        return src.replace(n_layers=src.n_layers + self.options.n_new)

    def layer_sources(self, src: ModelShape) -> list[LayerSource]:
        old = [LayerSource((i,), new=False) for i in range(src.n_layers)]
        return old + [LayerSource((src.n_layers - 1,), new=True)] * self.options.n_new
