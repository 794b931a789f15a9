"""LoRA on the token embedding and the LM head (Hu et al. 2021, arXiv 2106.09685, Sec. 4; HF peft's LoRA ``Embedding``).

The base weights are frozen; rank-r factors train (s = alpha / r):

* embedding E (V x d): y = E[x] + s * (A^T[x] @ B^T), A = ``lora_embedding_A`` (r x V),
  B = ``lora_embedding_B`` (d x r), i.e. E' = E + s (B A)^T, as HF peft's ``lora.Embedding``.
  Init as HF peft (after loralib): A = 0, B ~ N(0, 1), so the function is unchanged;
* LM head W (V x d): logits = W h + s * B A h, A = ``lora_A`` (r x d), B = ``lora_B`` (V x r),
  an ordinary LoRA linear; init A ~ Kaiming-uniform(a = sqrt 5), B = 0 (lora's ``kaiming``);
* tied embedding/head (``model.tie_embeddings``): ONE adapter on the shared weight W. The
  embedding reads W' = W + s (B A)^T by rows, the head multiplies by W'^T (logits += s (h B) A),
  so the pair stays tied before and after the merge, and the merge folds it into W once.

``merge`` adds s (B A)^T (embedding, tied) or s B A (head) to this rank's rows of the base
weight and zeroes the factor that starts at zero (A of the embedding, B of the head): the
function is unchanged up to float32 rounding, and a later stage can keep training the adapter.
The layers of the recipe entry are ignored: the method adapts embeddings and head only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from steptitan.distributed import full_tensor, init_like, local_part, local_tensor, seeded_generator
from steptitan.peft import PeftMethod
from steptitan.registry import PEFT

EmbedTarget = Literal["embeddings", "head"]
TARGETS = get_args(EmbedTarget)


@dataclass
class LoRAEmbedOptions:
    rank: int = field(default=16, metadata={"gt": 0})  # r: inner dimension of the factors
    alpha: float = 32.0  # s = alpha / rank scales the update
    targets: list[EmbedTarget] = field(default_factory=lambda: list(TARGETS))  # embeddings | head (both when tied)


class LoRAEmbedding(nn.Embedding):
    """nn.Embedding plus a low-rank update of its table; ``weight`` keeps its name."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, scale: float, device=None):
        super().__init__(num_embeddings, embedding_dim, device=device)
        self.scale = scale
        self.lora_embedding_A = nn.Parameter(torch.empty(rank, num_embeddings, device=device))
        self.lora_embedding_B = nn.Parameter(torch.empty(embedding_dim, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A^T[x] (a row lookup of the r x V factor) @ B^T: HF peft's Embedding forward
        return F.embedding(x, self.weight) + self.scale * (F.embedding(x, self.lora_embedding_A.t()) @ self.lora_embedding_B.t())


class LoRAHead(nn.Linear):
    """The LM head plus its own low-rank update B A (untied); ``weight`` keeps its name."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, device=None):
        super().__init__(in_features, out_features, bias=False, device=device)
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, device=device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight) + self.scale * F.linear(F.linear(h, self.lora_A), self.lora_B)


class TiedLoRAHead(nn.Linear):
    """A tied LM head reading the embedding's adapter: logits = h W^T + s (h B) A, W shared with the embedding.

    The embedding module is held as a plain reference, not a submodule, so its factors are
    registered (and counted, sharded, checkpointed) once, under ``tok_embeddings``. FSDP2
    unshards the whole root unit before the forward, so reading them here sees the gathered
    parameters and their gradients accumulate into the same tensors.
    """

    def __init__(self, embedding: LoRAEmbedding, device=None):
        super().__init__(embedding.embedding_dim, embedding.num_embeddings, bias=False, device=device)
        object.__setattr__(self, "embedding", embedding)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        emb = self.embedding
        return F.linear(h, self.weight) + emb.scale * F.linear(F.linear(h, emb.lora_embedding_B.t()), emb.lora_embedding_A.t())


@torch.no_grad()
def add_rows(weight: torch.Tensor, delta_rows) -> None:
    """weight[rows] += delta_rows(rows) on this rank's rows only (rows = the global indices it holds).

    Building only the local rows keeps the temporary at the size of the shard, not of the
    V x d table; every rank holds the same (small) factors, so no communication happens."""
    rows = local_part(torch.arange(weight.shape[0]), weight)
    w = local_tensor(weight)
    if rows.numel():
        w.add_(delta_rows(rows).to(w.device, w.dtype))


@PEFT.register("lora_embed")
class LoRAEmbed(PeftMethod):
    Options = LoRAEmbedOptions
    description = "LoRA on the token embedding and the LM head, base weights frozen (one shared adapter when tied)"

    def __init__(self, options: LoRAEmbedOptions, layers: list[int], seed: int = 0):
        super().__init__(options, layers, seed)
        name = self.registry_name
        if not options.targets or len(set(options.targets)) != len(options.targets):  # choices: the schema
            raise ValueError(f"{name}.targets must be a non-empty list of distinct names from {list(TARGETS)}, got {options.targets}")
        self.scale = options.alpha / options.rank

    def label(self) -> str:
        """What --dry-run prints for this method."""
        return "+".join("emb" if t == "embeddings" else t for t in self.options.targets)

    def apply(self, model: nn.Module) -> None:
        emb, head = model.tok_embeddings, model.output
        if isinstance(emb, LoRAEmbedding) or isinstance(head, (LoRAHead, TiedLoRAHead)):
            raise ValueError("the embedding or LM head already has an adapter; two lora_embed methods in one stage")
        tied = head.weight is emb.weight
        targets = set(self.options.targets)
        if tied and targets != set(TARGETS):
            raise ValueError(
                f"{self.registry_name}.targets = {self.options.targets}, but the model ties its embedding and LM head "
                f"(model.tie_embeddings): they are one weight, so it takes one adapter used by both; set targets = "
                f"[\"embeddings\", \"head\"] (the default)")
        r, device = self.options.rank, emb.weight.device
        if "embeddings" in targets:
            new = LoRAEmbedding(emb.num_embeddings, emb.embedding_dim, r, self.scale, device=device)
            new.weight = emb.weight
            new.weight.requires_grad_(False)
            model.tok_embeddings = new
            emb = new
        if "head" in targets:
            if tied:
                out = TiedLoRAHead(emb, device=device)
            else:
                out = LoRAHead(head.in_features, head.out_features, r, self.scale, device=device)
            out.weight = head.weight
            out.weight.requires_grad_(False)
            model.output = out

    def modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in (("tok_embeddings", self.embedding(model)), ("output", self.head(model))) if m is not None]

    @staticmethod
    def embedding(model: nn.Module) -> LoRAEmbedding | None:
        return model.tok_embeddings if isinstance(model.tok_embeddings, LoRAEmbedding) else None

    @staticmethod
    def head(model: nn.Module) -> LoRAHead | None:
        return model.output if isinstance(model.output, LoRAHead) else None  # a tied head owns no factors

    @torch.no_grad()
    def init_weights(self, model: nn.Module) -> None:
        emb, head = self.embedding(model), self.head(model)
        if emb is not None:  # HF peft / loralib: A = 0, B ~ N(0, 1)
            local_tensor(emb.lora_embedding_A).zero_()
            init_like(emb.lora_embedding_B, lambda t, g: nn.init.normal_(t, generator=g),
                      seeded_generator(self.seed, "tok_embeddings", 0))
        if head is not None:  # lora's "kaiming": A Kaiming-uniform, B = 0
            init_like(head.lora_A, lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g),
                      seeded_generator(self.seed, "output", 0))
            local_tensor(head.lora_B).zero_()

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        """E += s (B A)^T and A = 0; W_head += s B A and B = 0 (the caller reshards FSDP2 first)."""
        emb, head = self.embedding(model), self.head(model)
        if emb is not None:
            a, b = full_tensor(emb.lora_embedding_A).float(), full_tensor(emb.lora_embedding_B).float()
            add_rows(emb.weight, lambda rows: emb.scale * (a[:, rows].t() @ b.t()))
            local_tensor(emb.lora_embedding_A).zero_()
        if head is not None:
            a, b = full_tensor(head.lora_A).float(), full_tensor(head.lora_B).float()
            add_rows(head.weight, lambda rows: head.scale * (b[rows] @ a))
            local_tensor(head.lora_B).zero_()
