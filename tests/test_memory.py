"""The memory model (steptitan/memory.py) against measured bytes, the paper's formula and autograd.

* predicted per-rank model-state bytes == ``metrics.memory_breakdown`` of the live FSDP2
  shards, through the trainer's own build/optimizer/step code, on 3-stage STEP recipes at 1
  and 2 real gloo ranks (uneven shards, bf16 frozen storage, frozen embeddings, GaLore);
* the STEP paper's formula is the model's limit without embeddings (hypothesis, 60 examples);
* the activation estimate is within 10% of the bytes autograd saves (saved_tensors_hooks);
* FLOP counts: 3x forward when everything trains, less when frozen layers sit at the bottom.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import run_distributed
from steptitan.distributed import local_rows
from steptitan.flops import activation_bytes, flops_per_token
from steptitan.memory import PRECISIONS, Precision, param_specs, predict_stage, step_paper_bytes
from steptitan.planner import compositions, layer_inventory, plan_splits, split_memory
from steptitan.model import ModelShape, base_param_names, build_model, init_model_weights


def _shape(dim=96, n_layers=3, heads=4, vocab=1001, ffn=200, tie=False) -> ModelShape:
    return ModelShape(dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=heads, vocab_size=vocab,
                      ffn_hidden=ffn, tie_embeddings=tie, max_seq_len=32)


@given(rows=st.integers(0, 5000), world=st.integers(1, 9))
def test_local_rows_follow_fsdp2_chunking(rows, world):
    sizes = [local_rows(rows, world, r) for r in range(world)]
    chunks = [c.shape[0] for c in torch.empty(rows, 0).chunk(world)] if rows else []
    assert sizes == chunks + [0] * (world - len(chunks))
    assert sum(sizes) == rows and sizes[0] == max(sizes)


@given(L=st.integers(2, 12), K=st.integers(1, 4))
def test_compositions_enumerate_every_split(L, K):
    splits = list(compositions(L, K))
    assert len(splits) == (math.comb(L - 1, K - 1) if K <= L else 0)
    assert len(set(splits)) == len(splits) and all(sum(s) == L and min(s) >= 1 for s in splits)


@settings(deadline=None)
@given(dim_heads=st.sampled_from([(64, 2), (96, 4), (128, 4), (160, 5)]), ffn=st.integers(8, 64).map(lambda k: 8 * k),
       L=st.integers(2, 9), K=st.integers(1, 3), rank=st.integers(1, 16), data=st.data())
def test_paper_formula_is_the_model_without_embeddings(dim_heads, ffn, L, K, rank, data):
    """Under the paper's policy on one rank, each stage = STEP's 16 n_i P + 2 N P + 16 N E(P)
    + the embeddings/head + 4 B per trainable tensor (torch's step counters)."""
    if K > L:
        return
    dim, heads = dim_heads
    shape = _shape(dim=dim, heads=heads, ffn=ffn, n_layers=L, vocab=777)
    inv = layer_inventory(shape, {"method": "lora", "rank": rank})
    split = data.draw(st.sampled_from(list(compositions(L, K))))
    res = split_memory(inv, split, world_size=1, precision=PRECISIONS["paper"])
    P, E = shape.layer_params(), inv.adapter_params
    assert inv.layer_params == P
    assert E == rank * (4 * (dim + dim) + 2 * (dim + ffn) + (ffn + dim))  # LoRA on all seven linears
    paper = step_paper_bytes(split, P, E)
    emb = 16 * shape.embedding_params() + 4 * (3 if not shape.tie_embeddings else 2)
    n_old = 0
    for i, n in enumerate(split):
        steps = 4 * (9 * n + 14 * n_old)  # 9 tensors per new block, 2 LoRA factors x 7 linears per old one
        assert res.per_stage[i]["model_states"] == paper[i] + emb + steps
        n_old += n


def test_planner_ranks_splits_and_beats_vanilla():
    shape = _shape(dim=128, n_layers=12, vocab=512, ffn=344)
    inv = layer_inventory(shape, {"method": "lora", "rank": 8})
    best = plan_splits(inv, 3, top=100, precision=PRECISIONS["paper"])
    peaks = [r.peak_model_states for r in best]
    assert peaks == sorted(peaks) and len(best) == math.comb(11, 2)
    brute = min(max(s["model_states"] for s in split_memory(inv, sp, precision=PRECISIONS["paper"]).per_stage)
                for sp in compositions(12, 3))
    assert peaks[0] == brute
    vanilla = split_memory(inv, (12,), precision=PRECISIONS["paper"]).peak_model_states
    assert peaks[0] < 0.6 * vanilla  # the STEP saving, embeddings included


# --------------------------------------------------------------------------- activations and FLOPs


def _saved_bytes(shape: ModelShape, batch: int, seq: int, frozen_below: int) -> int:
    torch.manual_seed(0)
    model = build_model(shape, "cpu")
    with torch.no_grad():
        init_model_weights(model)
    for name, p in model.named_parameters():
        if name.startswith("tok_embeddings") or (name.startswith("layers.") and int(name.split(".")[1]) < frozen_below):
            p.requires_grad_(False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, shape.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.flatten())
    return sum(saved.values())


@pytest.mark.parametrize("dim,layers,ffn,vocab,batch,seq,frozen_below",
                         [(128, 2, 352, 2048, 4, 64, 0), (192, 3, 512, 1000, 2, 48, 0), (128, 4, 344, 700, 2, 32, 2)])
def test_activation_estimate_matches_saved_tensors(dim, layers, ffn, vocab, batch, seq, frozen_below):
    shape = _shape(dim=dim, n_layers=layers, ffn=ffn, vocab=vocab).replace(max_seq_len=seq)
    measured = _saved_bytes(shape, batch, seq, frozen_below)
    estimate = activation_bytes(shape, batch, seq, Precision(), False, frozen_below)
    assert estimate == pytest.approx(measured, rel=0.10)


def test_flops_count_backward_by_what_needs_gradients():
    shape = _shape(dim=64, n_layers=4, heads=2, vocab=300, ffn=128)
    seq = 16
    model = build_model(shape)
    specs = param_specs(model, set(), base_param_names(shape))
    full = flops_per_token(specs, shape, seq)
    matmuls = 2 * (shape.n_layers * (4 * 64 * 64 + 3 * 64 * 128) + 300 * 64)
    assert full.forward == matmuls + shape.n_layers * 4 * seq * 64
    assert full.backward_weights == matmuls and full.total == 3 * full.forward  # the 6N rule
    # Freeze embeddings and the two bottom blocks: they need neither weight nor activation gradients.
    for name, p in model.named_parameters():
        if name.startswith("tok_embeddings") or name.startswith(("layers.0.", "layers.1.")):
            p.requires_grad_(False)
    part = flops_per_token(param_specs(model, set(), base_param_names(shape)), shape, seq)
    block = 2 * (4 * 64 * 64 + 3 * 64 * 128)
    assert part.forward == full.forward
    assert part.backward_weights == full.backward_weights - 2 * block
    # the bottom blocks pass no gradient (block 2's wq/wk/wv inputs still do: its attention_norm weight trains)
    assert part.backward_activations == full.backward_activations - 2 * (block + 2 * 4 * seq * 64)
    # Freeze the top blocks instead: they still pass activation gradients to the trainable ones below.
    model2 = build_model(shape)
    for name, p in model2.named_parameters():
        if name.startswith(("layers.2.", "layers.3.")):
            p.requires_grad_(False)
    top = flops_per_token(param_specs(model2, set(), base_param_names(shape)), shape, seq)
    assert top.backward_activations == full.backward_activations
    assert top.backward_weights == full.backward_weights - 2 * block


# --------------------------------------------------------------------------- predicted == measured


class _RandomTokens:
    """Stands in for PreparedData: random token ids (memory does not depend on the text)."""

    def __init__(self, vocab: int):
        rng = np.random.default_rng(0)
        self._tokens = {s: rng.integers(0, vocab, size=20_000, dtype=np.int64).astype(np.uint16) for s in ("train", "val")}

    def tokens(self, split: str) -> np.ndarray:
        return self._tokens[split]


def _recipe_dict(out_dir: str, optimizer: str = "adamw", stages: int = 3) -> dict:
    growth = {"name": "interpolate", "n_new": 2, "position": "uniform", "init": "copy"}
    spec = [
        {"name": "s0", "steps": 2},
        {"name": "s1", "steps": 2, "growth": growth, "peft": {"method": "lora", "layers": "old", "rank": 3}, "freeze": ["old"]},
        {"name": "s2", "steps": 2, "growth": {**growth, "n_new": 1, "position": "upper"},
         "peft": {"method": "lora", "layers": "old", "rank": 5, "targets": ["wq", "w2"]},
         "freeze": ["old", "embeddings", "head"]},
    ][:stages]
    return {
        "name": "mem", "output_dir": out_dir,
        "model": {"dim": 96, "n_layers": 1, "n_heads": 4, "vocab_size": 1001, "ffn_hidden": 200},
        "training": {"batch_size": 2, "seq_len": 16, "frozen_dtype": "bfloat16", "optimizer": optimizer,
                     "galore": {"rank": 8, "update_proj_gap": 1}, "warmup_steps": 0},
        "checkpoint": {"enabled": False}, "stages": spec,
    }


def _measure_and_predict(env, recipe_dict):
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict
    from steptitan.trainer import Trainer

    recipe = recipe_from_dict(recipe_dict)
    plans = build_plan(recipe)
    trainer = Trainer(recipe, plans, _RandomTokens(recipe.model.vocab_size), env)
    model = prev = None
    out = []
    for plan in plans:
        model = trainer.build_stage_model(plan, grow_from=model, prev=prev)
        trainer.build_optimizer(plan, model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        for step in (1, 2):  # at step 2 the gradients and the optimizer state are both alive
            measured = trainer.train_step(plan, model, trainable, step)[2]
        predicted = predict_stage(plan, env.world_size, recipe.training).per_rank[env.rank]
        out.append((plan.name, measured, predicted))
        prev = plan
    trainer.metrics.close()
    return out


def _check(results):
    for per_rank in results:
        for name, measured, predicted in per_rank:
            for key in ("params_trainable", "params_frozen", "grads", "optimizer", "model_states"):
                assert measured[key] == predicted[key], (name, key, measured, predicted)
            assert measured.get("params_bfloat16", 0) == measured["params_frozen"]  # bf16 frozen storage


def _measure_many(env, recipe_dicts):
    return [r for d in recipe_dicts for r in _measure_and_predict(env, d)]


def _two_rank_runs(env, recipe_dicts, switch_dir: str):
    return _measure_many(env, recipe_dicts), _switch_probes(env, switch_dir)


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    """The 2-rank runs of test_predicted_bytes_equal_measured[2] and of the stage-switch test in one spawned
    pair (issue 23 item 10: a spawn costs seconds of imports); each builds its own Trainer from its own recipe."""
    tmp = tmp_path_factory.mktemp("memory2")
    results = run_distributed(_two_rank_runs, 2, recipe_dicts=[_recipe_dict(str(tmp / "w2"))], switch_dir=str(tmp / "switch"))
    return {"bytes": [r[0] for r in results], "switch": [r[1] for r in results]}


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2])
def test_predicted_bytes_equal_measured(tmp_path, world, request):
    """Exact agreement (the issue asks for 5%) at every stage and rank; dim 96 over 2 ranks and
    vocab 1001 make uneven shards, stage 2 freezes embeddings and head. On one rank the same
    process also checks a 2-stage GaLore run (galore-torch's projector state counted)."""
    if world == 2:
        _check(request.getfixturevalue("two_rank")["bytes"])
        return
    dicts = [_recipe_dict(str(tmp_path / f"w{world}"))]
    try:
        import galore_torch  # noqa: F401
        dicts.append(_recipe_dict(str(tmp_path / "galore"), "galore", stages=2))
    except ImportError:
        pass
    _check(run_distributed(_measure_many, world, recipe_dicts=dicts))


