"""Ranks and shards: process group, device mesh, FSDP2 sharding, and each rank's view of a sharded tensor.

One code path for CPU (gloo) and CUDA (nccl). Under ``torchrun`` the
rank/world come from the environment; without it the same code runs as a
world of one (an in-process store, no network). The helpers below the
process group work on FSDP2's dim-0 layout without communicating
(``local_rows``, ``local_part``, ``shard_rows``) and draw values identical on
every rank and for every world size (``seeded_generator``, ``init_like``).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils.checkpoint import checkpoint


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # The data-parallel layout, read off the mesh: a flat FSDP2 mesh ("dp_shard",) or an HSDP
    # mesh ("dp_replicate", "dp_shard"). Rank r sits at (r // dp_shard, r % dp_shard).
    @property
    def dp_replicate(self) -> int:
        return self.mesh.size(0) if self.mesh.ndim == 2 else 1

    @property
    def dp_shard(self) -> int:
        """Ranks one parameter is sharded over: per-rank memory follows this, not the world size."""
        return self.mesh.size(self.mesh.ndim - 1)

    @property
    def shard_rank(self) -> int:
        """This rank's position in its shard group (which dim-0 chunk of every parameter it holds)."""
        return self.mesh.get_local_rank(self.mesh.ndim - 1)


