"""The device and its numerics: which device a rank uses, the compute dtype, TF32, determinism,
the attention kernel, releasing a finished stage's memory, and compiled blocks (docs/gpu.md).

One code path for CPU and CUDA. Everything that differs by device is decided here from the
backend (``training.backend``), so CPU tests exercise the same functions a GPU run calls.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch
from torch import nn

# torchtitan 0.2.2's SDPA wrapper allows cuDNN, flash and MATH only; the first two need bf16/fp16,
# so an fp32 model on a GPU fell back to MATH, which keeps a B x H x S x S score matrix per layer.
# The memory-efficient kernel takes fp32 and keeps O(S) state like flash (issue 15, defect 2).
SDPA_BACKENDS = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def allow_sdpa_backends() -> None:
    """Let torchtitan's SDPA wrapper choose cuDNN, flash, memory-efficient, then MATH (in that order)."""
    from torch.nn.attention import SDPBackend
    from torchtitan.models.attention import ScaledDotProductAttentionWrapper

    ScaledDotProductAttentionWrapper.sdpa_backends = [getattr(SDPBackend, name) for name in SDPA_BACKENDS]


# --------------------------------------------------------------------------- device choice


def device_type_for(backend: str, cuda_devices: int | None = None) -> str:
    """"cuda" or "cpu" for ``training.backend``: nccl runs on CUDA, gloo on the CPU, auto on CUDA when
    there is a GPU. The device follows the backend, never CUDA availability alone: gloo on a GPU host
    stays on the CPU (FSDP2's reduce-scatter has no gloo CUDA kernel)."""
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        return "cuda" if cuda_devices > 0 else "cpu"
    return "cuda" if backend == "nccl" else "cpu"


def pick_device(backend: str, local_rank: int, cuda_devices: int | None = None) -> tuple[torch.device, str]:
    """(device, resolved backend) of a rank. ``cuda:(local_rank % device_count)``: a launcher that gives
    each process one GPU (CUDA_VISIBLE_DEVICES per rank, Slurm's --gpus-per-task) leaves one visible
    device while LOCAL_RANK counts up. ValueError for nccl without a GPU."""
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    kind = device_type_for(backend, cuda_devices)
    if backend == "auto":
        backend = "nccl" if kind == "cuda" else "gloo"
    if kind == "cpu":
        return torch.device("cpu"), backend
    if cuda_devices == 0:
        raise ValueError("training.backend = \"nccl\" needs a CUDA GPU and this process sees none "
                         "(torch.cuda.is_available() is False); use backend = \"auto\" or \"gloo\" on a CPU machine")
    return torch.device("cuda", local_rank % cuda_devices), backend


# --------------------------------------------------------------------------- numerics


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# Flash attention and cuDNN attention in torch's SDPA, and bf16 tensor-core matmuls, need an Ampere
# (sm 8.0) or newer GPU; the memory-efficient kernel also runs on older ones (torch's sdp_utils checks).
BF16_FLASH_CAPABILITY = (8, 0)


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of this process's current CUDA device; None without a GPU (a CPU machine predicting
    for ``backend = "nccl"`` then assumes a GPU of at least ``BF16_FLASH_CAPABILITY``)."""
    if torch.cuda.is_available():
        return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]
    return None


def bf16_flash_capable(capability: tuple[int, int] | None) -> bool:
    return capability is None or tuple(capability) >= BF16_FLASH_CAPABILITY


def compute_dtype_name(dtype: str, device_type: str, capability: tuple[int, int] | None = None) -> str:
    """training.dtype resolved: "auto" = bfloat16 on an sm >= 8.0 GPU (flash/cuDNN attention, tensor
    cores), float32 on an older GPU (no bf16 tensor cores, no flash kernel: fp32 runs the memory-efficient
    kernel; fp16 would need loss scaling) and on the CPU (where bf16 matmuls are slow and the tests hold
    float32 results). ``capability``: the GPU's (major, minor); None = this process's GPU."""
    if dtype != "auto":
        return dtype
    if device_type != "cuda":
        return "float32"
    return "bfloat16" if bf16_flash_capable(capability or cuda_capability()) else "float32"


def set_deterministic(enabled: bool) -> None:
    """``torch.use_deterministic_algorithms`` for training.deterministic. On CUDA before torch 2.13
    cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its first handle, or deterministic mode raises
    at the first matmul; set here, before the process group (and any CUDA work) exists."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def configure_numerics(device: torch.device, deterministic: bool) -> None:
    """On CUDA: fp32 matmuls may use TF32 (``set_float32_matmul_precision("high")``, as torchtitan),
    unless training.deterministic asks for reproducible bits. The CPU keeps "highest" (its results
    are what the tests compare)."""
    if device.type == "cuda" and not deterministic:
        torch.set_float32_matmul_precision("high")


