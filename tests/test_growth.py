"""Growth operators, single process: exactness, intended relations, gradients, optimizer state, MSG mask.

Property tests draw random model shapes (dim via heads x head_dim, heads, KV heads, layers, FFN size,
vocab, tied or untied) and random tokens; counts are pinned per test (docs/growth.md, "Tests").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from steptitan.growth import dense_params
from steptitan.model import ModelShape
from steptitan.registry import GROWTH

from conftest import dense_every_block_matters as dense  # test_growth_dist and test_hsdp import it from here

SEQ = 7


@st.composite
def shapes(draw, min_layers: int = 1, max_layers: int = 3) -> ModelShape:
    head_dim = draw(st.sampled_from([2, 4, 8]))
    n_kv = draw(st.integers(1, 3))
    n_heads = n_kv * draw(st.integers(1, 3))
    return ModelShape(
        dim=n_heads * head_dim, n_layers=draw(st.integers(min_layers, max_layers)), n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=draw(st.integers(8, 64)), ffn_hidden=draw(st.integers(4, 48)),
        tie_embeddings=draw(st.booleans()), max_seq_len=16,
    )


def make(name: str, **options):
    cls = GROWTH.get(name)
    return cls(cls.Options(**options))


def grow(op, shape: ModelShape, seed: int):
    """(small model, grown model) with the grown one built from a different seed, then grown."""
    small = dense(shape, seed)
    big = dense(op.target_shape(shape), seed + 1)
    op.grow(small, big, shape)
    op.attach(big, shape)
    return small, big


def logits_pair(small, big, shape: ModelShape, seed: int):
    tokens = torch.randint(0, shape.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return small(tokens), big(tokens)


def assert_same_function(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(1.0, a.abs().max().item())
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * scale)


@st.composite
def width_options(draw, shape: ModelShape, exact: bool) -> dict:
    """bert2bert options that grow at least one width. exact=True: d_model grows by a whole factor with a
    cyclic or uniform mapping (or not at all); FFN and head growth are exact for any mapping."""
    mapping = draw(st.sampled_from(["cyclic", "random", "uniform"]))
    dim_k = draw(st.integers(1, 3)) if (mapping != "random" or not exact) else 1
    kv_k, group_k = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ffn = shape.ffn_hidden * draw(st.integers(1, 3)) if mapping == "uniform" else draw(st.integers(shape.ffn_hidden, 2 * shape.ffn_hidden + 3))
    opts = dict(mapping=mapping, seed=draw(st.integers(0, 99)), ffn_hidden=ffn,
                n_heads=shape.n_heads * kv_k * group_k, n_kv_heads=shape.n_kv_heads * kv_k)
    if dim_k > 1:
        opts["dim"] = shape.dim * dim_k
    if not exact and mapping != "uniform" and draw(st.booleans()):
        opts["dim"] = shape.dim + draw(st.integers(1, shape.dim - 1)) if shape.dim > 1 else shape.dim + 1
    if opts == dict(opts, dim=shape.dim) and ffn == shape.ffn_hidden and kv_k == group_k == 1:
        opts["ffn_hidden"] = shape.ffn_hidden * 2  # grow something
    return opts


@st.composite
def exact_growth(draw, shape: ModelShape) -> tuple[str, dict]:
    kind = draw(st.sampled_from(["interpolate", "stack", "bert2bert"]))
    if kind == "bert2bert":
        return kind, draw(width_options(shape, exact=True))
    exact_mode = draw(st.sampled_from([{"zero_out": True}, {"mask_steps": draw(st.integers(1, 50))}]))
    if kind == "interpolate":
        opts = dict(init=draw(st.sampled_from(["copy", "mean", "random"])), **exact_mode)
        if draw(st.booleans()):
            opts["after"] = draw(st.lists(st.integers(0, shape.n_layers - 1), min_size=1, max_size=4))
        else:
            opts["position"] = draw(st.sampled_from(["uniform", "upper", "lower"]))
            opts["n_new"] = draw(st.integers(1, shape.n_layers if opts["position"] != "uniform" else 4))
        return kind, opts
    if draw(st.booleans()):
        return kind, dict(growth_factor=draw(st.integers(2, 4)), **exact_mode)
    # an explicit layer-source list that keeps every old layer in order, with copies anywhere after their first use
    layers = list(range(shape.n_layers))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(1, len(layers)))
        layers.insert(pos, draw(st.sampled_from(sorted(set(layers[:pos])))))
    return kind, dict(layers=layers, **exact_mode)


# ----------------------------------------------------------------------------- exact modes


@settings(max_examples=100)
@given(shape=shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_exact_modes_preserve_the_function(shape, seed, data):
    name, opts = data.draw(exact_growth(shape))
    op = make(name, **opts)
    assert op.is_exact(shape)
    small, big = grow(op, shape, seed)
    a, b = logits_pair(small, big, shape, seed)
    assert_same_function(a, b)


@settings(max_examples=25)
@given(shape=shapes(min_layers=2), seed=st.integers(0, 2**16), data=st.data())
def test_non_exact_modes_change_the_function(shape, seed, data):
    """AKI, non-uniform d_model growth and plain stacking are not exact: is_exact says so and logits differ."""
    which = data.draw(st.sampled_from(["aki", "uneven_dim", "stack"]))
    if which == "aki":
        opts = data.draw(width_options(shape, exact=True))
        opts.update(method="aki", dim=shape.dim * 2, mapping="cyclic")  # d_model units exist in every layer
        op = make("bert2bert", **opts)
    elif which == "uneven_dim":
        op = make("bert2bert", dim=shape.dim + data.draw(st.integers(1, shape.dim - 1)) if shape.dim > 2 else 3,
                  mapping=data.draw(st.sampled_from(["cyclic", "random"])))
    else:
        op = make("stack", growth_factor=2)
    assert not op.is_exact(shape)
    small, big = grow(op, shape, seed)
    a, b = logits_pair(small, big, shape, seed)
    assert (a - b).abs().max() > 1e-4 * a.abs().max()


def test_stack_lists_that_drop_or_reorder_old_layers_are_not_exact():
    shape = ModelShape(dim=8, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=16, ffn_hidden=8, max_seq_len=16)
    assert make("stack", layers=[0, 1, 0, 2], zero_out=True).is_exact(shape)
    for layers in ([0, 1], [1, 0, 2], [0, 2, 1, 2]):
        op = make("stack", layers=layers, zero_out=True)
        assert not op.is_exact(shape)
        small, big = grow(op, shape, 0)
        a, b = logits_pair(small, big, shape, 0)
        assert (a - b).abs().max() > 1e-4 * a.abs().max()


def test_uneven_dim_of_one_unit_is_not_exact():
    shape = ModelShape(dim=2, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=16, ffn_hidden=4, max_seq_len=16)
    op = make("bert2bert", dim=3)
    assert not op.is_exact(shape) and make("bert2bert", dim=4).is_exact(shape)
    small, big = grow(op, shape, 0)
    a, b = logits_pair(small, big, shape, 0)
    assert (a - b).abs().max() > 1e-4 * a.abs().max()


# ----------------------------------------------------------------------------- intended relations


@settings(max_examples=30)
@given(shape=shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_stack_order_and_old_new_groups(shape, seed, data):
    if data.draw(st.booleans()):
        g = data.draw(st.integers(1, 4))
        op, order = make("stack", growth_factor=g), list(range(shape.n_layers)) * g
    else:
        order = data.draw(st.lists(st.integers(0, shape.n_layers - 1), min_size=1, max_size=6))
        op = make("stack", layers=order)
    small, big = grow(op, shape, seed)
    sources = op.layer_sources(shape)
    assert [s.sources for s in sources] == [(i,) for i in order]
    assert [s.new for s in sources] == [i in order[:j] for j, i in enumerate(order)]  # first copy is "old"
    for j, i in enumerate(order):
        for key, value in big.layers[str(j)].state_dict().items():
            assert torch.equal(value, small.layers[str(i)].state_dict()[key])


def test_interpolate_mean_with_explicit_positions():
    shape = ModelShape(dim=8, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=16, ffn_hidden=8, max_seq_len=16)
    op = make("interpolate", after=[2, 0], init="mean")
    small, big = grow(op, shape, 3)
    assert [(s.sources, s.new) for s in op.layer_sources(shape)] == [
        ((0,), False), ((0, 1), True), ((1,), False), ((2,), False), ((2,), True)]  # top layer: no upper neighbour
    w = lambda m, j: m.layers[str(j)].feed_forward.w1.weight  # noqa: E731
    torch.testing.assert_close(w(big, 1), (w(small, 0) + w(small, 1)) / 2, rtol=0, atol=1e-7)
    assert torch.equal(w(big, 4), w(small, 2)) and torch.equal(w(big, 3), w(small, 2))


@settings(max_examples=30)
@given(shape=shapes(min_layers=2), seed=st.integers(0, 2**16), data=st.data())
def test_fpi_copies_rows_and_splits_columns_aki_takes_new_units_from_the_layer_above(shape, seed, data):
    opts = data.draw(width_options(shape, exact=False))
    fpi, aki = make("bert2bert", **opts), make("bert2bert", **dict(opts, method="aki"))
    small, big = grow(fpi, shape, seed)
    _, big_aki = grow(aki, shape, seed)
    maps = fpi.expansions(shape)
    ffn = maps["ffn"]
    for j in range(shape.n_layers):
        s, b, k = (m.layers[str(j)].feed_forward for m in (small, big, big_aki))
        w1, w2 = s.w1.weight, s.w2.weight
        if maps["dim"] is not None:  # the FFN's own input columns are split along d_model first
            w1 = w1[:, maps["dim"].index] / maps["dim"].count
            w2 = w2[maps["dim"].index]
        if ffn is None:
            torch.testing.assert_close(b.w1.weight, w1, rtol=0, atol=1e-7)
            continue
        # FPI: w1 rows copied (so w1 and w3 move together), w2 columns divided by the copy count.
        torch.testing.assert_close(b.w1.weight, w1[ffn.index], rtol=0, atol=1e-7)
        torch.testing.assert_close(b.w2.weight, w2[:, ffn.index] / ffn.count, rtol=0, atol=1e-7)
        # AKI: old units as FPI, new units' rows from layer j+1 (the top layer uses itself).
        upper = big.layers[str(min(j + 1, shape.n_layers - 1))].feed_forward.w1.weight
        torch.testing.assert_close(k.w1.weight[~ffn.new], b.w1.weight[~ffn.new], rtol=0, atol=1e-7)
        torch.testing.assert_close(k.w1.weight[ffn.new], upper[ffn.new], rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- gradients and optimizer state


def one_step_grads(model, shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad()
    tokens = torch.randint(0, shape.vocab_size, (2, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _expand_module():
    import importlib

    return importlib.import_module(GROWTH.get("bert2bert").__module__)


@settings(max_examples=30)
@given(shape=shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_fpi_gradient_equals_the_moment_transform(shape, seed, data):
    """optimizer_state=copy grows exp_avg like this: copied rows /C, split columns copied. Under exact FPI it is
    the exact transform of the gradient, so running averages of gradients transform the same way."""
    b2b = _expand_module()
    op = make("bert2bert", **data.draw(width_options(shape, exact=True)))
    small, big = grow(op, shape, seed)
    g_small, g_big = one_step_grads(small, shape, seed), one_step_grads(big, shape, seed)
    maps = op.expansions(shape)
    for name in dense_params(big, shape):
        expected = b2b.expand(g_small[name], b2b.param_axes(name, shape.tie_embeddings), maps, "exp_avg")
        scale = max(1e-3, g_small[name].abs().max().item())
        torch.testing.assert_close(g_big[name], expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("op_spec", [
    ("bert2bert", dict(dim=32, ffn_hidden=40, n_heads=8, optimizer_state="copy")),
    ("stack", dict(growth_factor=2, zero_out=True, optimizer_state="copy")),
    ("interpolate", dict(init="mean", optimizer_state="copy")),
])
def test_carry_optimizer_state(op_spec):
    name, opts = op_spec
    shape = ModelShape(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_hidden=20, max_seq_len=16)
    op = make(name, **opts)
    small = dense(shape, 0)
    small.layers["1"].attention.wq.weight.requires_grad_(False)  # frozen in the old stage: no state to carry
    opt_small = torch.optim.AdamW([p for p in small.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        one_step_grads(small, shape, step)
        opt_small.step()
    big = dense(op.target_shape(shape), 1)
    op.grow(small, big, shape)
    opt_big = torch.optim.AdamW(big.parameters(), lr=1e-3)
    assert op.carry_optimizer_state(small, opt_small, big, opt_big, shape) > 0
    src, dst = dense_params(small, shape), dense_params(big, shape)
    for kind in ("exp_avg", "exp_avg_sq"):
        moments = {n: opt_small.state[p][kind] for n, p in src.items() if p in opt_small.state}
        expected = {n: torch.zeros_like(p) for n, p in dst.items()}
        filled = op.grow_tensors(moments, expected, shape, kind)
        for n, p in dst.items():
            if n in filled:
                assert torch.equal(opt_big.state[p][kind], expected[n]), n
                assert opt_big.state[p]["step"].item() == 3
            else:
                assert p not in opt_big.state, n  # fresh state
    sources = op.layer_sources(shape)
    for j, s in enumerate(sources):  # layer 1's frozen wq had no state: every copy of it starts fresh
        assert (dst[f"layers.{j}.attention.wq.weight"] in opt_big.state) == (1 not in s.sources)
        if name == "stack" and s.new:  # zeroed projections restart with fresh state
            assert dst[f"layers.{j}.attention.wo.weight"] not in opt_big.state
    # "fresh" (the default, STEP) carries nothing
    plain = make(name, **dict(opts, optimizer_state="fresh"))
    assert plain.carry_optimizer_state(small, opt_small, big, torch.optim.AdamW(big.parameters()), shape) == 0


@pytest.mark.parametrize("opts, copied_only", [
    # FFN 20 -> 30, cyclic: units 0..9 copied twice (C = 2), 10..19 once; w1/w3 rows copied, w2 columns split
    (dict(ffn_hidden=30, mapping="cyclic"), {"feed_forward.w1.weight": (0, torch.arange(30) % 20),
                                             "feed_forward.w3.weight": (0, torch.arange(30) % 20)}),
    # d_model 16 -> 32, uniform (each unit twice in a row: exact); wo/w2 rows, norms, embedding columns copied
    (dict(dim=32, mapping="uniform"), {"attention.wo.weight": (0, torch.arange(32) // 2),
                                       "feed_forward.w2.weight": (0, torch.arange(32) // 2),
                                       "attention_norm.weight": (0, torch.arange(32) // 2),
                                       "ffn_norm.weight": (0, torch.arange(32) // 2),
                                       "tok_embeddings.weight": (1, torch.arange(32) // 2),
                                       "norm.weight": (0, torch.arange(32) // 2)}),
])
def test_width_growth_carried_moments_give_the_small_models_adamw_step(opts, copied_only):
    """Independent of the operator's moment code: after growth with optimizer_state=copy, one real AdamW step on
    the grown model moves every copied weight exactly as the small model's own step moved its source (Adam's
    update m/sqrt(v) is invariant when the gradient of a C-fold copy is g/C, so exp_avg must be m/C and
    exp_avg_sq v/C^2; v/C would scale the copied rows' step by 1/sqrt(C)). Split weights (a column divided
    by C) are left out: Adam's step is not equivariant to that split whatever the moments are."""
    shape = ModelShape(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_hidden=20, max_seq_len=16)
    lr = 1e-2
    adamw = lambda params: torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1)  # noqa: E731
    op = make("bert2bert", optimizer_state="copy", **opts)
    small = dense(shape, 0)
    opt_small = adamw(small.parameters())
    for step in range(3):  # moments with some history
        one_step_grads(small, shape, step)
        opt_small.step()
    big = dense(op.target_shape(shape), 1)
    op.grow(small, big, shape)
    opt_big = adamw(big.parameters())
    op.carry_optimizer_state(small, opt_small, big, opt_big, shape)
    for model, opt in ((small, opt_small), (big, opt_big)):  # the same batch, one real step each
        one_step_grads(model, shape, 3)
        opt.step()
    small_p, big_p = dict(small.named_parameters()), dict(big.named_parameters())
    checked = set()
    for name, p in big_p.items():
        rest = name.split(".", 2)[2] if name.startswith("layers.") else name
        if rest in copied_only:
            checked.add(rest)
            dim, index = copied_only[rest]
            expected = small_p[name].index_select(dim, index)
        elif all(rest not in spec for spec in ("feed_forward.w2.weight", "wq", "wk", "wv", "w1", "w3", "output")) \
                and p.shape == small_p[name].shape:
            expected = small_p[name]  # untouched by this growth: the very same step
        else:
            continue  # split along a grown axis
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-3 * lr, msg=name)
    assert checked == set(copied_only)


