"""LEMON width growth (registry/growth/lemon.py): exact for any widths, moments follow the gradient,
copies diverge under training where FPI's do not; and the same growth on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import run_distributed
from steptitan.growth import dense_params
from steptitan.model import ModelShape
from steptitan.registry.growth.lemon import expand, param_roles, split_coefficients
from test_growth import assert_same_function, grow, logits_pair, make, shapes


@st.composite
def lemon_options(draw, shape: ModelShape) -> dict:
    """Any growth of any width, by any amount (not only whole factors), GQA per KV group."""
    mapping = draw(st.sampled_from(["cyclic", "random"]))
    kv_k, group_k = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    opts = dict(mapping=mapping, seed=draw(st.integers(0, 99)), alpha=draw(st.sampled_from([0.6, 0.75, 0.3])),
                dim=shape.dim + draw(st.integers(0, 2 * shape.dim)), ffn_hidden=shape.ffn_hidden + draw(st.integers(0, 40)),
                n_heads=shape.n_heads * kv_k * group_k, n_kv_heads=shape.n_kv_heads * kv_k)
    if opts["dim"] == shape.dim and opts["ffn_hidden"] == shape.ffn_hidden and kv_k * group_k == 1:
        opts["dim"] += 1
    return opts


@settings(max_examples=60)
@given(shape=shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_lemon_preserves_the_function(shape, seed, data):
    op = make("lemon", **data.draw(lemon_options(shape)))
    assert op.is_exact(shape)
    small, big = grow(op, shape, seed)
    assert_same_function(*logits_pair(small, big, shape, seed))


@pytest.mark.parametrize("tied", [False, True])
def test_non_integer_factors_96_to_160_and_3_to_5_heads_with_gqa(tied):
    shape = ModelShape(dim=96, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=64, ffn_hidden=80,
                       tie_embeddings=tied, max_seq_len=16)
    op = make("lemon", dim=160, n_heads=5, ffn_hidden=136)
    assert op.target_shape(shape).head_dim == 32 and op.target_shape(shape).n_kv_heads == 1
    small, big = grow(op, shape, 1)
    a, b = logits_pair(small, big, shape, 1)
    assert_same_function(a, b)
    # the same growth by bert2bert's FPI is not exact: 160 / 96 copies are uneven, RMSNorm's mean square moves
    fpi_small, fpi_big = grow(make("bert2bert", dim=160, n_heads=5, ffn_hidden=136), shape, 1)
    a, b = logits_pair(fpi_small, fpi_big, shape, 1)
    assert (a - b).abs().max() > 1e-4 * a.abs().max()


def test_split_coefficients_sum_to_one_and_differ():
    a = split_coefficients(torch.tensor([0, 1, 2, 0, 1, 0]), 0.6)
    torch.testing.assert_close(a, torch.tensor([0.6, 0.6, 1.0, 0.24, 0.4, 0.16], dtype=torch.float64))


def test_bad_alpha_and_mapping_are_refused():
    """The recipe schema refuses them (ranges and choices declared on LemonOptions), naming the key."""
    from conftest import REPO
    from steptitan.recipe import RecipeError, load_recipe_dict, recipe_from_dict

    for key, bad in (("alpha", 0.0), ("alpha", 1.0), ("mapping", "nope"), ("optimizer_state", "carry")):
        data = load_recipe_dict(REPO / "recipes" / "step.toml", [])
        data["stages"][1]["growth"] = {"name": "lemon", "dim": data["model"]["dim"] + 32, key: bad}
        with pytest.raises(RecipeError, match=key):
            recipe_from_dict(data)


@settings(max_examples=25)
@given(shape=shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_grown_gradient_is_the_moment_transform_of_the_old_gradient(shape, seed, data):
    """optimizer_state = "copy" grows exp_avg like the gradient: checked against real backward passes."""
    op = make("lemon", **data.draw(lemon_options(shape)))
    small, big = grow(op, shape, seed)
    x = torch.randint(0, shape.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
    for model in (small, big):
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    splits = op.splits(shape)
    big_params = dense_params(big, shape)
    for name, p in dense_params(small, shape).items():
        want = expand(p.grad, param_roles(name, shape.tie_embeddings), splits, "exp_avg")
        got = big_params[name].grad
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()), msg=name)


# ----------------------------------------------------------------------------- symmetry breaking


def copy_divergence(op, steps: int, seed: int = 0, lr: float = 3e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, relative distance |w_i - w_j| / |w_i|) between the w1 rows of every FFN channel and each of
    its copies, after ``steps`` AdamW steps of the grown model (tools/width_symmetry.py prints these)."""
    shape = ModelShape(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, ffn_hidden=24, max_seq_len=32)
    _, big = grow(op, shape, seed)
    opt = torch.optim.AdamW(big.parameters(), lr=lr)
    for s in range(steps):
        x = torch.randint(0, shape.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1000 + s))
        F.cross_entropy(big(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    w1 = big.layers["0"].feed_forward.w1.weight.detach()
    first: dict[int, int] = {}
    pairs = []  # (position of the old unit, position of one of its copies)
    for p, u in enumerate(op.expansions(shape)["ffn"].index.tolist()):
        if u in first:
            pairs.append((first[u], p))
        else:
            first[u] = p
    i, j = torch.tensor(pairs).T
    return F.cosine_similarity(w1[i], w1[j], dim=1), (w1[i] - w1[j]).norm(dim=1) / w1[i].norm(dim=1)


def test_lemon_copies_diverge_where_fpi_copies_do_not():
    _, fpi = copy_divergence(make("bert2bert", ffn_hidden=48), steps=10)
    _, lemon = copy_divergence(make("lemon", ffn_hidden=48, alpha=0.6), steps=10)
    assert fpi.max() == 0  # identical gradients: the copies stay bit-for-bit identical
    # Under AdamW the divergence starts slowly (docs/growth.md, "lemon"): every copy has moved, by > 1e-4
    assert lemon.min() > 1e-4


# ----------------------------------------------------------------------------- 2 ranks


def lemon_on_two_ranks(env, cases) -> int:
    from test_growth_dist import sharded_matches_single_process

    return sharded_matches_single_process(env, cases)


@pytest.mark.dist
def test_sharded_lemon_growth_equals_single_process_growth():
    """FSDP2 on 2 ranks: grown logits == the single-process grown model == the small model; carried moments equal."""
    cases = [
        (ModelShape(dim=12, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=37, ffn_hidden=13, max_seq_len=16),
         "lemon", dict(dim=20, n_heads=5, ffn_hidden=21, optimizer_state="fresh"), 3),
        (ModelShape(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=29, ffn_hidden=10, tie_embeddings=True,
                    max_seq_len=16), "lemon", dict(dim=28, n_heads=12, n_kv_heads=4, ffn_hidden=17, mapping="random",
                                                   optimizer_state="copy"), 5),
        (ModelShape(dim=96, n_layers=1, n_heads=3, n_kv_heads=1, vocab_size=31, ffn_hidden=24, max_seq_len=16),
         "lemon", dict(dim=160, n_heads=5, ffn_hidden=40, optimizer_state="copy"), 7),
    ]
    assert run_distributed(lemon_on_two_ranks, 2, cases=cases) == [len(cases), len(cases)]
