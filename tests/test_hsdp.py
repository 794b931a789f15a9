"""HSDP (issue 15): parallel.dp_replicate x parallel.dp_shard -> a 2-D mesh, fully_shard over (replicate, shard).

Default run: the layout rules and their messages; per-rank memory follows the shard degree (memory
model, planner); which saved rank's PEFT state a resume reads; SwitchLoRA's pools re-sharded to
another shard degree; on 4 real gloo ranks as 2 x 2, the shard helpers, FSDP2's gradient
average over all 4 ranks, and growth (width and depth) equal to single-process growth with width
growth's gathers confined to the shard group. ``-m slow``: STEP (growth + LoRA) on 4 ranks as 2 x 2 HSDP against
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
from torch.utils._python_dispatch import TorchDispatchMode

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
    from steptitan.planner_cli import plan_cli

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
    out["growth"] = _growth_on_hsdp(env)
    out["init"] = _init_on_hsdp(env)
    return out


INIT_SHAPE = dict(dim=8, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=23, ffn_hidden=12, max_seq_len=16)


def _init_on_hsdp(env) -> dict:
    """The dealt initialisation (issue 23, item 7) on the 2 x 2 mesh: the full weights."""
    from steptitan.distributed import full_tensor, shard_model
    from steptitan.model import ModelShape, build_model, init_model_weights

    shape = ModelShape(**INIT_SHAPE)
    model = build_model(shape)
    shard_model(model, env.mesh)
    model.to_empty(device="cpu")
    init_model_weights(model, shape, seed=9)
    return {"full": {n: full_tensor(p).detach().clone() for n, p in model.named_parameters()}}


# (operator, options) grown on 2 x 2 and compared with the same growth in one process: width growth
# with uneven chunks (vocab 23, dims 11 / 19 over 2 shards), a random mapping, AKI and LEMON, moments
# carried (optimizer_state = "copy"); depth growth by interpolation, moments carried too.
HSDP_GROWTH = [
    ("bert2bert", dict(dim=16, ffn_hidden=24, n_heads=4, mapping="cyclic", optimizer_state="copy")),
    ("bert2bert", dict(dim=11, ffn_hidden=19, mapping="random", seed=3, method="aki", optimizer_state="copy")),
    ("lemon", dict(dim=12, ffn_hidden=24, n_heads=4, optimizer_state="copy")),
    ("interpolate", dict(n_new=2, position="uniform", init="copy", optimizer_state="copy")),
]


class CollectiveGroups(TorchDispatchMode):
    """The ranks of the process group of every collective run while active: functional collectives
    name their group (a string), c10d ops carry the ProcessGroup. Ops with neither (``wait_tensor``,
    ``_wrap_tensor_autograd``) are not collectives."""

    def __init__(self):
        super().__init__()
        self.groups: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            for a in args:
                group = None
                if isinstance(a, str):
                    group = _resolve_process_group(a)
                elif isinstance(a, dist.ProcessGroup):
                    group = a
                if group is not None:
                    self.groups.append(tuple(dist.get_process_group_ranks(group)))
                    break
        return func(*args, **(kwargs or {}))


def _growth_on_hsdp(env) -> dict:
    """Growth on the 2 x 2 mesh: the grown model (and its carried Adam moments) equals single-process
    growth; width growth's gathers run on this rank's shard group only (ranks 2i, 2i+1: nothing crosses
    the replicate dim); depth growth runs no collective at all."""
    from test_growth_dist import sharded_copy, sharded_matches_single_process

    from steptitan.model import ModelShape
    from test_growth import dense, make

    shape = ModelShape(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=23, ffn_hidden=12,
                       tie_embeddings=True, max_seq_len=16)
    out: dict = {"matches": sharded_matches_single_process(
        env, [(shape, name, opts, 7 + i) for i, (name, opts) in enumerate(HSDP_GROWTH)])}
    for name, opts in HSDP_GROWTH:
        op = make(name, **opts)
        small = sharded_copy(dense(shape, 0), shape, env)
        big = sharded_copy(dense(op.target_shape(shape), 1), op.target_shape(shape), env)
        with CollectiveGroups() as probe:
            op.grow(small, big, shape)
        out[name + ("-aki" if opts.get("method") == "aki" else "")] = sorted(set(probe.groups))
    return out


@pytest.mark.dist
def test_two_by_two_mesh_helpers_and_gradient_average():
    from torch import nn

    from steptitan.model import ModelShape, build_model, init_model_weights

    results = run_distributed(_hsdp_helpers, 4)
    reference = build_model(ModelShape(**INIT_SHAPE), "cpu")
    init_model_weights(reference, ModelShape(**INIT_SHAPE), seed=9)  # one process: every unit drawn here
    reference_init = {n: p.detach() for n, p in reference.named_parameters()}
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
        growth = out["growth"]
        assert growth["matches"] == len(HSDP_GROWTH)
        shard_group = [(r // 2 * 2, r // 2 * 2 + 1)]  # rank = replica * dp_shard + shard
        for width in ("bert2bert", "bert2bert-aki", "lemon"):
            assert growth[width] == shard_group, (width, growth[width])  # gathers within the shard group only
        assert growth["interpolate"] == [], growth["interpolate"]  # depth growth: shard-local
        # the dealt init: the single-process weights on every rank (each replica's shard group deals the units)
        for name, weight in out["init"]["full"].items():
            assert torch.equal(weight, reference_init[name]), (r, name)


# --------------------------------------------------------------------------- slow: real runs, 4 gloo ranks

STAGE0, STAGE1 = 6, 4
RTOL = 1e-4  # HSDP reduces in another order (reduce-scatter in 2, all-reduce in 2) than 4-way FSDP


def tiny_args(cache_dir: Path, run_dir: Path, *extra: str, recipe: str = "recipes/step.toml") -> list[str]:
    return [recipe, *wikitext_overrides(cache_dir), f"output_dir={run_dir}", "model.dim=64", "training.seq_len=32",
            "training.batch_size=2", "training.eval_batches=2", "training.steps_per_log=1",
            "training.deterministic=true", "training.warmup_steps=2", f"stages.0.steps={STAGE0}",
            f"stages.1.steps={STAGE1}", "checkpoint.interval=1", *extra]


def run(args: list[str], nproc: int, log: Path) -> dict[tuple[int, int], float]:
    """torchrun; (stage, step) -> the all-reduced loss rank 0 logged (STEPTITAN_LOSS_LOG, exact floats)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "steptitan.train", *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "STEPTITAN_LOSS_LOG": str(log)})
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return {(r["stage"], r["step"]): r["loss"] for r in map(json.loads, log.read_text().splitlines())}


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() <= b.keys(), sorted(a.keys() - b.keys())
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def abs_diff(a: dict, b: dict) -> float:
    assert a.keys() <= b.keys(), sorted(a.keys() - b.keys())
    return max(abs(a[k] - b[k]) for k in a)


