"""``GrowthOperator.grow`` called the way a plugin author first calls it (issue 23, item 13).

After a forward FSDP2 keeps the root module's parameters (embeddings, final norm, LM head)
unsharded; the shard-local copy then met whole tensors and failed with "The size of tensor a (128)
must match the size of tensor b (257)". ``grow`` now reshards both models itself. Two real gloo
ranks; a vocabulary of 257 rows splits unevenly (129 / 128), as in the report.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_distributed

pytestmark = pytest.mark.dist


def _grow_after_forward(env) -> list[str]:
    from steptitan.distributed import full_tensor, shard_model
    from steptitan.growth import SameShape
    from steptitan.model import ModelShape, build_model, init_model_weights
    from steptitan.registry import GROWTH

    shape = ModelShape(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=257, ffn_hidden=24, max_seq_len=16)

    def sharded(seed: int) -> torch.nn.Module:
        model = build_model(shape)
        shard_model(model, env.mesh)
        model.to_empty(device=env.device)
        init_model_weights(model, seed=seed)
        return model

    problems = []
    tokens = torch.randint(0, shape.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    stack = GROWTH.get("stack")
    for name, grower, dst_shape, layer_of in (
            ("copy", SameShape(), shape, lambda j: j),
            ("stack", stack(stack.Options(growth_factor=2)), shape.replace(n_layers=4), lambda j: j % 2)):  # 0 1 0 1
        src = sharded(1)
        with torch.no_grad():
            src(tokens)  # the root stays unsharded
        dst = build_model(dst_shape)
        shard_model(dst, env.mesh)
        dst.to_empty(device=env.device)
        init_model_weights(dst, seed=2)
        dst(tokens).sum().backward()  # and a dst that ran forward and backward
        grower.grow(src, dst, shape)
        want = {k: full_tensor(v) for k, v in src.named_parameters()}
        for key, p in dst.named_parameters():
            if key.startswith("layers."):
                _, j, rest = key.split(".", 2)
                key = f"layers.{layer_of(int(j))}.{rest}"
            if not torch.equal(full_tensor(p), want[key]):
                problems.append(f"{name}: {key} differs")
    return problems


def test_grow_reshards_a_model_that_just_ran_a_forward():
    assert run_distributed(_grow_after_forward, 2) == [[], []]
