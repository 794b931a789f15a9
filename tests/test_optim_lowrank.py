"""GaLore and Fira under FSDP2 (issue 23, item 5), on real 2-rank gloo groups.

The parameters are DTensors sharded on dim 0 as FSDP2 shards them (uneven shards included), with
weights of both projection sides (m >= n: right, m < n: left). Checked:

* the sharded run's parameters after 5 steps (projection refreshed at steps 0, 2, 4) equal the
  package's own optimizer (galore-torch ``GaLoreAdamW``, fira ``FiraAdamW`` with its own limiter)
  run on the whole tensors in one process, to float32 tolerance; on one process without a group the
  plugin's optimizer reproduces the package bit for bit;
* each rank runs the SVD only for the projected weights it owns (dealt round robin in the
  optimizer's parameter order), and every rank's projector equals the SVD of the whole gradient;
* the step reads no tensor value on the host (bool / item / tolist / float / int of any tensor,
  the norm-growth limiter included), where the package's limiter does;
* the plugin's predicted refresh buffers (gathered gradient + SVD factors on the owner) equal the
  bytes of the tensors the SVD is called with and returns, and its optimizer-state bytes equal
  the state measured with ``metrics.memory_breakdown`` on each rank.
"""

from __future__ import annotations

import contextlib

import math

import pytest
import torch

from conftest import run_distributed

pytest.importorskip("galore_torch")
pytest.importorskip("fira")

# name -> global shape. Projected (block linears): wq right (12 >= 8), w2 left (6 < 10),
# w1 right with uneven shards over 2 ranks (7 rows), wo left with uneven shards (5 rows); the
# norm weight and the embedding get the package's plain Adam branch.
SHAPES = {
    "tok_embeddings.weight": (9, 4),
    "layers.0.attention.wq.weight": (12, 8),
    "layers.0.feed_forward.w2.weight": (6, 10),
    "layers.0.feed_forward.w1.weight": (7, 5),
    "layers.1.attention.wo.weight": (5, 9),
    "norm.weight": (8,),
}
PROJECTED = [n for n in SHAPES if n.startswith("layers.")]  # in the optimizer's parameter order
RANK, GAP, SCALE, STEPS = 3, 2, 0.5, 5
LR, BETAS, EPS, WD = 0.05, (0.9, 0.999), 1e-8, 0.01


def _initial_and_grads() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(23)
    init = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    # growing gradients, so Fira's norm-growth limiter bites
    grads = [{n: torch.randn(s, generator=gen) * (1 + step) ** 2 for n, s in SHAPES.items()} for step in range(STEPS)]
    return init, grads


def _reference(name: str) -> dict[str, torch.Tensor]:
    """The package's optimizer on whole tensors (its own limiter: Python's max), one process."""
    from fira import FiraAdamW, fira_adamw
    from galore_torch import GaLoreAdamW

    init, grads = _initial_and_grads()
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    projected = {"rank": RANK, "update_proj_gap": GAP, "proj_type": "std"}
    projected.update(alpha=SCALE) if name == "fira" else projected.update(scale=SCALE)
    groups = [{"params": [params[n] for n in SHAPES if n not in PROJECTED]},
              {"params": [params[n] for n in PROJECTED], **projected}]
    cls = FiraAdamW if name == "fira" else GaLoreAdamW
    with _package_limiter(fira_adamw):
        opt = cls(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, no_deprecation_warning=True)
        for g in grads:
            for n, p in params.items():
                p.grad = g[n].clone()
            opt.step()
    return {n: p.detach().clone() for n, p in params.items()}


@contextlib.contextmanager
def _package_limiter(fira_adamw):
    """fira's module as shipped (its limiter: Python's max) for the block, whatever was patched before."""
    saved = fira_adamw.__dict__.get("max")
    fira_adamw.max = max
    try:
        yield
    finally:
        if saved is None:
            del fira_adamw.max
        else:
            fira_adamw.max = saved


