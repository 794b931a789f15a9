"""The trainer's validation loss (a fixed set of blocks at any world size) and its logged LR (the LR the step used).

Both run the real Trainer on real gloo process groups (tests/conftest.py run_distributed).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_distributed

SHAPE = {"dim": 16, "n_layers": 2, "n_heads": 2, "vocab_size": 97, "ffn_hidden": 40}


def _recipe_dict(out_dir: str, **training) -> dict:
    return {"name": "evallr", "output_dir": out_dir, "model": SHAPE,
            "training": {"batch_size": 4, "seq_len": 16, **training},
            "checkpoint": {"enabled": False}, "stages": [{"name": "s0", "steps": 6}]}


def _trainer(env, recipe_dict):
    from test_memory import _RandomTokens

    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict
    from steptitan.trainer import Trainer

    recipe = recipe_from_dict(recipe_dict)
    return Trainer(recipe, build_plan(recipe), _RandomTokens(recipe.model.vocab_size), env)


@torch.no_grad()
def _model_with_fixed_weights(env, recipe_dict, seed: int):
    """The trainer's first-stage model with weights drawn here in full from a seeded generator (independent
    of the world size and of the init code), each rank keeping its shard."""
    from steptitan.distributed import local_part, local_tensor

    trainer = _trainer(env, recipe_dict)
    plan = trainer.plans[0]
    model = trainer.build_stage_model(plan)
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        full = torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0.0)
        local_tensor(p).copy_(local_part(full, p))
    return trainer, plan, model


@torch.no_grad()
def _evaluate_fixed_weights(env, recipe_dict):
    """Evaluate one set of weights, drawn here in full from a seeded generator (independent of the
    world size and of the init code); on 1 rank also the reference: the mean per-block loss of the
    first eval_batches x batch_size validation blocks, computed block by block."""
    trainer, plan, model = _model_with_fixed_weights(env, recipe_dict, 7)
    val = trainer.evaluate(plan, model, 0)
    reference = None
    if env.world_size == 1:
        n = recipe_dict["training"]["eval_batches"] * recipe_dict["training"]["batch_size"]
        losses = []
        for i in range(n):
            block = torch.from_numpy(trainer.val_data.block(i).astype("int64"))[None]
            losses.append(F.cross_entropy(model(block[:, :-1])[0].float(), block[0, 1:]).item())
        reference = sum(losses) / n
    trainer.metrics.close()
    return val, reference


LR, WARMUP, TOTAL, FLOOR = 1e-3, 3, 6, 0.1


def _recipes(tmp) -> dict[str, dict]:
    """The recipe of each run below, by name."""
    d = {"eval": _recipe_dict(str(tmp / "eval"), eval_batches=3),
         "lr": _recipe_dict(str(tmp / "lr"), lr=LR, warmup_steps=WARMUP, decay_type="linear", min_lr_factor=FLOOR,
                            steps_per_log=1, eval_batches=1),
         "final": _recipe_dict(str(tmp / "final"), eval_batches=1, final_eval_batches=0)}
    for scope in ("run", "stage"):  # test_run_lr_schedule_is_one_warmup_and_decay_over_all_stages
        d[scope] = _recipe_dict(str(tmp / scope), lr=LR, warmup_steps=WARMUP, decay_type="linear", min_lr_factor=FLOOR,
                                eval_batches=1, lr_schedule=scope)
        d[scope]["stages"] = [{"name": "s0", "steps": 4}, {"name": "s1", "steps": 5}]
    return d


def _one_rank_runs(env, recipes):
    return {"eval": _evaluate_fixed_weights(env, recipes["eval"]), "lr": _logged_lrs(env, recipes["lr"]),
            "final": _final_block_losses(env, recipes["final"]),
            "run": _used_lrs_in_order(env, recipes["run"]), "stage": _used_lrs_in_order(env, recipes["stage"])}


def _two_rank_runs(env, recipes):
    return {"eval": _evaluate_fixed_weights(env, recipes["eval"]), "final": _final_block_losses(env, recipes["final"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every test's one-rank runs in one spawned process and its two-rank runs in one spawned pair (issue 23
    item 10: a spawn costs seconds of imports). Each run builds its own Trainer from its own recipe."""
    recipes = _recipes(tmp_path_factory.mktemp("evallr"))
    (one,) = run_distributed(_one_rank_runs, 1, recipes=recipes)
    two = run_distributed(_two_rank_runs, 2, recipes=recipes)
    return {"one": one, "two": {key: [rank[key] for rank in two] for key in two[0]}}


@pytest.mark.dist
def test_val_loss_is_the_same_on_1_and_2_ranks(runs):
    """Issue 11: eval_batches counted batches per rank, so 2 ranks evaluated twice the blocks of 1 rank.
    eval_batches=3, batch 4: 12 blocks; on 2 ranks 2 rounds of 2 x 4 slots, the last 4 padding."""
    one, reference = runs["one"]["eval"]
    two = runs["two"]["eval"]
    assert two[0][0] == two[1][0]  # all-reduced: every rank reports the same
    assert one == pytest.approx(reference, rel=1e-6, abs=1e-6)
    assert two[0][0] == pytest.approx(one, rel=1e-6, abs=1e-6)


