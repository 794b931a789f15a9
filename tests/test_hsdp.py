"""HSDP (issue 15): parallel.dp_replicate x parallel.dp_shard -> a 2-D mesh, fully_shard over (replicate, shard).

Default run: the layout rules and their messages; per-rank memory follows the shard degree (memory
model, planner); which saved rank's PEFT state a resume reads; SwitchLoRA's pools re-sharded to
another shard degree; on 4 real gloo ranks as 2 x 2, the shard helpers and FSDP2's gradient
average over all 4 ranks. ``-m slow``: STEP (growth + LoRA) on 4 ranks as 2 x 2 HSDP against
4-rank FSDP over 10 steps through a growth and a resume, resumes of the 2 x 2 checkpoint on
1 x 2 and 4 x 1, and SwitchLoRA saved on 2 x 2 and resumed on 4 x 1 (pools re-sharded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, run_distributed, wikitext_overrides
from steptitan.recipe import ParallelConfig, RecipeError, parallel_degrees, recipe_from_dict

# --------------------------------------------------------------------------- layout rules


@pytest.mark.parametrize("replicate,shard,world,expected", [
    (1, -1, 4, (1, 4)),  # the default: one flat shard group
    (2, -1, 4, (2, 2)),
    (-1, 2, 8, (4, 2)),
    (4, 1, 4, (4, 1)),  # pure replication (DDP-like)
    (2, 3, 6, (2, 3)),
    (1, -1, 1, (1, 1)),
])
def test_parallel_degrees_fill_and_multiply(replicate, shard, world, expected):
    assert parallel_degrees(ParallelConfig(replicate, shard), world) == expected


@pytest.mark.parametrize("replicate,shard,world,message", [
    (2, 4, 4, "parallel.dp_replicate (2) x parallel.dp_shard (4) = 8 ranks, but the world size"),
    (3, -1, 4, "parallel.dp_shard=-1 fills the world size, but the world size (torchrun's WORLD_SIZE) is 4, "
               "not a multiple of parallel.dp_replicate=3"),
    (-1, 3, 4, "parallel.dp_replicate=-1 fills the world size"),
    (1, 2, 4, "= 2 ranks, but the world size"),
])
def test_parallel_degrees_that_do_not_fit_the_world_are_recipe_errors(replicate, shard, world, message):
    with pytest.raises(RecipeError) as err:
        parallel_degrees(ParallelConfig(replicate, shard), world)
    assert message in str(err.value)


def _recipe(tmp: Path, **parallel) -> dict:
    return {"name": "h", "output_dir": str(tmp / "run"), "parallel": parallel,
            "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256, "ffn_hidden": 96},
            "training": {"batch_size": 2, "seq_len": 16}, "stages": [{"steps": 2}]}


def test_bad_degrees_are_reported_with_the_recipe(tmp_path):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(_recipe(tmp_path, dp_replicate=0, dp_shard=-3))
    text = str(err.value)
    assert "parallel.dp_replicate: must be >= 1, or -1 (fill with the rest of the world size), got 0" in text
    assert "parallel.dp_shard: must be >= 1, or -1 (fill with the rest of the world size), got -3" in text
    with pytest.raises(RecipeError, match="dp_replicate and dp_shard cannot both be -1"):
        recipe_from_dict(_recipe(tmp_path, dp_replicate=-1, dp_shard=-1))
    with pytest.raises(RecipeError, match="parallel.dp_shard: expected an integer"):
        recipe_from_dict(_recipe(tmp_path, dp_shard="2"))


def test_train_refuses_a_layout_that_does_not_fit_before_any_process_group(tmp_path, monkeypatch, capsys):
    from steptitan.train import EXIT_BAD_INPUT, main

    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main(["recipes/step.toml", f"output_dir={tmp_path / 'run'}", "parallel.dp_replicate=2",
                 "parallel.dp_shard=4"])
    assert code == EXIT_BAD_INPUT
    assert ("steptitan: error: parallel.dp_replicate (2) x parallel.dp_shard (4) = 8 ranks, but the world size "
            "(torchrun's WORLD_SIZE) is 4") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- memory follows the shard degree


def _chunk_rows(rows: int, degree: int, index: int) -> int:
    """FSDP2's dim-0 chunk (torch.chunk), computed by torch itself."""
    chunks = torch.chunk(torch.empty(rows), degree)
    return chunks[index].numel() if index < len(chunks) else 0