def env_world_size() -> int:
    """World size as torchrun will report it (1 outside torchrun); usable before init."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_mesh(device_type: str, world_size: int, dp_replicate: int = 1) -> DeviceMesh:
    """The data-parallel mesh: flat ("dp_shard",) for ``dp_replicate == 1`` (plain FSDP2), else
    ("dp_replicate", "dp_shard") of shape (dp_replicate, world_size // dp_replicate), which
    ``fully_shard`` turns into HSDP (torchtitan's mesh names; rank = i * dp_shard + j)."""
    if dp_replicate == 1:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp_shard",))
    if dp_replicate < 1 or world_size % dp_replicate:
        raise ValueError(f"dp_replicate={dp_replicate} does not divide the world size {world_size}")
    return init_device_mesh(device_type, (dp_replicate, world_size // dp_replicate),
                            mesh_dim_names=("dp_replicate", "dp_shard"))


def shard_degree(t: torch.Tensor) -> int:
    """Ranks ``t``'s rows are split over (1 for a plain tensor; the shard group's size under HSDP)."""
    if not isinstance(t, DTensor):
        return 1
    return math.prod(t.device_mesh.size(d) for d, p in enumerate(t.placements) if isinstance(p, Shard))


def shard_index(t: torch.Tensor) -> int:
    """Which dim-0 chunk of ``t`` this rank holds (0 for a plain tensor)."""
    if not isinstance(t, DTensor):
        return 0
    dims = [d for d, p in enumerate(t.placements) if isinstance(p, Shard)]
    if len(dims) > 1:
        raise ValueError(f"sharded over {len(dims)} mesh dims ({t.placements}); steptitan shards over one")
    return t.device_mesh.get_local_rank(dims[0]) if dims else 0


def init_distributed(backend: str = "auto", timeout_s: float = 600.0, dp_replicate: int = 1) -> DistEnv:
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    from steptitan.device import nccl_error_handling, pick_device

    device, backend = pick_device(backend, local_rank)  # the device follows the backend (docs/gpu.md)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if backend == "nccl":
        nccl_error_handling()
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:  # a single process without torchrun
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    mesh = build_mesh(device.type, world, dp_replicate)  # dp_replicate > 1: HSDP (parallel.dp_replicate)
    return DistEnv(rank, world, local_rank, device, backend, mesh)


def shutdown_distributed(synchronize: bool = False) -> None:
    """Tear the process group down; ``synchronize`` after a clean run.

    Ranks that finish together tear down together: a rank that destroys its
    gloo group while a peer is still inside the last collective's teardown can
    abort at exit ("terminate called without an active exception").
    """
    if dist.is_initialized():
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def enable_activation_checkpointing(block: nn.Module) -> None:
    """Recompute a block's activations in backward.

    Done by wrapping ``forward`` on the instance rather than with
    ``checkpoint_wrapper`` so parameter names stay unchanged (growth and
    checkpoints address parameters by name).
    """
    inner: Callable = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward  # type: ignore[method-assign]


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: torch.dtype = torch.float32,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root.

    The root unit holds the embeddings, final norm and LM head together so a
    tied embedding/head weight stays one parameter (torchtitan's ``apply_fsdp``
    shards the embedding on its own, which would split a tied pair, and turns
    off FSDP's gradient averaging, which this trainer relies on).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.layers.values():
        if activation_checkpointing:
            enable_activation_checkpointing(block)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` laid out like the (possibly sharded) ``like``.

    Every rank must hold the same ``full``; no communication happens.
    """
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered for a DTensor). Use on one parameter at a time."""
    return t.full_tensor() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------- FSDP2 dim-0 shards


def local_rows(rows: int, world_size: int, rank: int) -> int:
    """Rows of a dim-0 FSDP2 shard on ``rank`` (torch.chunk: ceil-sized chunks, trailing ranks may be empty)."""
    if rows == 0:
        return 0
    chunk = math.ceil(rows / world_size)
    return max(0, min(chunk, rows - rank * chunk))


def local_shape(shape: Sequence[int], world_size: int, rank: int) -> tuple[int, ...]:
    """Shape of ``rank``'s dim-0 FSDP2 shard of a tensor of ``shape``."""
    if not shape:
        return tuple(shape)
    return (local_rows(shape[0], world_size, rank), *shape[1:])


def shard_rows(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's dim-0 chunk of ``full`` (any shape) laid out like ``like`` (Shard(0) over its shard mesh dim,
    replicated over an HSDP replicate dim), no comms."""
    if not isinstance(like, DTensor):
        return full
    device = local_tensor(like).device
    return distribute_tensor(full.to(device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def scatter_rows(full: torch.Tensor | None, dst: torch.Tensor, owner: int) -> None:
    """Write ``full`` (held by shard rank ``owner`` only; None elsewhere) into every rank's dim-0 shard of
    ``dst``: one scatter over ``dst``'s shard group (replicas of an HSDP mesh scatter within their own
    group, from their own owner), chunks padded to FSDP2's ceil(rows / W) so they are equal-sized."""
    local = local_tensor(dst)
    degree = shard_degree(dst)
    if degree == 1:
        local.copy_(full.to(local.device))
        return
    rows = dst.shape[0]
    chunk = math.ceil(rows / degree)
    wire = torch.float32  # the init's dtype; gloo has no bf16 scatter (a bf16 frozen shard casts on arrival)
    out = torch.empty((chunk, *dst.shape[1:]), dtype=wire, device=local.device)
    pieces = None
    if full is not None:
        padded = torch.zeros((chunk * degree, *dst.shape[1:]), dtype=wire, device=local.device)
        padded[:rows] = full
        pieces = list(padded.split(chunk))
    shard_dim = next(d for d, p in enumerate(dst.placements) if isinstance(p, Shard))
    dist.scatter(out, pieces, group=dst.device_mesh.get_group(shard_dim), group_src=owner)
    local.copy_(out[:local.shape[0]])


def gather_rows(local: torch.Tensor, like: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of ``shard_rows``: the full (rows, ...) tensor on every rank (an all-gather)."""
    if not isinstance(like, DTensor):
        return local
    local = local.contiguous().to(local_tensor(like).device)
    shape = (rows, *local.shape[1:])
    stride = tuple(math.prod(shape[k + 1:]) for k in range(len(shape)))
    # like's placements: under HSDP the gather runs within the shard group (replicas hold the same rows)
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=shape,
                              stride=stride).full_tensor()


def global_rows(t: torch.Tensor) -> torch.Tensor:
    """Global indices of the dim-0 rows this rank holds of ``t``."""
    ids = torch.arange(t.shape[0], device=local_tensor(t).device).unsqueeze(1)
    return local_part(ids, t)[:, 0] if isinstance(t, DTensor) else ids[:, 0]


# --------------------------------------------------------------------------- world-size-independent draws


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from (seed, keys): the same on every rank, at every world size and in every process."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded from (seed, keys): identical on every rank, any world size."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


@torch.no_grad()
def init_like(param: torch.Tensor, init: Callable[[torch.Tensor, torch.Generator], None], gen: torch.Generator) -> None:
    """Initialise a (possibly sharded) parameter from a full tensor drawn on every rank.

    Drawing the full tensor with a shared generator makes the result the same
    for every world size (adapters are small, so this costs little).
    """
    full = torch.empty(param.shape, dtype=torch.float32)
    init(full, gen)
    local = local_tensor(param)
    local.copy_(local_part(full.to(local.device), param))


def reshard(model: nn.Module) -> None:
    """Return FSDP2 modules to their sharded state (the root stays unsharded after forward)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
