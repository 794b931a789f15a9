"""LoRA on the token embedding and LM head (registry/peft/lora_embed.py), and tied embeddings across growth.

* property test (hypothesis, one process, float32): random shapes, tied or not, random
  targets and ranks; the init keeps the logits exactly; with random factors the adapted model
  equals a dense reference whose weights the test builds itself in float64 (E + s (B A)^T,
  W + s B A), and so does the merged model; a tied pair stays one tensor;
* 2 real gloo ranks, FSDP2, shapes whose vocab does not split evenly: the same checks on the
  sharded model, gradients only on the factors, bytes per rank == the memory model;
* through the trainer's own build/grow/step code at 1 and 2 ranks: a tied STEP run through
  depth growth (interpolate, zero_out) and width growth (bert2bert FPI, uniform d_model)
  with lora_embed on the tied pair keeps ``output.weight is tok_embeddings.weight``, keeps
  the logits across each exact growth, and its model-state bytes equal the prediction on
  every rank; an untied run with lora_embed on embeddings and head too.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_distributed
from steptitan.model import ModelShape, build_model, init_model_weights
from steptitan.recipe import RecipeError, recipe_from_dict
from steptitan.registry import PEFT


@st.composite
def shapes(draw):
    head_dim, n_kv = draw(st.sampled_from([2, 4, 6])), draw(st.integers(1, 2))
    n_heads = n_kv * draw(st.integers(1, 2))
    return ModelShape(dim=n_heads * head_dim, n_layers=draw(st.integers(1, 2)), n_heads=n_heads, n_kv_heads=n_kv,
                      vocab_size=draw(st.integers(5, 60)), ffn_hidden=draw(st.integers(3, 20)),
                      tie_embeddings=draw(st.booleans()), max_seq_len=16)


def _method(rank: int, targets: list[str], alpha: float = 8.0, seed: int = 0):
    cls = PEFT.get("lora_embed")
    return cls(cls.Options(rank=rank, alpha=alpha, targets=targets), [], seed=seed)


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def _close(actual, expected):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-5)


@torch.no_grad()
def _random_factors(model, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if "lora" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@torch.no_grad()
def _reference(shape: ModelShape, model, method) -> torch.nn.Module:
    """A dense model whose embedding/head are the adapted ones, built in float64 from the factors."""
    ref = build_model(shape, "cpu")
    dense = {n: p for n, p in model.named_parameters() if "lora" not in n}
    s = method.scale
    emb = model.tok_embeddings
    e = emb.weight.double()
    if hasattr(emb, "lora_embedding_A"):
        e = e + s * (emb.lora_embedding_B.double() @ emb.lora_embedding_A.double()).t()
    w = model.output.weight.double()
    if hasattr(model.output, "lora_A"):
        w = w + s * (model.output.lora_B.double() @ model.output.lora_A.double())
    elif shape.tie_embeddings:
        w = e
    for name, p in ref.named_parameters(remove_duplicate=False):
        if name == "tok_embeddings.weight":
            p.copy_(e.float())
        elif name == "output.weight":
            p.copy_(w.float())
        else:
            p.copy_(dense[name])
    ref.freqs_cis = model.freqs_cis
    return ref


@settings(deadline=None)
@given(shape=shapes(), rank=st.integers(1, 7), which=st.sampled_from([["embeddings", "head"], ["embeddings"], ["head"]]),
       seed=st.integers(0, 2**16))
def test_init_and_merge_keep_the_function(shape, rank, which, seed):
    targets = ["embeddings", "head"] if shape.tie_embeddings else which
    torch.manual_seed(seed)
    model = build_model(shape, "cpu")
    init_model_weights(model)
    x = torch.randint(0, shape.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    before = _logits(model, x)
    method = _method(rank, targets, seed=seed)
    method.apply(model)
    method.init_weights(model)
    assert torch.equal(_logits(model, x), before)  # one factor is exactly zero at init
    # frozen base, trainable factors only
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("layers.")}
    expected = {"norm.weight"} | ({"tok_embeddings.lora_embedding_A", "tok_embeddings.lora_embedding_B"}
                                  if "embeddings" in targets else {"tok_embeddings.weight"})
    if "head" in targets and not shape.tie_embeddings:
        expected |= {"output.lora_A", "output.lora_B"}
    elif "head" not in targets:
        expected |= {"output.weight"}
    assert trainable == expected
    # a random adapter: the model computes the reference's function, before and after merge
    _random_factors(model, torch.Generator().manual_seed(seed + 1))
    ref = _reference(shape, model, method)
    expect = _logits(ref, x)
    _close(_logits(model, x), expect)
    method.merge(model)
    _close(_logits(model, x), expect)
    if "embeddings" in targets:
        assert model.tok_embeddings.lora_embedding_A.abs().sum() == 0
    if "head" in targets and not shape.tie_embeddings:
        assert model.output.lora_B.abs().sum() == 0
    assert (model.output.weight is model.tok_embeddings.weight) == shape.tie_embeddings
    for n, p in ref.named_parameters():  # the merged dense weights are the reference's
        torch.testing.assert_close(model.get_parameter(n), p, atol=1e-5, rtol=1e-5)


def test_every_factor_pair_gets_a_gradient_at_init():
    """Neither adapter starts with A = B = 0 (no gradient would ever reach them)."""
    for tie in (False, True):
        shape = ModelShape(dim=8, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=11, ffn_hidden=6, tie_embeddings=tie,
                           max_seq_len=8)
        model = build_model(shape, "cpu")
        init_model_weights(model)
        method = _method(2, ["embeddings", "head"])
        method.apply(model)
        method.init_weights(model)
        model(torch.randint(0, 11, (2, 5))).square().sum().backward()
        emb = model.tok_embeddings
        assert emb.lora_embedding_A.grad.abs().sum() > 0  # A = 0, B ~ N(0, 1): A moves first
        assert model.tok_embeddings.weight.grad is None
        if not tie:
            assert model.output.lora_B.grad.abs().sum() > 0 and model.output.weight.grad is None


def _recipe(out_dir: str, tie: bool, stages: list[dict], frozen_dtype: str = "float32", dim: int = 16) -> dict:
    return {
        "name": "le", "output_dir": out_dir,
        "model": {"dim": dim, "n_layers": 1, "n_heads": 2, "vocab_size": 101, "ffn_hidden": 24, "tie_embeddings": tie},
        "training": {"batch_size": 2, "seq_len": 8, "frozen_dtype": frozen_dtype, "warmup_steps": 0, "lr": 0.01},
        "checkpoint": {"enabled": False}, "stages": stages,
    }


def test_recipe_errors(tmp_path):
    from steptitan.plan import build_plan

    def plan(tie, spec):
        stages = [{"steps": 1}, {"steps": 1, "growth": {"name": "interpolate"}, "freeze": ["old", "embeddings", "head"],
                                 "extra_peft": [spec]}]
        return build_plan(recipe_from_dict(_recipe(str(tmp_path), tie, stages)))

    with pytest.raises(RecipeError, match="ties its embedding and LM head"):
        plan(True, {"method": "lora_embed", "targets": ["head"]})
    with pytest.raises(RecipeError, match="targets"):
        plan(False, {"method": "lora_embed", "targets": ["emb"]})
    with pytest.raises(RecipeError, match="rank"):
        plan(False, {"method": "lora_embed", "rank": 0})
    with pytest.raises(RecipeError, match="already has an adapter"):
        stages = [{"steps": 1, "extra_peft": [{"method": "lora_embed"}, {"method": "lora_embed"}]}]
        build_plan(recipe_from_dict(_recipe(str(tmp_path), False, stages)))
    plans = plan(False, {"method": "lora_embed", "rank": 4})
    from steptitan.plan import format_plan

    assert "lora_embed[emb+head]" in format_plan(plans)
    # the 4 x (101 + 16) factors of each adapter are trainable; the rest of embeddings/head frozen
    assert plans[1].trainable_params == 2 * 4 * (101 + 16) + plans[1].shape.layer_params()


# --------------------------------------------------------------------------- 2 ranks, FSDP2


def _sharded(env, shape, rank, seed):
    from steptitan.distributed import shard_model

    model = build_model(shape)
    method = _method(rank, ["embeddings", "head"], seed=seed)
    method.apply(model)
    shard_model(model, env.mesh)
    model.to_empty(device=env.device)
    init_model_weights(model, shape, seed=seed)
    with torch.no_grad():  # to_empty left the factors uninitialised: start from "no adapter"
        for name, p in model.named_parameters():
            if "lora" in name:
                p.to_local().zero_()
    return model, method


def _fsdp_checks(env, seed: int):
    import random

    from steptitan.distributed import full_tensor, init_like, reshard, seeded_generator
    from steptitan.memory import model_state_bytes, param_specs
    from steptitan.metrics import memory_breakdown
    from steptitan.model import base_param_names

    rng = random.Random(seed)
    out = []
    for k in range(3):
        shape = ModelShape(dim=rng.choice([4, 8, 12]), n_layers=1, n_heads=2, n_kv_heads=rng.choice([1, 2]),
                           vocab_size=rng.randint(7, 41) | 1, ffn_hidden=rng.randint(3, 13), tie_embeddings=k == 1,
                           max_seq_len=16)
        rank = rng.randint(1, 5)
        model, method = _sharded(env, shape, rank, seed + k)
        x = torch.randint(0, shape.vocab_size, (2, 6), generator=torch.Generator().manual_seed(seed + k))
        before = _logits(model, x)
        reshard(model)
        method.init_weights(model)
        assert torch.equal(_logits(model, x), before)
        reshard(model)
        g = seeded_generator(seed, "factors", k)
        for name, p in model.named_parameters():
            if "lora" in name:
                init_like(p, lambda t, gen: t.normal_(0, 0.5, generator=gen), g)
        adapted = _logits(model, x)
        reshard(model)
        factors = {n: full_tensor(p).clone() for n, p in model.named_parameters() if "lora" in n}
        base = {n: full_tensor(p).clone() for n, p in model.named_parameters() if "lora" not in n}
        method.merge(model)
        merged = _logits(model, x)
        reshard(model)
        full = {n: full_tensor(p).clone() for n, p in model.named_parameters(remove_duplicate=False)}
        # one step: gradients and optimizer state only for the factors (and the trainable block / norm)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(2):
            opt.zero_grad()
            model(x).float().square().mean().backward()
            opt.step()
        reshard(model)
        measured = memory_breakdown(model, opt)
        predicted = model_state_bytes(param_specs(model, set(), base_param_names(shape)), env.world_size, env.rank)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        out.append({"shape": shape, "rank": rank, "scale": method.scale, "before": adapted, "after": merged,
                    "factors": factors, "base": base, "merged": full, "measured": measured, "predicted": predicted})
    return out


@pytest.mark.dist
def test_lora_embed_under_fsdp2_on_two_ranks():
    results = run_distributed(_fsdp_checks, 2, seed=5)
    for r0, r1 in zip(*results):
        for res in (r0, r1):
            _close(res["after"], res["before"])
            for key in ("params_trainable", "params_frozen", "grads", "optimizer", "model_states"):
                assert res["measured"][key] == res["predicted"][key], (key, res["measured"], res["predicted"])
        torch.testing.assert_close(r0["after"], r1["after"])
        # the merged weights are what the test computes from the gathered factors (float64)
        f, b, s = r0["factors"], r0["base"], r0["scale"]
        e = b["tok_embeddings.weight"].double() + s * (f["tok_embeddings.lora_embedding_B"].double()
                                                       @ f["tok_embeddings.lora_embedding_A"].double()).t()
        torch.testing.assert_close(r0["merged"]["tok_embeddings.weight"], e.float(), atol=1e-5, rtol=1e-5)
        if r0["shape"].tie_embeddings:
            assert torch.equal(r0["merged"]["output.weight"], r0["merged"]["tok_embeddings.weight"])
        else:
            w = b["output.weight"].double() + s * (f["output.lora_B"].double() @ f["output.lora_A"].double())
            torch.testing.assert_close(r0["merged"]["output.weight"], w.float(), atol=1e-5, rtol=1e-5)
        assert r0["merged"]["tok_embeddings.lora_embedding_A"].abs().sum() == 0


# --------------------------------------------------------------------------- through the trainer, 1 and 2 ranks


def _step_stages(tie: bool) -> list[dict]:
    """STEP with lora_embed on the (tied) pair in stage 1, then width growth in stage 2."""
    return [
        {"name": "s0", "steps": 2},
        {"name": "s1", "steps": 2,
         "growth": {"name": "interpolate", "n_new": 2, "position": "uniform", "init": "copy", "zero_out": True},
         "peft": {"method": "lora", "layers": "old", "rank": 3},
         "extra_peft": [{"method": "lora_embed", "rank": 3, "alpha": 6.0}],
         "freeze": ["old", "embeddings", "head"]},
        {"name": "s2", "steps": 2,
         "growth": {"name": "bert2bert", "dim": 32, "ffn_hidden": 48, "mapping": "uniform"},
         "extra_peft": [{"method": "lora_embed", "rank": 2, "targets": ["embeddings", "head"] if tie else ["head"]}],
         "freeze": ["head"] if not tie else ["embeddings", "head"]},
    ]


def _run_stages(env, recipe_dict):
    """The trainer's own build/grow/optimizer/step code, stage by stage, with checks between stages."""
    from steptitan.distributed import reshard
    from steptitan.memory import predict_stage
    from steptitan.plan import build_plan
    from test_memory import _RandomTokens
    from steptitan.trainer import Trainer

    recipe = recipe_from_dict(recipe_dict)
    plans = build_plan(recipe)
    trainer = Trainer(recipe, plans, _RandomTokens(recipe.model.vocab_size), env)
    x = torch.randint(0, recipe.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    model = prev = None
    out = []
    for plan in plans:
        old_logits = _logits(model, x) if model is not None else None
        model = trainer.build_stage_model(plan, grow_from=model, prev=prev)
        new_logits = _logits(model, x)
        reshard(model)
        tied = model.output.weight is model.tok_embeddings.weight
        trainer.build_optimizer(plan, model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for step in (1, 2):  # at step 2 the gradients and the optimizer state are both alive
            measured = trainer.train_step(plan, model, trainable, step)[2]
        predicted = predict_stage(plan, env.world_size, recipe.training).per_rank[env.rank]
        exact = plan.growth is not None and plan.growth.is_exact(prev.shape)
        out.append({"stage": plan.name, "tied": tied, "exact": exact, "old": old_logits, "new": new_logits,
                    "measured": measured, "predicted": predicted})
        prev = plan
    trainer.metrics.close()
    return out


def _runs(env, recipe_dicts):
    return [r for d in recipe_dicts for r in _run_stages(env, d)]


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2])
def test_tied_step_run_through_growth(tmp_path, world):
    """Tied: the pair stays one tensor through depth and width growth and lora_embed merges;
    exact growth keeps the logits; predicted == measured bytes at every stage and rank (also
    for an untied run with bf16 frozen storage and vocab 101, dim 16 -> 32: uneven shards)."""
    tied = _recipe(str(tmp_path / "tied"), True, _step_stages(True))
    untied = _recipe(str(tmp_path / "untied"), False, _step_stages(False), frozen_dtype="bfloat16")
    results = run_distributed(_runs, world, recipe_dicts=[tied, untied])
    for per_rank in results:
        for k, res in enumerate(per_rank):
            for key in ("params_trainable", "params_frozen", "grads", "optimizer", "model_states"):
                assert res["measured"][key] == res["predicted"][key], (res["stage"], key, res["measured"], res["predicted"])
            assert res["tied"] == (k < 3), res["stage"]
            if k < 3 and res["old"] is not None:  # tied, float32: growth 1 and 2 are exact
                assert res["exact"]
                _close(res["new"], res["old"])


