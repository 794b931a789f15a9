"""The model: torchtitan's llama3 ``Transformer``, described by a ``ModelShape``.

``ModelShape`` is the one description of a model's size that growth operators
transform and the planner counts; ``build_model`` turns it into torchtitan's
``TransformerModelArgs`` and ``Transformer``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Collection

import torch
from torch import nn
from torchtitan.models.llama3 import Transformer, TransformerModelArgs
from torchtitan.models.llama3.model.args import RoPEScalingArgs
from torchtitan.models.llama3.model.model import precompute_freqs_cis

from steptitan.device import allow_sdpa_backends
from steptitan.distributed import derive_seed, local_tensor, scatter_rows, shard_degree, shard_index
from steptitan.recipe import ModelConfig

allow_sdpa_backends()  # fp32 on CUDA gets the memory-efficient SDPA kernel instead of MATH (docs/gpu.md)


@dataclass(frozen=True)
class ModelShape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_hidden: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    # None = torchtitan's dim // n_heads. Set by width growth, which keeps
    # head_dim fixed while dim or n_heads grow (bert2BERT; methods.md).
    fixed_head_dim: int | None = None
    # Llama 3 rotary frequency scaling (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), which torchtitan's llama3 always applies;
    # factor 1 leaves every frequency as it is (plain RoPE, e.g. an imported Llama 2).
    rope_scaling: tuple[float, float, float, int] = (8.0, 1.0, 4.0, 8192)

    @property
    def head_dim(self) -> int:
        return self.fixed_head_dim or self.dim // self.n_heads

    def replace(self, **changes) -> "ModelShape":
        return dataclasses.replace(self, **changes)

    def layer_params(self) -> int:
        """Parameters of one transformer block (P in the STEP memory model)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = self.dim * q * 2 + self.dim * kv * 2  # wq, wo, wk, wv
        ffn = 3 * self.dim * self.ffn_hidden  # w1, w2, w3 (SwiGLU)
        return attn + ffn + 2 * self.dim  # + two RMSNorm weights

    def embedding_params(self) -> int:
        """Token embeddings, final norm and LM head (shared once when tied)."""
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.dim + head

    def num_params(self) -> int:
        return self.n_layers * self.layer_params() + self.embedding_params()


