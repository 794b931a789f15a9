"""PEFT transforms on FSDP2-sharded models, 2 real gloo ranks.

Each transform must keep the model's outputs (float32, tight tolerance) with
parameters and optimizer state sharded over 2 ranks -- including shapes whose
rows do not split evenly -- and every rank must make the same choices. Shapes
are drawn from a seeded generator inside the workers (a few per run), not by
hypothesis: spawning 2 processes per example would cost minutes.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.distributed as dist

from conftest import run_distributed
from test_peft import train_steps

pytestmark = pytest.mark.dist

ATOL, RTOL = 5e-5, 1e-5


def _shapes(seed: int, n: int):
    from steptitan.model import ModelShape

    rng = random.Random(seed)
    out = [ModelShape(dim=12, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=37, ffn_hidden=13, max_seq_len=16)]
    for _ in range(n - 1):
        head_dim, n_kv = rng.choice([2, 4, 6]), rng.randint(1, 2)
        n_heads = n_kv * rng.randint(1, 2)
        out.append(ModelShape(dim=n_heads * head_dim, n_layers=rng.randint(1, 2), n_heads=n_heads, n_kv_heads=n_kv,
                              vocab_size=rng.randint(8, 40), ffn_hidden=rng.randint(3, 21), max_seq_len=16))
    return out


def _build(env, shape, name: str, seed: int, **options):
    """Meta model + PEFT -> FSDP2 -> materialise -> dense init; adapters zeroed (not yet initialised)."""
    from steptitan.distributed import local_tensor, shard_model
    from steptitan.model import build_model, init_model_weights
    from steptitan.registry import PEFT
    from steptitan.registry.peft.lora import lora_modules

    model = build_model(shape)
    cls = PEFT.get(name)
    method = cls(cls.Options(**options), list(range(shape.n_layers)), seed=seed)
    method.apply(model)
    shard_model(model, env.mesh)
    model.to_empty(device=env.device)
    torch.manual_seed(seed)
    with torch.no_grad():
        init_model_weights(model)
        for _, m in lora_modules(model):
            local_tensor(m.lora_A).zero_()
            local_tensor(m.lora_B).zero_()
    return model, method


def _out(model, x):
    with torch.no_grad():
        return model(x)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def _randomize(model, seed):
    from steptitan.distributed import init_like
    from steptitan.registry.peft.lora import lora_modules

    g = torch.Generator().manual_seed(seed)
    for _, m in lora_modules(model):
        r = m.lora_A.shape[0]
        init_like(m.lora_A, lambda t, gen: t.normal_(0, 1 / math.sqrt(m.in_features), generator=gen), g)
        init_like(m.lora_B, lambda t, gen: t.normal_(0, 1 / (m.scale * math.sqrt(r)), generator=gen), g)


def _trainable(model) -> list[torch.nn.Parameter]:
    """The sharded trainable parameters (an unsharded root would list its gathered copies)."""
    from steptitan.distributed import reshard

    reshard(model)
    return [p for p in model.parameters() if p.requires_grad]


def _global_sum(value: float) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def _transforms(env, seed: int, n_shapes: int):
    from steptitan.distributed import full_tensor, gather_rows, reshard
    from steptitan.metrics import memory_breakdown
    from steptitan.peft import StepContext, optimizer_state
    from steptitan.registry.peft.lora import lora_modules

    report = []
    for k, shape in enumerate(_shapes(seed, n_shapes)):
        s = seed + k
        x = torch.randint(0, shape.vocab_size, (2, 7), generator=torch.Generator().manual_seed(s))
        # LoRA: every init keeps the function; merge is exact.
        for init in ("kaiming", "uniform", "pissa"):
            model, lora = _build(env, shape, "lora", s, rank=3, alpha=6.0, init=init)
            before = _out(model, x)
            reshard(model)  # as the trainer does before every weight-touching hook
            lora.init_weights(model)
            _close(_out(model, x), before)
            _randomize(model, s)
            before = _out(model, x)
            reshard(model)
            lora.merge(model)
            _close(_out(model, x), before)
            assert all(full_tensor(m.lora_B).abs().sum() == 0 for _, m in lora_modules(model))
        # Gradients and optimizer state exist only for the trainable (adapter) parameters: count bytes.
        opt = torch.optim.AdamW(_trainable(model), lr=1e-3)
        train_steps(model, opt, x, 1)
        mem = memory_breakdown(model, opt)
        n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
        assert mem["grads"] == mem["params_trainable"] > 0
        assert mem["optimizer"] == 2 * mem["params_trainable"] + 4 * n_trainable, (mem, n_trainable)  # two fp32 moments + a 0-d step each
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == {f"{n}.weight" for n, _ in lora_modules(model)}  # base weights of adapted linears only

        # ReLoRA: merge + re-init keeps the function; random pruning zeroes exactly floor(p n) entries (+ zeros already there).
        model, relora = _build(env, shape, "relora", s, rank=3, reset_interval=2, optimizer_reset="random", prune_ratio=0.7)
        relora.init_weights(model)
        opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
        train_steps(model, opt, x, 1, relora)
        _randomize(model, s)
        params = [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]
        zeros_before = [_global_sum((optimizer_state(opt, p)["exp_avg"].to_local() == 0).sum()) for p in params]
        before = _out(model, x)
        reshard(model)
        relora.after_optimizer_step(StepContext(2, model, opt, 0))
        _close(_out(model, x), before)
        for p, z in zip(params, zeros_before):
            pruned = _global_sum((optimizer_state(opt, p)["exp_avg"].to_local() == 0).sum())
            assert int(0.7 * p.numel()) <= pruned <= int(0.7 * p.numel()) + z
        assert all(full_tensor(m.lora_A).abs().sum() > 0 for _, m in lora_modules(model))

        # SwitchLoRA: row and column switches keep the function; state of switched vectors reset; counterpart frozen.
        model, sw = _build(env, shape, "switchlora", s, rank=4, interval0=1e12, freeze_steps=2)
        before = _out(model, x)
        reshard(model)
        sw.init_weights(model)
        _close(_out(model, x), before)

        first_name, first = lora_modules(model)[0]
        drawn = {"A": full_tensor(first.lora_A).clone(), "B": full_tensor(first.lora_B).clone(),
                 "pool_A": gather_rows(sw.pools[first_name]["A"], first.lora_A, first.in_features).clone()}
        cls, kwargs = sw.optimizer_class(model)  # after init_weights: the model is resharded
        opt = cls(_trainable(model), lr=1e-2, **kwargs)
        train_steps(model, opt, x, 2, sw)
        reshard(model)
        name, mod = lora_modules(model)[-1]
        rows, cols = torch.tensor([0, 3]), torch.tensor([1])
        pool = sw.pool_size(mod)
        before = _out(model, x)
        sw.switch_rows(name, mod, rows, torch.tensor([0, pool - 1]), opt, step=2)
        _close(_out(model, x), before)
        sw.switch_cols(name, mod, cols, torch.tensor([pool - 1]), opt, step=2)
        _close(_out(model, x), before)
        state_a, state_b = optimizer_state(opt, mod.lora_A), optimizer_state(opt, mod.lora_B)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert full_tensor(state_a[key])[rows].abs().sum() == 0 and full_tensor(state_b[key])[:, cols].abs().sum() == 0
        assert full_tensor(state_a["step"])[1].item() == 2 and full_tensor(state_b["step"])[0, 0].item() == 2
        frozen_b, frozen_a = full_tensor(mod.lora_B)[:, rows].clone(), full_tensor(mod.lora_A)[cols].clone()
        train_steps(model, opt, x, 2, sw, first_step=3)  # steps 3, 4: the counterparts are frozen
        assert torch.equal(full_tensor(mod.lora_B)[:, rows], frozen_b) and torch.equal(full_tensor(mod.lora_A)[cols], frozen_a)
        assert full_tensor(state_a["step"])[rows].tolist() == [[2.0], [2.0]]  # switched rows trained 2 steps from 0
        assert full_tensor(state_b["step"])[0, rows].tolist() == [2.0, 2.0]  # counterparts: no step during the freeze
        pool_bytes = _global_sum(sw.extra_state_bytes())
        predicted = sum(sw.predicted_extra_state_bytes(model, env.world_size, r) for r in range(env.world_size))
        assert pool_bytes == predicted > 0

        # Refactorization keeps the function; momentum reset zeroes every moment.
        model, lora = _build(env, shape, "lora", s, rank=2)
        lora.init_weights(model)
        _randomize(model, s)
        from steptitan.registry import PEFT

        refactor = PEFT.get("refactor")(PEFT.get("refactor").Options(interval=1), list(range(shape.n_layers)))
        before = _out(model, x)
        reshard(model)
        refactor.after_optimizer_step(StepContext(1, model, None, 0))
        _close(_out(model, x), before)
        opt = torch.optim.AdamW(_trainable(model), lr=1e-3)
        train_steps(model, opt, x, 1)
        reset = PEFT.get("momentum_reset")(PEFT.get("momentum_reset").Options(interval=1, scope="optimizer"), [])
        reset.after_optimizer_step(StepContext(1, model, opt, 0))
        assert all(_global_sum(st[k].to_local().abs().sum()) == 0 for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
        report.append({"shape": shape, "seed": s, "switchlora": drawn,
                       "a_first": full_tensor(lora_modules(model)[0][1].lora_A).clone()})
    return report


def test_transforms_keep_outputs_under_fsdp2_on_two_ranks():
    results = run_distributed(_transforms, 2, seed=11, n_shapes=2)
    # Both ranks hold the same full tensors (the same seeded choices everywhere) ...
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a["a_first"], b["a_first"])
    # ... and the adapters and pools drawn on 2 ranks equal those drawn by one process: world-size independent.
    from steptitan.model import build_model, init_model_weights
    from steptitan.registry import PEFT
    from steptitan.registry.peft.lora import lora_modules

    for res in results[0]:
        shape, s = res["shape"], res["seed"]
        model = build_model(shape, device="cpu")
        init_model_weights(model)
        cls = PEFT.get("switchlora")
        sw = cls(cls.Options(rank=4, interval0=1e12, freeze_steps=2), list(range(shape.n_layers)), seed=s)
        sw.apply(model)
        sw.init_weights(model)
        name, first = lora_modules(model)[0]
        assert torch.equal(first.lora_A, res["switchlora"]["A"]) and torch.equal(first.lora_B, res["switchlora"]["B"])
        assert torch.equal(sw.pools[name]["A"], res["switchlora"]["pool_A"])


# --------------------------------------------------------------------------- work done once, not on every rank


def _local_merge_and_one_svd(env, seed: int):
    """PiSSA init and a merge on one shape whose W rows split unevenly; returns, per rank, how many
    float64 SVDs ran here, the largest number of rows any merge matmul produced, the adapters drawn and
    whether the function was kept."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from steptitan.distributed import full_tensor, local_tensor, reshard
    from steptitan.model import ModelShape
    from steptitan.registry.peft.lora import lora_modules

    class CountSVD(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.linalg.svd:
                CountSVD.calls += 1
            return func(*args, **(kwargs or {}))

    class MatmulRows(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                MatmulRows.rows = max(MatmulRows.rows, out.shape[0])
            return out

    shape = ModelShape(dim=12, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=37, ffn_hidden=13, max_seq_len=16)
    model, lora = _build(env, shape, "lora", seed, rank=3, alpha=6.0, init="pissa")
    x = torch.randint(0, shape.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    before = _out(model, x)
    reshard(model)
    with CountSVD():
        lora.init_weights(model)
    kept_init = torch.allclose(_out(model, x), before, atol=ATOL, rtol=RTOL)
    drawn = {n: (full_tensor(m.lora_A).clone(), full_tensor(m.lora_B).clone()) for n, m in lora_modules(model)}
    _randomize(model, seed)
    before = _out(model, x)
    reshard(model)
    local_out_rows = max(local_tensor(m.weight).shape[0] for _, m in lora_modules(model))
    with MatmulRows():
        lora.merge(model)
    kept_merge = torch.allclose(_out(model, x), before, atol=ATOL, rtol=RTOL)
    return {"svds": CountSVD.calls, "linears": len(lora_modules(model)), "merge_rows": MatmulRows.rows,
            "local_out_rows": local_out_rows, "drawn": drawn, "kept": (kept_init, kept_merge)}


def test_lora_merge_builds_local_rows_and_pissa_runs_one_svd_per_linear():
    """Issue 15, defect 9: a merge built the full out x in delta on every rank and PiSSA ran the same
    float64 SVD of the whole W on every rank. Now each linear's SVD runs on exactly one of the 2 ranks
    (its factors are broadcast: both ranks hold what 1 rank draws), the merge's matmuls produce at most
    this rank's rows of W, and both keep the function."""
    two = run_distributed(_local_merge_and_one_svd, 2, seed=5)
    (one,) = run_distributed(_local_merge_and_one_svd, 1, seed=5)
    assert sum(r["svds"] for r in two) == two[0]["linears"] == one["svds"] > 0
    for r in two:
        assert r["kept"] == (True, True)
        assert r["merge_rows"] <= r["local_out_rows"] <= 7  # ceil(13 / 2): never the whole W (12 or 13 rows)
        for name, (a, b) in one["drawn"].items():
            torch.testing.assert_close(r["drawn"][name][0], a, rtol=0, atol=1e-6)
            torch.testing.assert_close(r["drawn"][name][1], b, rtol=0, atol=1e-6)
