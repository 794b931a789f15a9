"""The planner: its splits, the recipe it writes, and the inverse (budget) question."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steptitan.memory import PRECISIONS, OptimizerSpec, predict_recipe
from steptitan.model import ModelShape
from steptitan.planner import largest_fitting, layer_inventory, plan_splits
from steptitan.planner_cli import plan_cli
from steptitan.plan import build_plan
from steptitan.recipe import load_recipe


@settings(max_examples=15, deadline=None)
@given(L=st.integers(3, 8), K=st.integers(2, 3), world=st.integers(1, 3), freeze_after=st.sampled_from([None, 1, 2]),
       precision=st.sampled_from(sorted(PRECISIONS)), rank=st.integers(1, 8), position=st.sampled_from(["upper", "lower"]))
def test_written_recipe_builds_what_the_planner_counted(tmp_path_factory, L, K, world, freeze_after, precision, rank, position):
    """The recipe written for a split has, stage by stage, the planner's trainable parameters and
    the planner's bytes on every rank (two independent paths: per-piece inventories vs the built plan)."""
    shape = ModelShape(dim=64, n_layers=L, n_heads=2, n_kv_heads=2, vocab_size=301, ffn_hidden=96, max_seq_len=16)
    peft = {"method": "lora", "rank": rank}
    inv = layer_inventory(shape, peft)
    best = plan_splits(inv, K, top=1, world_size=world, precision=PRECISIONS[precision],
                       freeze_embeddings_after=freeze_after, position=position, seq_len=16)[0]
    out = tmp_path_factory.mktemp("plan") / "planned.toml"
    argv = ["--dim", "64", "--layers", str(L), "--heads", "2", "--vocab", "301", "--ffn", "96", "-K", str(K),
            "--peft-opt", f"rank={rank}", "--precision", precision, "-W", str(world), "--seq-len", "16",
            "--position", position, "--write-recipe", str(out)]
    if freeze_after is not None:
        argv += ["--freeze-embeddings-after", str(freeze_after)]
    assert plan_cli(argv) == 0
    recipe = load_recipe(out)
    plans = build_plan(recipe)
    assert [p.shape.n_layers for p in plans] == [sum(best.layers[: i + 1]) for i in range(K)]
    assert [p.trainable_params for p in plans] == best.trainable
    predicted = predict_recipe(recipe, plans, world)
    assert [s.per_rank[0] for s in predicted] == best.per_stage
    assert all(s.per_rank[0]["model_states"] == max(r["model_states"] for r in s.per_rank) for s in predicted)


def test_largest_fitting_is_the_limit():
    base = ModelShape(dim=128, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=1000, ffn_hidden=352)
    budget = 40 * 2**20
    peft = {"method": "lora", "rank": 4}
    kw = dict(precision=PRECISIONS["paper"], optimizer=OptimizerSpec(), seq_len=64, batch=2)
    (fit,) = largest_fitting(budget, base, 3, peft, [128], max_layers=200, objective="model_states", **kw)
    assert fit.split.peak_model_states <= budget
    deeper = layer_inventory(fit.shape.replace(n_layers=fit.shape.n_layers + 1), peft)
    assert plan_splits(deeper, 3, top=1, **kw)[0].peak_model_states > budget
    (vanilla,) = largest_fitting(budget, base, 1, None, [128], max_layers=200, objective="model_states", **kw)
    assert fit.shape.n_layers > 1.5 * vanilla.shape.n_layers  # staged training fits a much deeper model


def test_cli_budget_mode_and_errors(capsys):
    assert plan_cli(["--budget", "64MiB", "--vocab", "2048", "--dims", "128,256", "-K", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "largest: dim" in out and "vanilla fits" in out
    assert plan_cli(["--budget", "1KiB", "--vocab", "2048", "--dims", "128", "--seq-len", "64"]) == 1
    with pytest.raises(SystemExit):
        plan_cli(["--precision", "fp8"])