def test_predicted_per_rank_bytes_follow_the_shard_degree(tmp_path):
    """One dense stage, fp32 AdamW: a rank holds 16 B (weight, grad, 2 moments) per element of its
    chunk, plus 4 B per step count. 8 ranks as 2 x 4 hold what 4-way FSDP holds, not 8-way."""
    from steptitan.memory import predict_recipe
    from steptitan.model import build_model
    from steptitan.plan import build_plan

    recipe = recipe_from_dict(_recipe(tmp_path, dp_replicate=2))
    plans = build_plan(recipe)
    (stage,) = predict_recipe(recipe, plans, 8)
    assert len(stage.per_rank) == 4  # one entry per shard index
    model = build_model(plans[0].shape)
    for r in range(4):
        expected = sum(16 * _chunk_rows(p.shape[0], 4, r) * math.prod(p.shape[1:]) + 4
                       for p in model.parameters())
        assert stage.per_rank[r]["model_states"] == expected, r
    flat = recipe_from_dict(_recipe(tmp_path))
    assert [s.per_rank for s in predict_recipe(flat, build_plan(flat), 4)] == [stage.per_rank]
    assert predict_recipe(flat, build_plan(flat), 8)[0].peak_model_states < stage.peak_model_states


def test_planner_flags_give_per_rank_bytes_of_the_shard_degree(capsys):
    from steptitan.planner import plan_cli

    def table(*flags: str) -> list[str]:
        assert plan_cli(["--dim", "256", "--layers", "6", "-K", "2", "--vocab", "1000", "--top", "2", *flags]) == 0
        out = capsys.readouterr().out.splitlines()
        return [line for line in out if not line.startswith(("target:", "  ranks:"))]  # these name the layout

    hsdp = table("-W", "8", "--dp-replicate", "2")
    assert hsdp == table("--dp-shard", "4", "--dp-replicate", "2")  # -W defaults to the product
    assert hsdp == table("-W", "4")
    assert hsdp != table("-W", "8")
    plan_cli(["--dim", "256", "--layers", "6", "-K", "2", "--vocab", "1000", "-W", "8", "--dp-replicate", "2"])
    assert "2 x 4 HSDP" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--world-size is 6, not a multiple of parallel.dp_replicate=4"):
        plan_cli(["-W", "6", "--dp-replicate", "4"])


# --------------------------------------------------------------------------- resume: which saved PEFT state


def _fake_checkpoint(root: Path, world: int, dp_shard: int) -> "object":
    from steptitan.checkpoint import CheckpointInfo

    path = root / "stage01-step000002"
    path.mkdir(parents=True)
    for r in range(world):
        torch.save({"rng": None, "trainer": {"rank": r}, "peft": {"0": {"saved_by": r}, "1": {}}},
                   path / f"extra-rank{r}.pt")
    return CheckpointInfo(path, 1, 2, {"world_size": world, "dp_shard": dp_shard})


@pytest.mark.parametrize("saved,now,rank,expected", [
    ((4, 2), (4, 2), 3, 3),  # same layout: its own file
    ((4, 2), (2, 2), 1, 1),  # 2 x 2 -> 1 x 2: replica 0's holder of shard 1
    ((4, 2), (8, 2), 5, 1),  # 2 x 2 -> 4 x 2
    ((4, 4), (4, 2), 3, 3),  # another shard degree: the loaded file's, with every shard's state attached
    ((4, 4), (2, 2), 1, 0),  # ... rank 0's when the world size changed too
])
def test_resume_reads_the_peft_state_of_the_same_shard(tmp_path, saved, now, rank, expected):
    from steptitan.checkpoint import Checkpointer

    info = _fake_checkpoint(tmp_path, *saved)
    ck = Checkpointer(tmp_path, rank, now[0], dp_shard=now[1])
    extra = torch.load(info.path / f"extra-rank{rank if saved[0] == now[0] else 0}.pt", weights_only=False)
    peft = ck._peft_state(info, extra)
    assert peft["0"]["saved_by"] == expected and peft["1"] == {}
    if saved[1] == now[1]:
        assert "shards" not in peft["0"]
    else:
        assert [s["saved_by"] for s in peft["0"]["shards"]] == list(range(saved[1]))