@pytest.fixture(scope="module")
def four_rank_runs(tmp_path_factory, cache_dir):
    """4-rank FSDP and 4-rank 2 x 2 HSDP, the same STEP recipe (growth + LoRA), a checkpoint every step."""
    root = tmp_path_factory.mktemp("hsdp")
    fsdp = run(tiny_args(cache_dir, root / "fsdp"), 4, root / "fsdp.jsonl")
    hsdp = run(tiny_args(cache_dir, root / "hsdp", "parallel.dp_replicate=2"), 4, root / "hsdp.jsonl")
    assert len(fsdp) == len(hsdp) == STAGE0 + STAGE1
    return root, fsdp, hsdp


@pytest.mark.slow
@pytest.mark.dist
def test_hsdp_matches_fsdp_through_a_growth_and_a_resume(four_rank_runs, cache_dir):
    root, fsdp, hsdp = four_rank_runs
    whole = rel_diff(hsdp, fsdp)
    # Resumed on 2 x 2 from stage 0 step 4: the resumed run then grows (stage 1) itself.
    ckpt = root / "hsdp" / "checkpoints" / "stage00-step000004"
    resumed = run(tiny_args(cache_dir, root / "hsdp-resumed", "parallel.dp_replicate=2", f"checkpoint.resume={ckpt}"),
                  4, root / "hsdp-resumed.jsonl")
    assert sorted(resumed) == [(0, 5), (0, 6)] + [(1, s) for s in range(1, STAGE1 + 1)]
    after = rel_diff(resumed, fsdp)
    print(f"HSDP 2x2 vs FSDP 4: max relative loss difference {whole:.2e} over {len(fsdp)} steps "
          f"(growth at step {STAGE0}); resumed 2x2 run vs FSDP {after:.2e}; resumed vs uninterrupted 2x2 "
          f"{rel_diff(resumed, hsdp):.2e}; max absolute loss difference {abs_diff(hsdp, fsdp):.2e} (whole run), "
          f"{abs_diff(resumed, fsdp):.2e} (resumed vs FSDP)")
    assert whole < RTOL and after < RTOL
    # Per-rank model states follow the shard degree: measured on rank r == predicted for shard r % 2.
    summary = json.loads((root / "hsdp" / "summary.json").read_text())
    assert (summary["dp_replicate"], summary["dp_shard"]) == (2, 2)
    for stage in summary["stages"]:
        assert len(stage["predicted_model_state_bytes"]) == 2
        for r in stage["ranks"]:
            assert r["peak_step_memory"]["model_states"] == stage["predicted_model_state_bytes"][r["rank"] % 2]


