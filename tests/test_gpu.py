"""The GPU path on a real GPU (docs/gpu.md). Every test here is skipped, with the reason, without CUDA;
what a CPU can check of the same code is in tests/test_gpu_path.py.

    pytest tests/test_gpu.py -rs          # on a GPU machine; -rs lists skips and why
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import run_torchrun

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
two_gpus = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

SHAPE = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 97, "ffn_hidden": 160}


def _env():
    """A world of one on this process's GPU (steptitan.distributed, nccl)."""
    from steptitan.distributed import init_distributed

    return init_distributed("nccl")


@pytest.mark.parametrize("name,options", [("bert2bert", dict(dim=128, ffn_hidden=256, n_heads=8, method="aki")),
                                          ("lemon", dict(dim=96, ffn_hidden=200, n_heads=6))])
def test_width_growth_on_cuda_keeps_the_function(name, options):
    """Defect 1 on the device: every tensor on CUDA, the mappings built on the CPU."""
    from steptitan.model import ModelShape, build_model, init_model_weights
    from steptitan.registry import GROWTH

    shape = ModelShape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden=160, max_seq_len=16)
    op = GROWTH.get(name)(GROWTH.get(name).Options(**options))
    small, big = build_model(shape, device="cuda"), build_model(op.target_shape(shape), device="cuda")
    init_model_weights(small, seed=0)
    init_model_weights(big, seed=1)
    op.grow(small, big, shape)
    tokens = torch.randint(0, 97, (2, 16), device="cuda")
    with torch.no_grad():
        before, after = small(tokens), big(tokens)
    if op.is_exact(shape):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-4 * max(1.0, before.abs().max().item()))
    assert after.device.type == "cuda" and torch.isfinite(after).all()


def _recipe(out_dir, **training) -> dict:
    return {"name": "gpu", "output_dir": str(out_dir), "model": SHAPE,
            "training": {"batch_size": 2, "seq_len": 32, "warmup_steps": 0, "backend": "nccl", **training},
            "checkpoint": {"enabled": False},
            "stages": [{"name": "s0", "steps": 3},
                       {"name": "s1", "steps": 3, "growth": {"name": "interpolate"}, "freeze": ["old"],
                        "peft": {"method": "lora", "layers": "old", "rank": 4}}]}


def test_one_host_sync_per_step_and_bf16_by_default(tmp_path):
    """Defects 2 and 4: dtype "auto" computes in bf16 on CUDA; in CUDA's sync debug mode a steady-state
    step (grad_accum 2) warns about exactly one synchronizing call (the loss / grad-norm read)."""
    from test_memory import _RandomTokens

    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict
    from steptitan.trainer import Trainer

    env = _env()
    recipe = recipe_from_dict(_recipe(tmp_path, grad_accum=2))
    plans = build_plan(recipe)
    trainer = Trainer(recipe, plans, _RandomTokens(97), env)
    model = trainer.build_stage_model(plans[0])
    trainer.build_optimizer(plans[0], model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in (1, 2):  # optimizer state exists from here on
        trainer.train_step(plans[0], model, trainable, step, measure_memory=False)
    logits = model(torch.zeros(1, 8, dtype=torch.long, device=env.device))
    assert logits.dtype == torch.bfloat16
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_step(plans[0], model, trainable, 3, measure_memory=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, syncs


def test_predicted_memory_is_not_below_the_measured_peak(tmp_path):
    """Defect 8: model states + activations + buffers (padding, gathered units, logits, fragmentation
    margin) cover torch.cuda.max_memory_allocated of a run, and max_memory_reserved is logged."""
    out = tmp_path / "run"
    done = run_torchrun(["recipes/step.toml", f"output_dir={out}", "training.backend=nccl", "training.seq_len=64",
                         "training.batch_size=4", "stages.0.steps=5", "stages.1.steps=5", "checkpoint.enabled=false"],
                        nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for stage in summary["stages"]:
        rank = stage["ranks"][0]
        predicted = (stage["predicted_model_state_bytes"][0] + stage["predicted_activation_bytes"]
                     + sum(stage["predicted_overhead_bytes"][0].values()))
        assert rank["cuda_peak"] > 0 and rank["cuda_reserved"] >= rank["cuda_peak"]
        assert predicted >= rank["cuda_peak"], (stage["name"], predicted, rank["cuda_peak"])


def test_compiled_blocks_on_cuda_match_eager(tmp_path):
    """training.compile on the GPU (inductor's Triton kernels), bf16: before and after growth."""
    from test_compile import _check, _stages

    _check(_stages(_env(), str(tmp_path), "inductor"), atol=3e-2)


@two_gpus
def test_step_recipe_on_two_gpus_with_nccl_then_resume(tmp_path):
    """Two ranks, NCCL, compiled blocks and gradient accumulation: a STEP run finishes, then a resume from
    its stage-0 checkpoint reproduces the stage-1 validation loss."""
    out = tmp_path / "run"
    args = ["recipes/step.toml", f"output_dir={out}", "training.backend=nccl", "training.compile=true",
            "training.grad_accum=2", "training.seq_len=64", "stages.0.steps=6", "stages.1.steps=6"]
    first = run_torchrun(args, nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"][1]["val_loss"] < summary["stages"][0]["first_loss"]