# Reference layouts from the definition (docs/growth.md, registry/growth/interpolate.py): the grown model's layers
# as old-layer indices, "*" = a new copy. uniform: new layer k after old floor(k n_old / n_new); upper: after
# each of the top n_new old layers; lower: after each of the bottom n_new.
INTERPOLATE_LAYOUTS = [
    ("uniform", 4, 0, "0 0* 1 1* 2 2* 3 3*"),  # n_new = 0: doubling
    ("uniform", 3, 2, "0 0* 1 1* 2"),
    ("uniform", 4, 3, "0 0* 1 1* 2 2* 3"),
    ("uniform", 5, 2, "0 0* 1 2 2* 3 4"),
    ("uniform", 5, 3, "0 0* 1 1* 2 3 3* 4"),
    ("uniform", 3, 5, "0 0* 0* 1 1* 1* 2 2*"),
    ("uniform", 2, 3, "0 0* 0* 1 1*"),
    ("uniform", 1, 3, "0 0* 0* 0*"),
    ("upper", 4, 1, "0 1 2 3 3*"),
    ("upper", 5, 2, "0 1 2 3 3* 4 4*"),
    ("upper", 3, 3, "0 0* 1 1* 2 2*"),
    ("lower", 4, 1, "0 0* 1 2 3"),
    ("lower", 5, 2, "0 0* 1 1* 2 3 4"),
    ("lower", 5, 3, "0 0* 1 1* 2 2* 3 4"),
]


