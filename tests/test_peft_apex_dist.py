"""APEX on FSDP2 shards over 2 real gloo ranks.

* every rank trains on different data, yet both end with the same selection, and it equals the ranking
  of the votes one process casts on both ranks' batches (the all-reduce is a sum of votes);
* the selection (the identity expansion) leaves the sharded model's logits equal to the dense model's;
* fusion of random adapters leaves the logits unchanged and matches the single-process fusion.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_distributed
from steptitan.model import ModelShape

pytestmark = pytest.mark.dist

SHAPES = [  # GQA, rows that do not split evenly over 2 ranks, heads of 1 KV group
    ModelShape(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=37, ffn_hidden=27, max_seq_len=16),
    ModelShape(dim=18, n_layers=1, n_heads=3, n_kv_heads=3, vocab_size=29, ffn_hidden=13, max_seq_len=16),
    ModelShape(dim=24, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=23, ffn_hidden=40, max_seq_len=16),
]


def _apex_model(env, shape: ModelShape, seed: int, sharded: bool):
    from steptitan.distributed import local_part, local_tensor, shard_model
    from steptitan.model import build_model, init_model_weights
    from steptitan.registry import PEFT
    from test_peft_apex import dense

    ref = dense(shape, seed)
    cls = PEFT.get("apex")
    method = cls(cls.Options(score_steps=2, ffn_ratio=0.25), list(range(shape.n_layers)), seed=seed)
    if not sharded:
        method.apply(ref)
        method.init_weights(ref)
        return ref, method
    model = build_model(shape)
    method.apply(model)
    shard_model(model, env.mesh)
    model.to_empty(device=env.device)
    full = dict(ref.named_parameters())
    with torch.no_grad():
        init_model_weights(model)  # buffers (RoPE)
        for name, p in model.named_parameters():
            if name in full:
                local_tensor(p).copy_(local_part(full[name], p))
    method.init_weights(model)
    return model, method


def _randomize(model, method, seed: int) -> None:
    """The same full random adapters on every rank and in the single process (each keeps its shard)."""
    from steptitan.distributed import local_part, local_tensor

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in method.modules(model):
            for p in m.adapters():
                full = torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0)
                local_tensor(p).copy_(local_part(full, p))


def apex_on_two_ranks(env) -> list[dict]:
    from steptitan.peft import StepContext
    from steptitan.registry.peft.apex import rank_units
    from test_peft_apex import batch, dense, loss_of

    out = []
    for i, shape in enumerate(SHAPES):
        seed = 10 * i
        model, method = _apex_model(env, shape, seed, sharded=True)
        single, single_method = _apex_model(env, shape, seed, sharded=False)
        model.train()
        single.train()
        for step in range(2):  # the scoring window: each rank its own data; one process sees both ranks' data
            loss_of(model, batch(shape, 100 * step + env.rank)).backward()
            for r in range(env.world_size):
                loss_of(single, batch(shape, 100 * step + r)).backward()
        expected = {k: rank_units(v, single_method.k_of(k.split(".")[1], v.numel()))
                    for k, v in single_method.counts.items()}
        method.after_optimizer_step(StepContext(2, model, None, 0, 10))  # all-reduce + ranking
        assert method.scored
        for key, chosen in expected.items():
            assert torch.equal(method.selection[key], chosen), (shape, key)
        x = batch(shape, 7)[:, :-1]
        with torch.no_grad():
            want = dense(shape, seed)(x)
            init_logits = model(x)
        torch.testing.assert_close(init_logits, want, rtol=0, atol=1e-6 * max(1.0, want.abs().max().item()))
        # fusion, sharded and single-process, with the same selection and adapters
        single_method.selection = {k: v.clone() for k, v in method.selection.items()}
        single_method.scored = True
        single_method.apply_selection(single)
        _randomize(model, method, seed + 1)
        _randomize(single, single_method, seed + 1)
        with torch.no_grad():
            mixed, single_mixed = model(x), single(x)
            method.merge(model)
            fused = model(x)
        scale = max(1.0, mixed.abs().max().item())
        torch.testing.assert_close(mixed, single_mixed, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(fused, mixed, rtol=0, atol=1e-6 * scale)
        assert (mixed - want).abs().max() > 1e-3
        out.append({k: v.tolist() for k, v in method.selection.items()})
    return out


def test_apex_on_two_ranks_one_ranking_exact_init_and_fusion():
    per_rank = run_distributed(apex_on_two_ranks, 2)
    assert per_rank[0] == per_rank[1]  # the selection is identical on every rank