def attention_kernel(device_type: str, dtype: str, head_dim: int, capability: tuple[int, int] | None = None) -> str:
    """The SDPA kernel the model will run with ``allow_sdpa_backends``: "flash" (cuDNN / flash / the CPU
    flash kernel), "efficient" (memory-efficient) or "math". Flash and efficient save O(S) state for
    backward; math saves the B x H x S x S attention probabilities (flops.activation_bytes).

    From torch's sdp_utils checks: on the CPU the flash kernel takes any float dtype; on CUDA flash and
    cuDNN need bf16/fp16 and head_dim <= 256 divisible by 8, memory-efficient takes fp32 too and needs
    head_dim divisible by 4 (fp32) or 8 (16-bit). Flash and cuDNN need sm >= 8.0 and so does bf16 in the
    memory-efficient kernel: on an older GPU (``capability``; None = this process's GPU) a bf16 model runs
    MATH, an fp32 or fp16 one the memory-efficient kernel."""
    if device_type != "cuda":
        return "flash"
    modern = bf16_flash_capable(capability or cuda_capability())
    if dtype != "float32" and head_dim % 8 == 0 and head_dim <= 256 and modern:
        return "flash"
    if dtype == "bfloat16" and not modern:
        return "math"
    if head_dim % (4 if dtype == "float32" else 8) == 0:
        return "efficient"
    return "math"


# --------------------------------------------------------------------------- failures


# Words a collective's error carries when a peer died, hung or dropped its connection.
PEER_FAILURE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out",
                        "timeout", "watchdog", "socket", "peer")


def is_peer_failure(exc: BaseException) -> bool:
    """True when ``exc`` means a collective failed (a peer died or hung), for gloo and NCCL alike.

    torch raises ``DistError`` subclasses (DistBackendError, DistNetworkError, DistStoreError) from
    both backends; older paths raise a RuntimeError whose text names the backend or the socket."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(word in text for word in PEER_FAILURE_MARKERS)


def nccl_error_handling() -> None:
    """Before an NCCL process group starts: make NCCL's watchdog abort the communicator and let the
    blocked collective raise (TORCH_NCCL_ASYNC_ERROR_HANDLING=2, "clean up only") instead of tearing
    the process down with SIGABRT, so a collective failure reaches train.py's exit code 4 with a
    message like under gloo. A value the user set is kept."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


# --------------------------------------------------------------------------- memory


def drop_gradients(*objects: Any, optimizer_state: bool = False) -> None:
    """Set every gradient of these models / optimizers to None (a finished stage's last gradients);
    with ``optimizer_state`` also empty the optimizers' state (moments, step counts)."""
    for obj in objects:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                p.grad = None
        elif obj is not None and hasattr(obj, "zero_grad"):
            obj.zero_grad(set_to_none=True)
            if optimizer_state:
                for opt in getattr(obj, "optimizers", [obj]):
                    opt.state.clear()


def collect_garbage() -> None:
    """Free what is no longer referenced, now: unreachable cycles, then cached CUDA blocks.

    FSDP2 modules hold reference cycles (hooks and states point back at their module), so dropping
    the last name of a model frees nothing until the cyclic garbage collector happens to run; until
    then a finished stage's shards and last gradients stay resident into the next stage (issue 15,
    defect 3). The trainer drops its names of the previous stage, then calls this."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- compiled blocks


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each transformer block, as torchtitan's ``apply_compile`` (one graph per block
    structure, reused across blocks of the same structure), after activation checkpointing (so the
    checkpointed forward is what compiles). Before or after ``fully_shard`` is the same: FSDP2's
    all-gather and reduce-scatter are module hooks around ``forward``, not part of it.

    torchtitan wraps each block in an ``OptimizedModule``, which renames every parameter
    (``_orig_mod.``) and would break name-based growth and checkpoints; here the block's ``forward``
    is replaced on the instance by its compiled version, so names stay and FSDP2's hooks (which run
    around ``forward``) stay outside the graph. A new stage builds new blocks, so every stage compiles
    its own; dynamo's guards (module types, parameter shapes, ``training``, and module hooks, which
    dynamo does not guard by default) keep a graph from being reused by a block it does not fit, and a
    grown or adapted block recompiles."""
    import torch._dynamo

    # dynamo skips guards on module hooks by default (skip_nnmodule_hook_guards): a graph traced for a
    # block without hooks would be reused for a same-structure block whose linears carry hooks (growth's
    # MSG mask on the new blocks; APEX's scoring hooks, added and removed during a stage) and the hooks
    # would silently not run. Guarding them costs a dict-length check per submodule call.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    # One code object (Block.forward) serves dense, LoRA and other adapted blocks, in train and eval
    # mode, at every stage's width: more variants than dynamo's default of 8 recompiles per code
    # object, after which it would silently run the block eagerly.
    limit = max(64, getattr(torch._dynamo.config, "recompile_limit", 8))
    torch._dynamo.config.recompile_limit = limit
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = max(limit * 4, torch._dynamo.config.accumulated_recompile_limit)
    for block in model.layers.values():
        # fullgraph=False (torchtitan: True): a plugin's forward hook may graph-break (APEX's scoring
        # reads activations to the CPU); the block's own code still compiles to one graph.
        block.forward = torch.compile(block.forward, backend=backend)  # type: ignore[method-assign]