def torchtitan_ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """torchtitan's SwiGLU hidden size rule (llama3 FeedForward.__init__)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def shape_from_config(cfg: ModelConfig, max_seq_len: int) -> ModelShape:
    ffn = cfg.ffn_hidden or torchtitan_ffn_hidden(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier)
    return ModelShape(
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads or cfg.n_heads,
        vocab_size=cfg.vocab_size,
        ffn_hidden=ffn,
        norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_embeddings=cfg.tie_embeddings,
        max_seq_len=max_seq_len,
        rope_scaling=(float(cfg.rope_scaling.factor), float(cfg.rope_scaling.low_freq_factor),
                      float(cfg.rope_scaling.high_freq_factor), int(cfg.rope_scaling.original_max_position_embeddings)),
    )


def model_args(shape: ModelShape) -> TransformerModelArgs:
    # torchtitan derives the FFN width from dim; with multiple_of=1 this
    # multiplier reproduces shape.ffn_hidden exactly (int() of x + 0.5 ... x).
    base = int(2 * (4 * shape.dim) / 3)
    return TransformerModelArgs(
        dim=shape.dim,
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        n_kv_heads=shape.n_kv_heads,
        vocab_size=shape.vocab_size,
        multiple_of=1,
        ffn_dim_multiplier=(shape.ffn_hidden + 0.5) / base,
        norm_eps=shape.norm_eps,
        rope_theta=shape.rope_theta,
        rope_scaling_args=RoPEScalingArgs(*shape.rope_scaling),
        max_seq_len=shape.max_seq_len,
        attn_type="sdpa",
        depth_init=True,
    )


def build_model(shape: ModelShape, device: str | torch.device = "meta") -> Transformer:
    """A torchtitan llama3 Transformer of ``shape`` (on meta by default: no memory)."""
    with torch.device(device):
        model = Transformer(model_args(shape))
        if shape.head_dim != shape.dim // shape.n_heads:
            set_head_dim(model, shape)
    if shape.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    assert model.layers["0"].feed_forward.w1.out_features == shape.ffn_hidden
    return model


def set_head_dim(model: Transformer, shape: ModelShape) -> None:
    """Rebuild the attention projections for ``shape.head_dim`` != dim // n_heads.

    torchtitan's Attention and RoPE table derive head_dim from dim // n_heads;
    width growth that keeps head_dim fixed needs n_heads * head_dim != dim.
    """
    hd = shape.head_dim
    for block in model.layers.values():
        attn = block.attention
        attn.head_dim = hd
        attn.wq = nn.Linear(shape.dim, shape.n_heads * hd, bias=False)
        attn.wk = nn.Linear(shape.dim, shape.n_kv_heads * hd, bias=False)
        attn.wv = nn.Linear(shape.dim, shape.n_kv_heads * hd, bias=False)
        attn.wo = nn.Linear(shape.n_heads * hd, shape.dim, bias=False)
    args = model.model_args
    # init_weights() recomputes the table through this method, so override it on the instance.
    model._precompute_freqs_cis = lambda: precompute_freqs_cis(hd, args.max_seq_len, args.rope_theta, args.rope_scaling_args)
    model.freqs_cis = model._precompute_freqs_cis()


def shape_of(model: Transformer) -> ModelShape:
    """The ``ModelShape`` a built (possibly sharded or PEFT-adapted) model has."""
    args = model.model_args
    attn = model.layers["0"].attention if len(model.layers) else None
    head_dim = attn.head_dim if attn is not None else args.dim // args.n_heads
    rs = args.rope_scaling_args
    return ModelShape(
        dim=args.dim, n_layers=len(model.layers), n_heads=args.n_heads, n_kv_heads=args.n_kv_heads or args.n_heads,
        vocab_size=args.vocab_size,
        ffn_hidden=model.layers["0"].feed_forward.w1.out_features if len(model.layers) else 1,
        norm_eps=args.norm_eps, rope_theta=args.rope_theta,
        tie_embeddings=model.output.weight is model.tok_embeddings.weight, max_seq_len=args.max_seq_len,
        fixed_head_dim=None if head_dim == args.dim // args.n_heads else head_dim,
        rope_scaling=(rs.scaling_factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings),
    )


def init_units(shape: ModelShape) -> list[str]:
    """The initialisation's units by name prefix: every block ("layers.j."), then the root ("": embeddings,
    final norm, LM head). Each is drawn from its own seed (``init_model_weights``)."""
    return [f"layers.{j}." for j in range(shape.n_layers)] + [""]


@torch.no_grad()
def init_model_weights(model: Transformer, shape: ModelShape | None = None, seed: int | None = None,
                       filled: Collection[str] = ()) -> None:
    """torchtitan's initialisation, drawn on full tensors: a function of (shape, seed) alone.

    On a CPU device mesh DTensor's random ops have no RNG tracker, so drawing
    on sharded parameters gives every rank the same local values (each 2-rank
    weight would be two copies of one half; issue 11). Instead each FSDP unit
    (a block, then the root: embeddings, final norm, LM head) is materialised
    unsharded on CPU as a twin, initialised by torchtitan's own ``init_weights``
    (so its stds, depth init and truncation are used as they are) from a CPU
    generator seeded by (seed, unit). The result is identical at any world
    size and on CPU or GPU. PEFT parameters are left to the PEFT method's
    ``init_weights``; a tied LM head stays tied (the head's init wins, as in
    torchtitan). ``seed=None`` draws one from the global torch RNG.

    At scale (issue 23, item 7) no rank draws the whole model: the units are dealt round robin over
    the shard group (unit i is drawn by shard rank i mod W, on its own CPU, one unit at a time) and
    the owner scatters each parameter's dim-0 chunks, so a rank draws 1/W of the model and holds its
    shards plus at most one unit. Units in ``filled`` (prefixes from ``init_units``) are skipped:
    growth or a checkpoint / Hugging Face load overwrites them, and every unit has its own seed, so
    skipping one does not change another's values. Under HSDP each replica's shard group deals the
    same units and draws the same values.
    """
    shape = shape or shape_of(model)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    anchor = model.tok_embeddings.weight
    device = local_tensor(anchor).device
    with torch.device(device):  # the RoPE table (a non-persistent buffer)
        model.freqs_cis = model._precompute_freqs_cis()
    params = dict(model.named_parameters(remove_duplicate=False))
    twin = build_model(shape)  # meta: allocates nothing until a unit is materialised
    degree, me = shard_degree(anchor), shard_index(anchor)
    drawn = [u for u in init_units(shape) if u not in set(filled)]

    def fill(prefix: str, unit: nn.Module, init: Callable[[], None]) -> None:
        owner = drawn.index(prefix) % degree
        if owner == me:
            unit.to_empty(device="cpu")
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(derive_seed(seed, "init", prefix))
                init()
        # remove_duplicate=False: to_empty unties a tied twin on the owner only; every rank must list the
        # same names to take part in the same scatters (the head is written last and wins, as before)
        for name, full in unit.named_parameters(remove_duplicate=False):
            dst = params.get(prefix + name)
            if dst is None:
                raise ValueError(f"init: the model has no parameter {prefix + name!r} (a plugin renamed a dense weight?)")
            scatter_rows(full.detach() if owner == me else None, dst, owner)
        unit.to_empty(device="meta")  # free the twin's memory

    for j, block in twin.layers.items():
        if f"layers.{j}." in drawn:
            fill(f"layers.{j}.", block, block.init_weights)
    twin.layers = nn.ModuleDict()  # the root unit: embeddings, final norm, LM head
    if "" in drawn:
        fill("", twin, lambda: twin.init_weights(buffer_device=torch.device("cpu")))


def base_param_names(shape: ModelShape) -> set[str]:
    """Names of the dense model's own parameters (not PEFT additions) for ``shape``."""
    return {name for name, _ in build_model(shape).named_parameters()}


