"""Foundation properties: LoRA at init keeps the function; interpolation gives the intended layers."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from conftest import dense
from steptitan.model import ModelShape
from steptitan.registry import GROWTH, PEFT


@st.composite
def shapes(draw, max_layers: int = 3) -> ModelShape:
    head_dim = draw(st.sampled_from([2, 4, 8]))
    n_kv = draw(st.integers(1, 3))
    n_heads = n_kv * draw(st.integers(1, 3))
    return ModelShape(
        dim=n_heads * head_dim, n_layers=draw(st.integers(1, max_layers)), n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=draw(st.integers(8, 64)), ffn_hidden=draw(st.integers(4, 48)),
        tie_embeddings=draw(st.booleans()), max_seq_len=16,
    )


@settings(max_examples=40)
@given(shape=shapes(), seed=st.integers(0, 2**16), rank=st.integers(1, 6),
       layer_choice=st.sampled_from(["all", "first", "none"]), init=st.sampled_from(["kaiming", "gaussian"]),
       targets=st.sampled_from([["wq", "wk", "wv", "wo", "w1", "w2", "w3"], ["wq", "wv"], ["feed_forward.*"]]))
def test_lora_at_init_leaves_outputs_unchanged(shape, seed, rank, layer_choice, init, targets):
    model = dense(shape, seed)
    tokens = torch.randint(0, shape.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = model(tokens)
    layers = {"all": list(range(shape.n_layers)), "first": [0], "none": []}[layer_choice]
    lora = PEFT.get("lora")(PEFT.get("lora").Options(rank=rank, alpha=2.0 * rank, init=init, targets=targets), layers, seed=seed)
    lora.apply(model)
    lora.init_weights(model)
    adapters = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert len(adapters) == (0 if not layers else len(layers) * (7 if len(targets) == 7 else 2 if targets == ["wq", "wv"] else 3))
    for m in adapters:  # A is random (no A = B = 0 dead start), B is zero, base frozen
        assert m.lora_A.abs().sum() > 0 and m.lora_B.abs().sum() == 0
        assert not m.weight.requires_grad and m.lora_A.requires_grad and m.lora_B.requires_grad
    with torch.no_grad():
        after = model(tokens)
    assert torch.equal(before, after)  # B = 0 exactly, so the adapter adds exact zeros


@settings(max_examples=40)
@given(shape=shapes(), seed=st.integers(0, 2**16), init=st.sampled_from(["copy", "mean"]),
       position=st.sampled_from(["uniform", "upper", "lower"]), data=st.data())
def test_interpolation_layer_order_and_copies(shape, seed, init, position, data):
    n_new = data.draw(st.integers(1, shape.n_layers)) if position != "uniform" else data.draw(st.integers(1, 2 * shape.n_layers))
    op_cls = GROWTH.get("interpolate")
    op = op_cls(op_cls.Options(n_new=n_new, position=position, init=init))
    small = dense(shape, seed)
    big_shape = op.target_shape(shape)
    assert big_shape.n_layers == shape.n_layers + n_new
    big = dense(big_shape, seed + 1)
    op.grow(small, big, shape)
    sources = op.layer_sources(shape)
    # Old layers appear in order, each followed by the layers inserted after it.
    assert [s.sources[0] for s in sources if not s.new] == list(range(shape.n_layers))
    after = op.insert_after(shape.n_layers)
    if position == "upper":
        assert after == list(range(shape.n_layers - n_new, shape.n_layers))
    elif position == "lower":
        assert after == list(range(n_new))
    j = 0
    for i in range(shape.n_layers):
        assert not sources[j].new and sources[j].sources == (i,)
        j += 1 + after.count(i)
    small_sd, big_sd = small.state_dict(), big.state_dict()
    for j, src in enumerate(sources):
        for key, value in big.layers[str(j)].state_dict().items():
            expected = torch.stack([small_sd[f"layers.{i}.{key}"] for i in src.sources]).mean(0)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
    for key in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        assert torch.equal(big_sd[key], small_sd[key])


def test_interpolation_uniform_doubling_is_the_step_layout():
    op = GROWTH.get("interpolate")()
    shape = ModelShape(dim=8, n_layers=3, n_heads=2, n_kv_heads=2, vocab_size=16, ffn_hidden=8)
    # [L0, L0', L1, L1', L2, L2'] with copies of the layer before (STEP / methods.md "Interpolation")
    assert [(s.sources, s.new) for s in op.layer_sources(shape)] == [
        ((0,), False), ((0,), True), ((1,), False), ((1,), True), ((2,), False), ((2,), True)]