# --------------------------------------------------------------------------- the planner


@settings(max_examples=12, deadline=None)
@given(L=st.integers(3, 6), K=st.integers(2, 3), world=st.integers(1, 3), freeze_after=st.integers(0, 2),
       tie=st.booleans(), emb_rank=st.sampled_from([0, 1, 5]), head_only=st.booleans(),
       optim=st.sampled_from([None, "embeddings=adam_mini", "adapters=adam_mini"]))
def test_planner_counts_embedding_options_as_the_written_recipe_builds(tmp_path_factory, L, K, world, freeze_after, tie,
                                                                       emb_rank, head_only, optim):
    """`steptitan plan` with tied embeddings, a freeze stage, lora_embed and a per-group optimizer:
    the recipe it writes has, stage by stage, the planner's trainable parameters and bytes on every
    rank (inventories vs the built plan: two independent paths)."""
    from steptitan.memory import PRECISIONS, OptimizerSpec, predict_recipe
    from steptitan.optim import resolve_assignment
    from steptitan.plan import build_plan
    from steptitan.planner import layer_inventory, plan_splits
    from steptitan.planner_cli import plan_cli
    from steptitan.recipe import load_recipe

    if tie and head_only:
        head_only = False  # refused for a tied pair (tested below)
    shape = ModelShape(dim=32, n_layers=L, n_heads=2, n_kv_heads=2, vocab_size=301, ffn_hidden=48,
                       tie_embeddings=tie, max_seq_len=16)
    embed_peft = {"method": "lora_embed", "rank": emb_rank, **({"targets": ["head"]} if head_only else {})} if emb_rank else None
    assignment = dict([optim.split("=")]) if optim else {}
    spec = OptimizerSpec.of(resolve_assignment([(assignment, "--optim")], shape))
    inv = layer_inventory(shape, {"method": "lora", "rank": 2}, embed_peft)
    best = plan_splits(inv, K, top=1, world_size=world, precision=PRECISIONS["paper"], optimizer=spec,
                       freeze_embeddings_after=freeze_after, seq_len=16)[0]
    out = tmp_path_factory.mktemp("plan") / "planned.toml"
    argv = ["--dim", "32", "--layers", str(L), "--heads", "2", "--vocab", "301", "--ffn", "48", "-K", str(K),
            "--peft-opt", "rank=2", "-W", str(world), "--seq-len", "16", "--write-recipe", str(out),
            "--freeze-embeddings-after", str(freeze_after)]
    argv += ["--tie-embeddings"] if tie else []
    argv += ["--embed-lora-rank", str(emb_rank)] if emb_rank else []
    argv += ["--embed-lora-opt", "targets=[head]"] if head_only and emb_rank else []  # (an option alone adds rank 16)
    argv += ["--optim", optim] if optim else []
    assert plan_cli(argv) == 0
    recipe = load_recipe(out)
    plans = build_plan(recipe)
    assert [p.shape.tie_embeddings for p in plans] == [tie] * K
    assert [any(m.registry_name == "lora_embed" for m in p.peft) for p in plans] == [
        bool(emb_rank) and i >= freeze_after for i in range(K)]
    assert [p.trainable_params for p in plans] == best.trainable
    predicted = predict_recipe(recipe, plans, world)
    assert [s.per_rank[0] for s in predicted] == best.per_stage