def layer_group_of(name: str, old_layers: set[int]) -> str:
    """The layer group ("old", "new", "embeddings", "head") a parameter belongs to."""
    if name.startswith("layers."):
        return "old" if int(name.split(".")[1]) in old_layers else "new"
    if name.startswith("tok_embeddings"):
        return "embeddings"
    return "head"  # final norm and output projection


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts, counting a tied weight once."""
    trainable = frozen = 0
    for p in model.parameters():  # parameters() de-duplicates shared tensors
        n = p.numel()
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return trainable, frozen


def params_by_group(model: nn.Module, old_layers: set[int], base_names: set[str]) -> dict[str, dict[str, int]]:
    """{"trainable": {group: n}, "frozen": {group: n}} with groups old/new/embeddings/head/adapters."""
    out = {kind: dict.fromkeys(("old", "new", "embeddings", "head", "adapters"), 0) for kind in ("trainable", "frozen")}
    for name, p in model.named_parameters():
        group = layer_group_of(name, old_layers) if name in base_names else "adapters"
        out["trainable" if p.requires_grad else "frozen"][group] += p.numel()
    return out


def cast_frozen_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen parameter in ``dtype`` (on the meta model, before sharding).

    With bfloat16 this is the STEP paper's mixed-precision policy: frozen
    weights have no master copy, gradient or optimizer state, so 2 bytes each.
    FSDP2 requires one dtype only among a unit's trainable parameters, so
    mixing bf16 frozen and fp32 trainable parameters in a block is allowed."""
    if dtype == torch.float32:
        return
    replaced: dict[int, nn.Parameter] = {}  # a tied embedding/head Parameter stays one Parameter
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.requires_grad and p.dtype != dtype:
                if id(p) not in replaced:
                    replaced[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                setattr(module, name, replaced[id(p)])
