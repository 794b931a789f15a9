"""The growth-operator interface and the shard-local weight copy it builds on.

A growth operator answers two questions (docs/growth.md):

* ``target_shape`` / ``layer_sources``: the grown shape and, per new layer,
  which old layers it comes from -- used by the plan and ``--dry-run`` without
  touching weights;
* ``grow``: fill a freshly built, already sharded model from the live, sharded
  model of the previous stage.

Depth growth never gathers: FSDP2 shards every parameter on dim 0 over the
same mesh, so a block of the grown model has the same local shard layout as
its source block and copying ``to_local()`` tensors is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from steptitan.distributed import local_tensor, reshard
from steptitan.model import ModelShape, base_param_names


@dataclass(frozen=True)
class LayerSource:
    """Where layer j of the grown model comes from.

    ``sources``: old layer indices (one = copy, several = mean, none = fresh
    init). ``new``: False when the layer carries a trained layer in place (the
    "old" group a STEP stage freezes), True for inserted layers.
    """

    sources: tuple[int, ...]
    new: bool


@dataclass
class NoOptions:
    pass


class GrowthOperator:
    """Base class for growth plugins. Subclasses set ``Options`` and override the methods."""

    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""
    registry_name: ClassVar[str]

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def target_shape(self, src: ModelShape) -> ModelShape:
        raise NotImplementedError

    def layer_sources(self, src: ModelShape) -> list[LayerSource]:
        """One entry per layer of the grown model."""
        raise NotImplementedError

    def is_exact(self) -> bool:
        """True when the grown model computes exactly the old model's function."""
        return False

    @torch.no_grad()
    def grow(self, src: nn.Module, dst: nn.Module, src_shape: ModelShape) -> None:
        """Default: depth growth by shard-local copy/mean following ``layer_sources``."""
        copy_layers_by_source(src, dst, src_shape, self.layer_sources(src_shape))


def params_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


@torch.no_grad()
def copy_layers_by_source(
    src: nn.Module, dst: nn.Module, src_shape: ModelShape, sources: list[LayerSource]
) -> None:
    """Copy base weights shard-locally: non-layer params by name, layers by ``sources``.

    Only the dense model's own parameters are copied; PEFT parameters of the
    destination keep their fresh initialisation.
    """
    reshard(src)  # FSDP2 leaves the root unsharded after forward
    reshard(dst)
    base = base_param_names(src_shape)
    src_params = params_by_name(src)
    for name, p in params_by_name(dst).items():
        if name.startswith("layers."):
            _, j, rest = name.split(".", 2)
            if f"layers.0.{rest}" not in base:
                continue
            srcs = sources[int(j)].sources
            if not srcs:
                continue
            acc = local_tensor(src_params[f"layers.{srcs[0]}.{rest}"]).clone()
            for i in srcs[1:]:
                acc += local_tensor(src_params[f"layers.{i}.{rest}"])
            local_tensor(p).copy_(acc / len(srcs))
        elif name in base:
            local_tensor(p).copy_(local_tensor(src_params[name]))


@torch.no_grad()
def zero_block_outputs(model: nn.Module, layer_ids: list[int]) -> None:
    """Make pre-norm blocks the identity: zero attention.wo and feed_forward.w2.

    x + wo(attn(norm(x))) + w2(ffn(...)) reduces to x (STEP/G_stack identity
    trick, methods.md "Exact identity trick").
    """
    for j in layer_ids:
        block = model.layers[str(j)]
        local_tensor(block.attention.wo.weight).zero_()
        local_tensor(block.feed_forward.w2.weight).zero_()
