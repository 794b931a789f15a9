"""APEX (registry/peft/apex.py) in one process: exact init and fusion, the votes, what trains, options.

The 2-rank checks (FSDP2 shards, one ranking on every rank) are in tests/test_peft_apex_dist.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from steptitan.model import ModelShape, build_model
from steptitan.peft import StepContext
from steptitan.plan import build_plan
from steptitan.recipe import RecipeError, load_recipe, load_recipe_dict, recipe_from_dict
from steptitan.registry import PEFT
from steptitan.registry.peft.apex import ApexLinear, apex_modules, monarch, rank_units

from conftest import REPO, dense_every_block_matters as dense, model_shapes


def shapes():
    """Random shapes, GQA included; heads and KV heads of 1 occur (then wo / wv cannot be targeted)."""
    return model_shapes(kv_heads=(1, 3), group=(1, 3), ffn=(2, 40))


def feasible_targets(shape: ModelShape) -> list[str]:
    return ["w1", "w2", "w3"] + (["wo"] if shape.n_heads >= 2 else []) + (["wv"] if shape.n_kv_heads >= 2 else [])


def apex(shape: ModelShape, seed: int, **options):
    """(model with APEX applied and initialised, method, the dense model's state before)."""
    model = dense(shape, seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls = PEFT.get("apex")
    method = cls(cls.Options(**options), list(range(shape.n_layers)), seed=seed)
    method.apply(model)
    method.init_weights(model)
    return model, method, before


def batch(shape: ModelShape, seed: int, n: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, shape.vocab_size, (n, seq + 1), generator=torch.Generator().manual_seed(seed))


def loss_of(model, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def score(model, method, shape: ModelShape, seed: int, steps: int = 2) -> None:
    """Training forwards (which vote), then the end of the scoring window."""
    model.train()
    for s in range(steps):
        loss_of(model, batch(shape, seed + s)).backward()
    model.zero_grad(set_to_none=True)
    method.after_optimizer_step(StepContext(method.options.score_steps, model, None, 0, 100))


@torch.no_grad()
def randomize(model, seed: int) -> None:
    """Adapters as after training: every part non-trivial."""
    g = torch.Generator().manual_seed(seed)
    for _, m in apex_modules(model, list(range(len(model.layers)))):
        for p in m.adapters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> None:
    torch.testing.assert_close(b, a, rtol=0, atol=rel * max(1.0, a.abs().max().item()))


# ----------------------------------------------------------------------------- exactness


@settings(max_examples=40)
@given(shape=shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_init_and_selection_leave_the_logits_unchanged(shape, seed, data):
    targets = data.draw(st.lists(st.sampled_from(feasible_targets(shape)), min_size=1, unique=True))
    x = batch(shape, seed + 99)
    ref = dense(shape, seed)
    model, method, _ = apex(shape, seed, targets=targets, score_steps=2)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # before the selection: plain linears
    score(model, method, shape, seed)
    assert method.scored and all(m.apex_rows is not None for _, m in method.modules(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # delta = 0, M = 0, vec = scale = 1: W bit for bit


@settings(max_examples=40)
@given(shape=shapes(), seed=st.integers(0, 2**16), data=st.data())
def test_fusion_leaves_the_logits_unchanged(shape, seed, data):
    targets = data.draw(st.lists(st.sampled_from(feasible_targets(shape)), min_size=1, unique=True))
    model, method, _ = apex(shape, seed, targets=targets, score_steps=1,
                            ffn_ratio=data.draw(st.sampled_from([0.125, 0.25, 0.5])),
                            head_ratio=data.draw(st.sampled_from([0.25, 0.5])))
    score(model, method, shape, seed)
    randomize(model, seed)
    x = batch(shape, seed + 7)
    with torch.no_grad():
        mixed = model(x)
        assert (mixed - dense(shape, seed)(x)).abs().max() > 1e-3  # the expansion does something
        method.merge(model)
        assert all(m.apex_rows is None for _, m in method.modules(model))
        assert_close(mixed, model(x))


def test_effective_weight_matches_a_dense_reference():
    """The mixer written out by hand: rows D get vec*W_D + M W_A, rows A get scale*W_A (after the delta)."""
    torch.manual_seed(0)
    m = ApexLinear(5, 12, "rows", unit=2, k=2, nblocks=2)  # n = 4 rows mixed, p = q = 2
    for p in (m.weight, *m.adapters()):
        torch.nn.init.normal_(p)
    m.select(torch.tensor([5, 0]), torch.tensor([3, 1]))
    rows_d, rows_a = torch.tensor([10, 11, 0, 1]), torch.tensor([6, 7, 2, 3])
    dense_m = monarch(torch.eye(4), m.apex_b1, m.apex_b2).T  # M with M x = monarch(x)
    with torch.no_grad():
        sel = torch.cat([m.weight[rows_d], m.weight[rows_a]]) + m.apex_delta
        want = m.weight.clone()
        want[rows_d] = m.apex_vec[:, None] * sel[:4] + dense_m @ sel[4:]
        want[rows_a] = m.apex_scale[:, None] * sel[4:]
        torch.testing.assert_close(m.effective_weight(m.weight, *m.adapters()), want)
        x = torch.randn(3, 4)
        torch.testing.assert_close(monarch(x, m.apex_b1, m.apex_b2), x @ dense_m.T)


# ----------------------------------------------------------------------------- scoring and training


def test_votes_match_top_and_bottom_k_of_the_activation_norms():
    shape = ModelShape(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_hidden=24, max_seq_len=16)
    model, method, _ = apex(shape, 3, score_steps=3)
    seen: dict[str, list[torch.Tensor]] = {}
    for j in range(2):  # record w2's and wo's inputs independently of the method
        for path in ("feed_forward.w2", "attention.wo"):
            model.layers[str(j)].get_submodule(path).register_forward_pre_hook(
                lambda mod, args, key=f"{j}.{path}": seen.setdefault(key, []).append(args[0].detach().clone()))
    model.train()
    for s in range(3):
        loss_of(model, batch(shape, s, n=3)).backward()
    for j in range(2):
        expected = {"ffn": torch.zeros(24, dtype=torch.float64), "heads": torch.zeros(4, dtype=torch.float64),
                    "kv": torch.zeros(2, dtype=torch.float64)}
        for x in seen[f"{j}.feed_forward.w2"]:
            norm = x.reshape(-1, 24).norm(dim=0)
            expected["ffn"][norm.argsort(descending=True)[:3]] += 1  # k = floor(24 / 8) = 3
            expected["ffn"][norm.argsort()[:3]] -= 1
        for x in seen[f"{j}.attention.wo"]:
            heads = x.reshape(-1, 4, 4).transpose(0, 1).reshape(4, -1).norm(dim=1)
            expected["heads"][heads.argmax()] += 1  # k = 1
            expected["heads"][heads.argmin()] -= 1
            groups = x.reshape(-1, 2, 8).transpose(0, 1).reshape(2, -1).norm(dim=1)  # heads 0,1 -> kv 0; 2,3 -> kv 1
            expected["kv"][groups.argmax()] += 1
            expected["kv"][groups.argmin()] -= 1
        for family, want in expected.items():
            assert torch.equal(method.counts[f"{j}.{family}"], want), (j, family)


def test_ranking_is_a_stable_function_of_the_votes():
    counts = torch.tensor([2.0, -1.0, 2.0, 0.0, -1.0, 5.0])
    assert rank_units(counts, 2).tolist() == [4, 1, 5, 0]  # D worst first (ties: higher index first), A best first


def test_after_scoring_only_apex_parameters_train_and_they_all_get_gradient():
    shape = ModelShape(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_hidden=24, max_seq_len=16)
    model, method, before = apex(shape, 5, score_steps=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".apex_" in n} | {"tok_embeddings.weight", "norm.weight", "output.weight"}
    score(model, method, shape, 5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = batch(shape, 11)
    loss_of(model, x).backward()
    for name, module in method.modules(model):
        for p in (module.apex_delta, module.apex_b2, module.apex_vec, module.apex_scale):
            assert p.grad is not None and p.grad.abs().max() > 0, name
    opt.step()
    for name, p in model.named_parameters():
        if name in before and not p.requires_grad:
            assert torch.equal(p, before[name]), name  # frozen dense weights did not move
    logits = model(x[:, :-1]).detach()
    method.merge(model)
    assert_close(logits, model(x[:, :-1]).detach())


def test_bad_options_and_too_narrow_models_are_refused():
    cls = PEFT.get("apex")
    for bad in (dict(targets=["wq"]), dict(ffn_ratio=0.7), dict(score_steps=0), dict(nblocks=-1), dict(targets=[])):
        with pytest.raises(ValueError):
            cls(cls.Options(**bad), [0])
    shape = ModelShape(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, ffn_hidden=8, max_seq_len=16)
    with pytest.raises(ValueError, match="wv"):
        cls(cls.Options(targets=["wv"]), [0]).apply(build_model(shape))


@pytest.mark.parametrize("recipe", ["apex_cpt.toml", "cpt_baseline.toml"])
def test_cpt_recipes_plan(recipe):
    plans = build_plan(load_recipe(REPO / "recipes" / recipe))
    assert [len(p.peft) for p in plans] == [0, 1]


def test_cpt_recipes_train_the_same_number_of_parameters():
    apex_plan, base_plan = (build_plan(load_recipe(REPO / "recipes" / r))[1] for r in ("apex_cpt.toml", "cpt_baseline.toml"))
    assert abs(apex_plan.trainable_params - base_plan.trainable_params) <= 0.02 * apex_plan.trainable_params


def test_recipe_errors_name_the_option():
    with pytest.raises(RecipeError, match="ffn_ratio"):
        build_plan(load_recipe(REPO / "recipes" / "apex_cpt.toml", ["stages.1.peft.ffn_ratio=0.9"]))


def test_apex_choices_and_ranges_are_checked_with_the_rest_of_the_recipe_in_one_pass():
    """Issue 13: the options declare their choices and ranges, so the schema reports them together with the
    recipe's other errors, a wrong target with a did-you-mean, before any plan is built."""
    data = load_recipe_dict(REPO / "recipes" / "apex_cpt.toml", [
        "training.lr=0", "stages.1.peft.targets=[wv,w33]", "stages.1.peft.ffn_ratio=0.9",
        "stages.1.peft.score_steps=0", "stages.1.peft.nblocks=-1"])
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(data)
    assert sorted(x.strip() for x in str(exc.value).splitlines()[1:]) == sorted([
        "training.lr: must be > 0, got 0.0",
        "stages.1.peft: apex.targets.1 must be one of wv, wo, w1, w2, w3, got 'w33' (did you mean 'w3'?)",
        "stages.1.peft: apex.ffn_ratio must be in (0, 0.5], got 0.9",
        "stages.1.peft: apex.score_steps must be >= 1, got 0",
        "stages.1.peft: apex.nblocks must be >= 0, got -1",
    ])