# --------------------------------------------------------------------------- memory the estimate missed (issue 23, item 6)


def _apex_saved_bytes(shape: ModelShape, layers: list[int], ratio: float, batch: int, seq: int):
    """Bytes autograd saves in one forward of an APEX model that is expanding (units selected), and the method."""
    from steptitan.registry import PEFT

    model = build_model(shape)
    method = None
    if layers:
        cls = PEFT.get("apex")
        method = cls(cls.Options(ffn_ratio=ratio, head_ratio=0.25, freeze_rest=False), layers=layers)
        method.apply(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        init_model_weights(model, shape, seed=0)
        for _, module in method.modules(model) if method else ():
            module.reset_adapters(torch.Generator().manual_seed(0))
            module.select(torch.arange(module.k), torch.arange(module.k, 2 * module.k))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, shape.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.flatten())
    return sum(saved.values()), method, model


@pytest.mark.parametrize("ratio", [0.125, 0.25])
def test_apex_expanding_forward_bytes_are_predicted(ratio):
    """APEX's forward materialises the full effective weight of every adapted linear and F.linear keeps it
    for backward (out x in per linear, ~the block's weights again). Measured with saved_tensors_hooks as the
    difference to the same model without APEX; the prediction (``predicted_saved_bytes``) is exact, and it
    reaches the stage estimate (``predict_stage``'s activations)."""
    shape = _shape(dim=128, n_layers=3, heads=4, vocab=500, ffn=256).replace(max_seq_len=32)
    dense, _, _ = _apex_saved_bytes(shape, [], ratio, 2, 32)
    measured, method, model = _apex_saved_bytes(shape, [1, 2], ratio, 2, 32)
    weights = 2 * (2 * 128 * 128 + 3 * 128 * 256) * 4  # the full weights of two blocks' five adapted linears
    assert measured - dense > weights
    assert method.predicted_saved_bytes(model, 2, 32, 4, False) == measured - dense
    one_block = method.predicted_saved_bytes(model, 2, 32, 4, True)  # checkpointing: one block's recompute
    assert 2 * one_block == measured - dense