class HostReads(torch.overrides.TorchFunctionMode):
    """Every host read of a tensor value (any caller: the package, torch, steptitan)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


class SvdCalls:
    """Wraps torch.linalg.svd: records the input's shape and the bytes the call holds (the input's whole
    storage, e.g. a padded gather buffer it is a view of, and the returned factors)."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []
        self.held: list[int] = []
        self._svd = torch.linalg.svd

    def __enter__(self):
        def counted(a, *args, **kwargs):
            out = self._svd(a, *args, **kwargs)
            self.shapes.append(tuple(a.shape))
            self.held.append(a.untyped_storage().nbytes() + sum(t.numel() * t.element_size() for t in out))
            return out

        torch.linalg.svd = counted
        return self

    def __exit__(self, *exc):
        torch.linalg.svd = self._svd


def _sharded_run(env, name: str):
    """Rank's view of STEPS steps of the plugin's optimizer over dim-0 sharded DTensor parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from steptitan.metrics import memory_breakdown
    from steptitan.optim import OptimizerHParams
    from steptitan.registry import OPTIM

    mesh = init_device_mesh("cpu", (env.world_size,))
    init, grads = _initial_and_grads()
    params = {n: torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for n, t in init.items()}
    plugin = OPTIM.get(name)(OPTIM.get(name).Options(rank=RANK, update_proj_gap=GAP, scale=SCALE))
    opt = plugin.build(list(params.items()), OptimizerHParams(LR, BETAS, EPS, WD))
    svd_shapes, svd_held, reads, projectors = [], [], [], []
    for step, g in enumerate(grads):
        for n, p in params.items():
            p.grad = distribute_tensor(g[n].clone(), mesh, [Shard(0)])
        with SvdCalls() as svd, HostReads() as host:
            opt.step()
        svd_shapes.append(svd.shapes)
        svd_held.append(svd.held)
        reads.append(host.reads)
        if step % GAP == 0:  # this rank's projector of each weight, as held in the state
            projectors.append({n: _local(opt.state[params[n]]["projector"].ortho_matrix) for n in PROJECTED})
    full = {n: p.full_tensor() for n, p in params.items()}
    measured = memory_breakdown(torch.nn.ParameterList(params.values()), opt)["optimizer"]
    shapes = {n: (tuple(p.to_local().shape), SHAPES[n]) for n, p in params.items()}
    predicted_state = sum(plugin.state_bytes(n, loc, glob, env.world_size) for n, (loc, glob) in shapes.items())
    predicted_refresh = (plugin.refresh_bytes([(n, SHAPES[n]) for n in SHAPES], env.world_size, env.rank)
                         if hasattr(plugin, "refresh_bytes") else None)
    return dict(full=full, svd_shapes=svd_shapes, svd_held=svd_held, reads=reads, projectors=projectors,
                measured=measured, predicted_state=predicted_state, predicted_refresh=predicted_refresh)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _sharded_runs(env, names: list[str]) -> dict[str, dict]:
    return {name: _sharded_run(env, name) for name in names}


@pytest.fixture(scope="module")
def two_rank_runs():
    """Both plugins in one 2-rank process group (one spawn: most of the time is the start-up)."""
    per_rank = run_distributed(_sharded_runs, 2, names=["galore", "fira"])
    return {name: [out[name] for out in per_rank] for name in ("galore", "fira")}


@pytest.fixture(params=["galore", "fira"])
def two_ranks(request, two_rank_runs):
    return request.param, two_rank_runs[request.param]


@pytest.mark.dist
def test_sharded_run_equals_the_package_on_whole_tensors(two_ranks):
    name, results = two_ranks
    ref = _reference(name)
    for rank, out in enumerate(results):
        for n in SHAPES:
            torch.testing.assert_close(out["full"][n], ref[n], rtol=2e-5, atol=2e-6, msg=lambda m: f"{name} rank {rank} {n}: {m}")
    init, _ = _initial_and_grads()
    assert all(not torch.equal(ref[n], init[n]) for n in SHAPES)


@pytest.mark.dist
def test_each_rank_runs_the_svd_only_for_the_weights_it_owns(two_ranks):
    """Round robin in the optimizer's parameter order: rank 0 owns wq and w1, rank 1 w2 and wo; the
    refresh steps (0, 2, 4) run one SVD per owned weight, of the whole gradient; other steps none."""
    name, results = two_ranks
    for rank, out in enumerate(results):
        owned = [SHAPES[n] for k, n in enumerate(PROJECTED) if k % 2 == rank]
        for step, shapes in enumerate(out["svd_shapes"]):
            assert shapes == (owned if step % GAP == 0 else []), (name, rank, step, shapes)


@pytest.mark.dist
def test_every_rank_holds_the_projector_of_the_whole_gradient(two_ranks):
    """The broadcast projector is the owner's SVD of the whole gradient, bit for bit (galore-torch's
    "std" choice: the top-r right singular vectors for m >= n, this rank's rows of the top-r left ones
    for m < n)."""
    from steptitan.distributed import local_rows

    name, results = two_ranks
    _, grads = _initial_and_grads()
    for rank, out in enumerate(results):
        for refresh, held in enumerate(out["projectors"]):
            for n in PROJECTED:
                m, k = SHAPES[n]
                u, _, vh = torch.linalg.svd(grads[refresh * GAP][n], full_matrices=False)
                if m >= k:
                    expected = vh[:RANK]
                else:
                    chunk = math.ceil(m / 2)
                    expected = u[rank * chunk: rank * chunk + local_rows(m, 2, rank), :RANK]
                assert torch.equal(held[n], expected), (name, rank, refresh, n)


@pytest.mark.dist
def test_the_step_reads_no_tensor_value_on_the_host(two_ranks):
    name, results = two_ranks
    for rank, out in enumerate(results):
        assert out["reads"] == [[]] * STEPS, (name, rank, out["reads"])


def test_the_host_read_counter_sees_the_packages_limiter():
    """The counter can fail: fira's own limiter ``max(tensor, 1.01)`` calls bool() on a tensor."""
    from fira import FiraAdamW, fira_adamw

    w = torch.nn.Parameter(torch.randn(6, 10))
    opt = FiraAdamW([{"params": [w], "rank": 2, "update_proj_gap": 1, "alpha": 0.5, "proj_type": "std"}], lr=0.1)
    with _package_limiter(fira_adamw), HostReads() as host:
        for _ in range(2):
            w.grad = torch.randn(6, 10)
            opt.step()
    assert "__bool__" in host.reads