def test_switchlora_pools_are_resharded_to_another_shard_degree():
    """Pools saved in 4 shards (torch.chunk of the whole pool) load as shard 1 of 2, and back."""
    from steptitan.registry.peft.switchlora import SwitchLoRA, SwitchLoRAOptions

    whole = {"A": torch.randn(10, 6), "B": torch.randn(7, 6)}  # (in, P) and (out, P); uneven chunks
    saved = [{"world_size": 4, "shard_degree": 4, "switches": 3,
              "pools": {"layers.0.attention.wq": {k: torch.chunk(v, 4)[i] for k, v in whole.items()}},
              "frozen_A": {}, "frozen_B": {}} for i in range(4)]
    method = SwitchLoRA(SwitchLoRAOptions(rank=2), layers=[0])
    method.shard_degree, method.shard_index = 2, 1
    method.pools = {"layers.0.attention.wq": {k: torch.zeros_like(torch.chunk(v, 2)[1]) for k, v in whole.items()}}
    method.load_state_dict({**saved[0], "shards": saved})
    for k, v in whole.items():
        assert torch.equal(method.pools["layers.0.attention.wq"][k], torch.chunk(v, 2)[1])
    assert method.switches == 3
    with pytest.raises(RuntimeError, match="saved in 4 shards, this run has 2"):
        method.load_state_dict(saved[0])


# --------------------------------------------------------------------------- 4 real gloo ranks as 2 x 2


def _hsdp_helpers(env):
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from steptitan.distributed import build_mesh, gather_rows, global_rows, shard_degree, shard_index, shard_rows

    env = dataclasses.replace(env, mesh=build_mesh("cpu", env.world_size, dp_replicate=2))
    out = {"layout": (env.dp_replicate, env.dp_shard, env.shard_rank)}
    like = distribute_tensor(torch.zeros(5, 3), env.mesh, [Replicate(), Shard(0)])
    full = torch.arange(14.0).view(7, 2)
    local = shard_rows(full, like)
    out["degree"] = (shard_degree(like), shard_index(like))
    out["rows"] = local.tolist()
    out["gathered"] = gather_rows(local, like, 7).tolist()
    out["global_rows"] = global_rows(like).tolist()
    # FSDP2 over (replicate, shard): every rank ends with the gradient averaged over all 4 ranks.
    torch.manual_seed(0)
    lin = nn.Linear(3, 5)
    fully_shard(lin, mesh=env.mesh)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(100 + env.rank))
    lin(x).pow(2).sum().backward()
    out["placements"] = [type(p).__name__ for p in lin.weight.placements]
    out["grad"] = lin.weight.grad.full_tensor().tolist()
    return out


@pytest.mark.dist
def test_two_by_two_mesh_helpers_and_gradient_average():
    from torch import nn

    results = run_distributed(_hsdp_helpers, 4)
    torch.manual_seed(0)
    ref = nn.Linear(3, 5)
    grads = []
    for r in range(4):
        ref.zero_grad()
        ref(torch.randn(4, 3, generator=torch.Generator().manual_seed(100 + r))).pow(2).sum().backward()
        grads.append(ref.weight.grad.clone())
    mean = torch.stack(grads).mean(0)
    full = torch.arange(14.0).view(7, 2)
    for r, out in enumerate(results):
        assert out["layout"] == (2, 2, r % 2)
        assert out["degree"] == (2, r % 2)
        assert out["rows"] == torch.chunk(full, 2)[r % 2].tolist()
        assert out["gathered"] == full.tolist()
        assert out["global_rows"] == [[0, 1, 2], [3, 4]][r % 2]
        assert out["placements"] == ["Replicate", "Shard"]
        torch.testing.assert_close(torch.tensor(out["grad"]), mean, rtol=1e-5, atol=1e-6)