@pytest.mark.slow
@pytest.mark.dist
def test_two_by_two_checkpoint_resumes_on_four_by_one_exactly_and_continues_on_one_by_two(four_rank_runs, cache_dir):
    """DCP re-shards the 2 x 2 checkpoint (stage 1 step 2, after growth) to any layout.

    4 x 1 keeps the world size, so the global batch and each rank's data: the same trajectory as the
    uninterrupted run (up to reduction order). 1 x 2 halves the global batch: it continues, on other data."""
    root, fsdp, hsdp = four_rank_runs
    ckpt = root / "hsdp" / "checkpoints" / "stage01-step000002"
    wide = run(tiny_args(cache_dir, root / "r4x1", "parallel.dp_replicate=4", f"checkpoint.resume={ckpt}"),
               4, root / "r4x1.jsonl")
    assert sorted(wide) == [(1, 3), (1, 4)]
    narrow = run(tiny_args(cache_dir, root / "r1x2", f"checkpoint.resume={ckpt}"), 2, root / "r1x2.jsonl")
    assert sorted(narrow) == [(1, 3), (1, 4)]
    print(f"2x2 checkpoint resumed on 4x1: max relative loss difference {rel_diff(wide, hsdp):.2e} vs the "
          f"uninterrupted 2x2 run, {rel_diff(wide, fsdp):.2e} vs FSDP; on 1x2: {rel_diff(narrow, hsdp):.2e} "
          f"(continues on half the global batch); max absolute: 4x1 {abs_diff(wide, hsdp):.2e}, "
          f"1x2 {abs_diff(narrow, hsdp):.2e}")
    assert rel_diff(wide, hsdp) < RTOL
    assert all(math.isfinite(v) for v in narrow.values()) and rel_diff(narrow, hsdp) > 10 * RTOL


def _pools(ckpt: Path, method: str = "0") -> dict[str, torch.Tensor]:
    """Whole SwitchLoRA pools of a checkpoint: the shards of replica 0 (ranks 0 .. dp_shard-1), concatenated."""
    meta = json.loads((ckpt / "meta.json").read_text())
    states = [torch.load(ckpt / f"extra-rank{r}.pt", weights_only=False)["peft"][method]
              for r in range(meta["dp_shard"])]
    return {f"{name}.{key}": torch.cat([s["pools"][name][key] for s in states])
            for name, pools in states[0]["pools"].items() for key in pools}


@pytest.mark.slow
@pytest.mark.dist
def test_switchlora_saved_on_two_by_two_resumes_on_four_by_one_with_resharded_pools(tmp_path, cache_dir):
    """Pools are per-shard state outside DCP: from 2 shards to 4 they are concatenated and re-split."""
    extra = ("stages.1.peft.interval0=1", "stages.1.peft.freeze_steps=1")  # several switches every step
    args = dict(recipe="recipes/step_switchlora.toml")
    base = run(tiny_args(cache_dir, tmp_path / "sl2x2", "parallel.dp_replicate=2", *extra, **args), 4,
               tmp_path / "sl2x2.jsonl")
    ckpt = tmp_path / "sl2x2" / "checkpoints" / "stage01-step000002"
    wide = run(tiny_args(cache_dir, tmp_path / "sl4x1", "parallel.dp_replicate=4", f"checkpoint.resume={ckpt}",
                         *extra, **args), 4, tmp_path / "sl4x1.jsonl")
    assert sorted(wide) == [(1, 3), (1, 4)]
    final = f"stage01-step{STAGE1:06d}"
    a, b = _pools(tmp_path / "sl2x2" / "checkpoints" / final), _pools(tmp_path / "sl4x1" / "checkpoints" / final)
    assert a.keys() == b.keys() and a
    pool_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"SwitchLoRA 2x2 -> 4x1 resume: max relative loss difference {rel_diff(wide, base):.2e}; "
          f"whole pools at the end differ by at most {pool_diff:.2e}")
    assert rel_diff(wide, base) < RTOL and pool_diff < 1e-4