def test_host_pools_are_not_device_memory():
    """SwitchLoRA's ``pool_device = "cpu"`` on a GPU keeps its pools in host memory: the device prediction
    (what ``check_memory_fits`` compares with the GPU's memory) leaves them out and reports them as host
    bytes; on the device (the default) or on a CPU run they are device memory."""
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict

    def stage1(pool_device: str, backend: str):
        recipe = recipe_from_dict({
            "name": "pools", "output_dir": "/tmp/unused",
            "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 300, "ffn_hidden": 128},
            "training": {"batch_size": 1, "seq_len": 16, "backend": backend},
            "stages": [{"name": "s0", "steps": 1},
                       {"name": "s1", "steps": 1, "growth": {"name": "interpolate", "n_new": 1}, "freeze": ["old"],
                        "peft": {"method": "switchlora", "layers": "old", "rank": 4, "pool_device": pool_device}}]})
        return predict_stage(build_plan(recipe)[1], 1, recipe.training)

    pools = 2 * sum(min(i, o) * (i + o) * 4 for i, o in [(64, 64)] * 4 + [(64, 128), (128, 64), (64, 128)])
    gpu_host, gpu_device, cpu = stage1("cpu", "nccl"), stage1("auto", "nccl"), stage1("cpu", "gloo")
    assert gpu_host.per_rank[0]["adapter_pools"] == 0 and gpu_host.host_bytes == [pools]
    assert gpu_device.per_rank[0]["adapter_pools"] == pools and gpu_device.host_bytes == [0]
    assert cpu.per_rank[0]["adapter_pools"] == pools and cpu.host_bytes == [0]
    assert gpu_device.peak_model_states - gpu_host.peak_model_states == pools