@pytest.mark.parametrize("position, n_old, n_new, layout", INTERPOLATE_LAYOUTS)
def test_interpolate_positions_follow_the_definition(position, n_old, n_new, layout):
    shape = ModelShape(dim=4, n_layers=n_old, n_heads=1, n_kv_heads=1, vocab_size=8, ffn_hidden=4, max_seq_len=8)
    op = make("interpolate", position=position, n_new=n_new, init="copy")
    expected = [(int(t.rstrip("*")), t.endswith("*")) for t in layout.split()]
    assert [(s.sources[0], s.new) for s in op.layer_sources(shape)] == expected
    small, big = grow(op, shape, n_old)
    for j, (i, _) in enumerate(expected):  # and the grown weights follow it
        for key, value in big.layers[str(j)].state_dict().items():
            assert torch.equal(value, small.layers[str(i)].state_dict()[key]), (j, key)


@pytest.mark.parametrize("position", ["uniform", "upper", "lower"])
def test_interpolate_positions_match_the_formula_on_a_grid(position):
    for n_old in range(1, 7):
        for n_new in range(1, (9 if position == "uniform" else n_old + 1)):
            if position == "uniform":
                after = [k * n_old // n_new for k in range(n_new)]
            elif position == "upper":
                after = [n_old - n_new + k for k in range(n_new)]
            else:
                after = list(range(n_new))
            expected = []
            for i in range(n_old):
                expected += [(i, False)] + [(i, True)] * after.count(i)
            shape = ModelShape(dim=4, n_layers=n_old, n_heads=1, n_kv_heads=1, vocab_size=8, ffn_hidden=4)
            op = make("interpolate", position=position, n_new=n_new, init="copy")
            assert [(s.sources[0], s.new) for s in op.layer_sources(shape)] == expected, (n_old, n_new)


# ----------------------------------------------------------------------------- growth + one training step


@settings(max_examples=20)
@given(shape=shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_zero_init_depth_first_step_only_zeroed_projections_get_gradient(shape, seed, data):
    name = data.draw(st.sampled_from(["interpolate", "stack"]))
    op = make(name, zero_out=True, init=data.draw(st.sampled_from(["copy", "mean", "random"]))) if name == "interpolate" \
        else make(name, zero_out=True, growth_factor=data.draw(st.integers(2, 3)))
    _, big = grow(op, shape, seed)
    grads = one_step_grads(big, shape, seed)
    new = [j for j, s in enumerate(op.layer_sources(shape)) if s.new]
    assert new
    for j in new:
        for rest, p in big.layers[str(j)].named_parameters():
            nonzero = grads[f"layers.{j}.{rest}"].abs().max() > 0
            assert nonzero == (rest in ("attention.wo.weight", "feed_forward.w2.weight")), (j, rest)


@pytest.mark.parametrize("op_spec", [
    ("interpolate", dict(init="copy")), ("interpolate", dict(init="random", position="upper", n_new=1)),
    ("stack", dict(growth_factor=2)), ("bert2bert", dict(dim=24, ffn_hidden=30, n_heads=6)),
    ("bert2bert", dict(dim=32, method="aki")),
])
def test_growth_then_one_step_every_new_parameter_learns(op_spec):
    name, opts = op_spec
    shape = ModelShape(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_hidden=20, max_seq_len=16)
    op = make(name, **opts)
    _, big = grow(op, shape, 0)
    before = {n: p.detach().clone() for n, p in big.named_parameters()}
    grads = one_step_grads(big, shape, 0)
    for n, g in grads.items():
        assert g is not None and g.abs().max() > 0, n
    torch.optim.AdamW(big.parameters(), lr=1e-2).step()
    assert all(not torch.equal(before[n], p) for n, p in big.named_parameters())


# ----------------------------------------------------------------------------- MSG-style mask


def test_msg_mask_ramps_and_folds_exactly():
    shape = ModelShape(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_hidden=20, max_seq_len=16)
    op = make("interpolate", init="random", mask_steps=4)
    small, big = grow(op, shape, 0)  # random new blocks: exact only because of the mask
    a, b = logits_pair(small, big, shape, 0)
    assert_same_function(a, b)
    grads = one_step_grads(big, shape, 0)  # m = 0: the new blocks get no gradient yet
    assert all(grads[f"layers.{j}.attention.wq.weight"].abs().max() == 0 for j in (1, 3))
    op.set_step(1)
    assert op.mask.value == 0.25
    grads = one_step_grads(big, shape, 0)
    assert all(grads[f"layers.{j}.attention.wq.weight"].abs().max() > 0 for j in (1, 3))
    _, masked = logits_pair(small, big, shape, 1)
    op.merge(big)  # fold m into wo / w2 and remove the hooks: same function
    _, folded = logits_pair(small, big, shape, 1)
    assert_same_function(masked, folded)
    assert op.mask.handles == [] and not big.layers["1"].attention.wo._forward_hooks
    op.set_step(10)
    assert op.mask.value == 1.0


# ----------------------------------------------------------------------------- options and recipes


@pytest.mark.parametrize("name, opts, match", [
    ("stack", dict(growth_factor=0), "growth_factor"),
    ("stack", dict(mask_steps=-1), "mask_steps"),
    ("stack", dict(growth_factor=10**9), "at most 1024 layers"),
    ("interpolate", dict(optimizer_state="keep"), "optimizer_state"),
    ("bert2bert", dict(method="net2net"), "method"),
    ("bert2bert", dict(mapping="zigzag"), "mapping"),
])
def test_bad_options_raise(name, opts, match):
    with pytest.raises(ValueError, match=match):
        make(name, **opts)


@pytest.mark.parametrize("opts, match", [
    (dict(dim=8), "can only grow"), (dict(n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
    (dict(dim=24, mapping="uniform"), "whole factor"),
])
def test_bad_width_targets_raise(opts, match):
    shape = ModelShape(dim=16, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=32, ffn_hidden=20)
    with pytest.raises(ValueError, match=match):
        make("bert2bert", **opts).target_shape(shape)


def test_recipes_plan_and_report_exactness():
    from conftest import REPO
    from steptitan.plan import build_plan, format_plan
    from steptitan.recipe import RecipeError, load_recipe

    stack = build_plan(load_recipe(REPO / "recipes" / "stack.toml"))
    assert stack[1].shape.n_layers == 4 and sorted(stack[1].new_layers) == [2, 3]
    assert stack[1].frozen_params == 0
    width = build_plan(load_recipe(REPO / "recipes" / "width.toml"))
    assert (width[1].shape.dim, width[1].shape.n_heads, width[1].shape.head_dim, width[1].shape.ffn_hidden) == (128, 4, 32, 352)
    assert "bert2bert (exact)" in format_plan(width)
    aki = build_plan(load_recipe(REPO / "recipes" / "width.toml", ["stages.1.growth.method=aki"]))
    assert "(exact)" not in format_plan(aki)
    # head growth with head_dim fixed: 2 -> 6 heads of 32 on a 64-wide model (n_heads * head_dim != dim)
    heads = build_plan(load_recipe(REPO / "recipes" / "width.toml",
                                   ["stages.1.growth={name: bert2bert, n_heads: 6}", "stages.1.model={}"]))
    assert (heads[1].shape.dim, heads[1].shape.n_heads, heads[1].shape.head_dim) == (64, 6, 32)
    assert "bert2bert (exact)" in format_plan(heads)
    with pytest.raises(RecipeError, match="stages.1.growth: bert2bert: dim can only grow"):
        build_plan(load_recipe(REPO / "recipes" / "width.toml", ["stages.1.growth.dim=32", "stages.1.model={}"]))