@pytest.mark.dist
def test_predicted_refresh_buffers_and_state_bytes_equal_measured(two_ranks):
    """Per rank: the refresh's peak buffers (the gathered gradient, padded to FSDP2's chunks, and its SVD
    factors, on the owner) as the plugin predicts them == the largest measured at an SVD call; the
    optimizer state (moments, projector rows, limiter norms) == metrics.memory_breakdown."""
    name, results = two_ranks
    for rank, out in enumerate(results):
        assert out["predicted_refresh"] == max(max(h, default=0) for h in out["svd_held"]), (name, rank)
        assert out["predicted_state"] == out["measured"], (name, rank, out["predicted_state"], out["measured"])


@pytest.mark.parametrize("name", ["galore", "fira"])
def test_without_a_process_group_the_plugin_is_the_package_bit_for_bit(name):
    from steptitan.optim import OptimizerHParams
    from steptitan.registry import OPTIM

    init, grads = _initial_and_grads()
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    plugin = OPTIM.get(name)(OPTIM.get(name).Options(rank=RANK, update_proj_gap=GAP, scale=SCALE))
    opt = plugin.build(list(params.items()), OptimizerHParams(LR, BETAS, EPS, WD))
    with SvdCalls() as svd:
        for g in grads:
            for n, p in params.items():
                p.grad = g[n].clone()
            opt.step()
    ref = _reference(name)
    for n in SHAPES:
        torch.testing.assert_close(params[n].detach(), ref[n], rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
    assert len(svd.shapes) == len(PROJECTED) * len(range(0, STEPS, GAP))


# --------------------------------------------------------------------------- the estimates (memory, FLOPs, planner)


@pytest.mark.parametrize("name, matmuls", [("galore", 2), ("fira", 3)])
def test_step_flops_by_hand(name, matmuls):
    """wq 12 x 8 (right) and w2 6 x 10 (left), rank 3, gap 2, on 2 ranks. Rank 0 holds 6 rows of wq and 3
    of w2 and owns wq's SVD: projection 2 (project, back; Fira + the residual's back) x 2 m_loc n r each,
    SVD (Golub & Van Loan's R-SVD: 6 a b^2 + 20 b^3) / gap."""
    from steptitan.registry import OPTIM

    plugin = OPTIM.get(name)(OPTIM.get(name).Options(rank=3, update_proj_gap=2))
    named = [("layers.0.attention.wq.weight", (12, 8)), ("layers.0.feed_forward.w2.weight", (6, 10)),
             ("norm.weight", (8,))]
    assert plugin.step_flops(named, 2, 0) == {"projection": matmuls * (2 * 6 * 8 * 3 + 2 * 3 * 10 * 3),
                                              "svd": (6 * 12 * 8 * 8 + 20 * 8 ** 3) // 2}
    assert plugin.step_flops(named, 2, 1) == {"projection": matmuls * (2 * 6 * 8 * 3 + 2 * 3 * 10 * 3),
                                              "svd": (6 * 10 * 6 * 6 + 20 * 6 ** 3) // 2}


def _shapes_owned(model, rank: int, world: int) -> list[tuple[int, int]]:
    projected = [tuple(p.shape) for n, p in model.named_parameters()
                 if p.dim() == 2 and n.startswith("layers.") and (".attention." in n or ".feed_forward." in n)]
    return projected[rank::world]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_memory_model_counts_the_refresh_and_the_flops(tmp_path, world):
    """``predict_stage``: each rank's overhead ``optimizer_refresh`` is the largest of its owned weights'
    refresh buffers (gather buffer of FSDP2's padded chunks + U, S, Vh in fp32), and its optimizer FLOPs
    include the owned SVDs; an AdamW stage has neither."""
    from test_optim import _recipe_dict

    from steptitan.memory import predict_stage
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict

    galore = build_plan(recipe_from_dict(_recipe_dict(str(tmp_path / "g"), {"default": {"name": "galore", "rank": 8}})))[0]
    adamw = build_plan(recipe_from_dict(_recipe_dict(str(tmp_path / "a"), {"default": "adamw"})))[0]
    training = recipe_from_dict(_recipe_dict(str(tmp_path / "g"), {"default": "galore"})).training
    predicted = predict_stage(galore, world, training)
    model = galore.build()
    for rank in range(world):
        owned = _shapes_owned(model, rank, world)
        expected = max(4 * (world * math.ceil(m / world) * n if world > 1 else 0) + 4 * (m * min(m, n) + min(m, n) + min(m, n) * n)
                       for m, n in owned)
        assert predicted.overheads[rank]["optimizer_refresh"] == expected, (rank, owned)
        svd = sum(6 * max(m, n) * min(m, n) ** 2 + 20 * min(m, n) ** 3 for m, n in owned) // 200
        assert predicted.optimizer_flops[rank]["svd"] == svd
    plain = predict_stage(adamw, world, training)
    assert all(o["optimizer_refresh"] == 0 for o in plain.overheads) and plain.optimizer_flops == [{}] * world


def test_the_planner_adds_the_refresh_to_a_stage_peak():
    from steptitan.memory import OptimizerSpec
    from steptitan.model import ModelShape
    from steptitan.planner import layer_inventory, split_memory
    from steptitan.registry import OPTIM

    shape = ModelShape(dim=32, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=64, ffn_hidden=48, max_seq_len=16)
    inv = layer_inventory(shape)
    galore = OptimizerSpec.of({g: OPTIM.get("galore")(OPTIM.get("galore").Options(rank=4))
                               for g in ("old", "new", "embeddings", "head")})
    split = split_memory(inv, [2, 2], world_size=2, optimizer=galore)
    # rank 0 owns every other block linear; the largest is a 48 x 32 w1/w3 (gathered in 2 chunks of 24 rows)
    assert split.optimizer_refresh == [4 * 48 * 32 + 4 * (48 * 32 + 32 + 32 * 32)] * 2
    assert split.peak_total == max(s["model_states"] + a + r for s, a, r in
                                   zip(split.per_stage, split.activations, split.optimizer_refresh))
    assert split_memory(inv, [2, 2], world_size=2).optimizer_refresh == [0, 0]