def _switch_probes(env, out_dir: str):
    return [_switch_probe(env, f"{out_dir}/{state}", state) for state in ("fresh", "copy")]


def _switch_probe(env, out_dir: str, state: str):
    """Two stages on the real Trainer (grad_accum 2): model-state bytes of both stages live at the stage
    switch (measured right after the optimizer state was carried, the moment both exist), and whether a
    micro-batch's logits are still alive when the next micro-batch's forward starts."""
    import weakref

    from steptitan.memory import predict_recipe
    from steptitan.metrics import memory_breakdown
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict
    from steptitan.trainer import Trainer

    recipe = recipe_from_dict({
        "name": "switch", "output_dir": out_dir,
        "model": {"dim": 96, "n_layers": 1, "n_heads": 4, "vocab_size": 1001, "ffn_hidden": 200},
        "training": {"batch_size": 2, "seq_len": 16, "grad_accum": 2, "warmup_steps": 0, "eval_batches": 1},
        "checkpoint": {"enabled": False},
        "stages": [{"name": "s0", "steps": 2},
                   {"name": "s1", "steps": 1, "growth": {"name": "interpolate", "n_new": 1, "optimizer_state": state}}]})
    plans = build_plan(recipe)
    measured: list[int] = []
    logits_alive: list[bool] = []
    growth = plans[1].growth
    carry = growth.carry_optimizer_state

    def measuring_carry(src, src_opt, dst, dst_opt, shape):
        out = carry(src, src_opt, dst, dst_opt, shape)
        measured.append(memory_breakdown(src, src_opt)["model_states"] + memory_breakdown(dst, dst_opt)["model_states"])
        return out

    growth.carry_optimizer_state = measuring_carry

    class Probe(Trainer):
        def build_stage_model(self, plan, **kwargs):
            model = super().build_stage_model(plan, **kwargs)
            last: list = []
            model.output.register_forward_hook(lambda m, a, out: last.append(weakref.ref(out)))
            model.tok_embeddings.register_forward_pre_hook(
                lambda m, a: logits_alive.append(bool(last) and last[-1]() is not None))
            return model

    Probe(recipe, plans, _RandomTokens(1001), env).run()
    predicted = predict_recipe(recipe, plans, env.world_size)[1].switch[env.rank]
    return measured, predicted, logits_alive


@pytest.mark.dist
def test_stage_switch_frees_old_gradients_and_state_first_and_logits_die(two_rank):
    """At a stage switch the old gradients are gone before the new model is built, the old Adam moments too
    unless growth copies them (``optimizer_state = "copy"``: both optimizers' moments are then alive), and
    the predicted switch bytes (``memory.switch_bytes``) equal the measured live model states on each of 2
    gloo ranks. A micro-batch's logits are dead when the next forward starts (grad_accum 2)."""
    for per_state in two_rank["switch"]:
        for state, (measured, predicted, logits_alive) in zip(("fresh", "copy"), per_state):
            assert measured == [predicted], (state, measured, predicted)
            assert logits_alive and not any(logits_alive), logits_alive