def test_planner_flags_refuse_unclear_embedding_options(capsys):
    from steptitan.planner import layer_inventory, split_memory
    from steptitan.planner_cli import plan_cli

    base = ["--dim", "32", "--layers", "4", "--heads", "2", "--vocab", "301", "--ffn", "48", "-K", "2", "--seq-len", "16"]
    with pytest.raises(SystemExit, match="--freeze-embeddings-after"):
        plan_cli(base + ["--embed-lora-rank", "4"])
    with pytest.raises(SystemExit, match="ties its embedding and LM head"):
        plan_cli(base + ["--tie-embeddings", "--freeze-embeddings-after", "1", "--embed-lora-rank", "4",
                         "--embed-lora-opt", "targets=[head]"])
    assert plan_cli(base + ["--tie-embeddings", "--freeze-embeddings-after", "1", "--embed-lora-rank", "4"]) == 0
    assert "embeddings/head (tied): frozen from stage 1 with" in capsys.readouterr().out
    # tied: the pair is counted once; the adapter is r (V + d), trainable, and the frozen pair 2 B a parameter
    tied = ModelShape(dim=32, n_layers=4, n_heads=2, n_kv_heads=2, vocab_size=301, ffn_hidden=48, tie_embeddings=True)
    untied = tied.replace(tie_embeddings=False)
    from steptitan.memory import PRECISIONS

    def stage1(shape, embed):
        inv = layer_inventory(shape, None, embed)
        return split_memory(inv, (2, 2), precision=PRECISIONS["paper"], freeze_embeddings_after=1).per_stage[1]

    r, V, d = 4, 301, 32
    emb = {"method": "lora_embed", "rank": r}
    assert stage1(untied, None)["params_frozen"] - stage1(tied, None)["params_frozen"] == 2 * V * d
    assert stage1(tied, emb)["model_states"] - stage1(tied, None)["model_states"] == 16 * r * (V + d) + 2 * 4
    assert stage1(untied, emb)["model_states"] - stage1(untied, None)["model_states"] == 2 * (16 * r * (V + d) + 2 * 4)