def _logged_lrs(env, recipe_dict):
    trainer = _trainer(env, recipe_dict)
    logged = {}
    scalars = trainer.metrics.scalars

    def capture(values, step):
        if "lr" in values:
            logged[step] = values["lr"]
        scalars(values, step)

    trainer.metrics.scalars = capture
    used = {}  # step -> the LR in every param group of every optimizer when optimizer.step() runs
    optimizer_step = trainer.optimizer_step

    def record(plan, model, step):
        used[step] = {g["lr"] for o in trainer.optimizer.optimizers for g in o.param_groups}
        optimizer_step(plan, model, step)

    trainer.optimizer_step = record
    trainer.run()
    return logged, used


def test_logged_lr_is_the_lr_the_step_used(runs):
    """Issue 11: the scheduler stepped before log_step read it, so step s logged step s+1's LR. The logged LR
    must be the one in the optimizers' param groups when step s's optimizer.step() ran, and its values
    come from the schedule's definition (torchtitan 0.2.2: linear warm-up, one stable step, then
    linear decay to min_lr_factor over T - W steps), 1-based: step s <= W runs at lr s / W, step W + 1 at lr,
    step s > W + 1 at lr (f + (1 - f)(1 - (s - W - 1) / (T - W)))."""
    lr, warmup, total, floor = LR, WARMUP, TOTAL, FLOOR
    logged, used = runs["one"]["lr"]
    assert sorted(used) == list(range(1, total + 1))
    for s in range(1, total + 1):  # the logged LR is the one the optimizer stepped with
        assert used[s] == {logged[s]}, (s, logged[s], used[s])

    def expected(s: int) -> float:
        if s <= warmup:
            return lr * s / warmup
        return lr * (floor + (1 - floor) * (1 - (s - warmup - 1) / (total - warmup)))

    assert sorted(logged) == list(range(1, total + 1))
    for s in range(1, total + 1):
        assert math.isclose(logged[s], expected(s), rel_tol=1e-9), (s, logged[s], expected(s))


@torch.no_grad()
def _final_block_losses(env, recipe_dict):
    """The final evaluation (training.final_eval_batches) of fixed weights: every block's loss; on 1 rank
    also each block's loss computed here one block at a time."""
    trainer, plan, model = _model_with_fixed_weights(env, recipe_dict, 11)
    val = trainer.evaluate(plan, model, 0, final=True)
    reference = None
    if env.world_size == 1:
        reference = []
        for i in range(trainer.val_data.n_blocks):
            block = torch.from_numpy(trainer.val_data.block(i).astype("int64"))[None]
            reference.append(F.cross_entropy(model(block[:, :-1])[0].float(), block[0, 1:]).item())
    trainer.metrics.close()
    return val, trainer.final_block_losses, reference


@pytest.mark.dist
def test_final_evaluation_keeps_every_blocks_loss_on_1_and_2_ranks(runs):
    """final_eval_batches = 0: the whole validation split, each block's loss kept (the benchmark bootstraps
    over them), the same list on 1 and 2 ranks; the loss is their mean."""
    one, blocks_one, reference = runs["one"]["final"]
    two = runs["two"]["final"]
    assert len(blocks_one) == len(reference) > 4  # the whole split, not eval_batches x batch_size = 4 blocks
    assert blocks_one == pytest.approx(reference, rel=1e-5, abs=1e-5)
    assert one == pytest.approx(sum(reference) / len(reference), rel=1e-6)
    assert two[0][1] == two[1][1] == blocks_one  # each block computed by one rank: the same values, bit for bit
    assert two[0][0] == one


def _used_lrs_in_order(env, recipe_dict):
    trainer = _trainer(env, recipe_dict)
    used = []
    optimizer_step = trainer.optimizer_step

    def record(plan, model, step):
        used.append({g["lr"] for o in trainer.optimizer.optimizers for g in o.param_groups})
        optimizer_step(plan, model, step)

    trainer.optimizer_step = record
    trainer.run()
    return used


def test_run_lr_schedule_is_one_warmup_and_decay_over_all_stages(runs):
    """training.lr_schedule = "run": stages 4 + 5 steps follow one schedule of 9 steps (warm-up 3 at the
    start only); "stage" restarts it: the second stage warms up again over its own 5 steps."""
    lr, warmup, floor = LR, WARMUP, FLOOR

    def expected(s: int, total: int) -> float:  # torchtitan 0.2.2's linear warm-up + linear decay, 1-based
        if s <= warmup:
            return lr * s / warmup
        return lr * (floor + (1 - floor) * (1 - (s - warmup - 1) / (total - warmup)))

    for scope in ("run", "stage"):  # recipes: _recipes (stages 4 + 5 steps, lr_schedule = scope)
        used = runs["one"][scope]
        want = ([expected(s, 9) for s in range(1, 10)] if scope == "run"
                else [expected(s, 4) for s in range(1, 5)] + [expected(s, 5) for s in range(1, 6)])
        assert len(used) == 9
        for got, w in zip(used, want):
            assert len(got) == 1 and math.isclose(got.pop(), w, rel_tol=1e-9), (scope, used, want)
