"""G_stack depth growth (Du et al. 2024, "Stacking Your Transformers", arXiv 2405.15319, Sec. 3).

The grown model is the small model stacked ``growth_factor`` times: 6 -> 24
layers is [L0..L5, L0..L5, L0..L5, L0..L5] (g = 4 is the paper's best), or the
layer-source list ``layers`` when given ([0, 1, 1, 2] copies layer 1 twice).
The first occurrence of each old layer carries it in place ("old" group for
freezing / PEFT); every later copy is "new".

Plain stacking is not function-preserving (each copy applies the old block
again). Exact modes: ``zero_out`` (new blocks are the identity) or
``mask_steps`` (MSG-style mask from 0 to 1), steptitan/growth.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steptitan.growth import DepthGrowth, DepthOptions, LayerSource
from steptitan.model import ModelShape
from steptitan.registry import GROWTH

MAX_LAYERS = 1024  # the plan's layer limit (plan.SHAPE_LIMITS)


@dataclass
class StackOptions(DepthOptions):  # + zero_out, mask_steps, optimizer_state (steptitan/growth.py)
    growth_factor: int = field(default=2, metadata={"ge": 1})  # g: stack the whole model g times (G_stack)
    layers: list[int] = field(default_factory=list)  # explicit layer-source list (overrides growth_factor)


@GROWTH.register("stack")
class Stack(DepthGrowth):
    Options = StackOptions
    description = "G_stack depth growth: stack the whole model g times, or follow a layer-source list"

    def __init__(self, options: StackOptions | None = None):
        super().__init__(options)  # checks the declared choices and ranges
        if self.options.growth_factor > MAX_LAYERS or len(self.options.layers) > MAX_LAYERS:  # before building the list
            raise ValueError(f"stack builds at most {MAX_LAYERS} layers, got growth_factor={self.options.growth_factor}, "
                             f"{len(self.options.layers)} layer sources")

    def order(self, n_old: int) -> list[int]:
        """The old layer each grown layer copies, bottom to top."""
        if self.options.layers:
            bad = [i for i in self.options.layers if not 0 <= i < n_old]
            if bad:
                raise ValueError(f"stack.layers: indices {bad} are outside 0..{n_old - 1}")
            return list(self.options.layers)
        return list(range(n_old)) * self.options.growth_factor

    def target_shape(self, src: ModelShape) -> ModelShape:
        return src.replace(n_layers=len(self.order(src.n_layers)))

    def layer_sources(self, src: ModelShape) -> list[LayerSource]:
        seen: set[int] = set()
        out = []
        for i in self.order(src.n_layers):
            out.append(LayerSource((i,), new=i in seen))
            seen.add(i)
        return out
