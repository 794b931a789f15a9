"""APOLLO and 8-bit AdamW (registry/optim/apollo.py, adamw8bit.py) against their libraries, and resumed.

* the plugin's optimizer on a 2-rank FSDP2 model takes the same steps as the library used
  directly (``apollo_torch.APOLLOAdamW``, ``torchao.optim.AdamW8bit``) on the unsharded model;
  the expected weights come from the library, never from the plugin;
* APOLLO's projector, dropped from ``state_dict()``, is rebuilt after a load so the next steps
  equal the uninterrupted optimizer's (in one process, fast), and a 2-rank trainer run resumed
  from a mid-stage checkpoint after a projection redraw reproduces the losses bit for bit;
* torchao's 8-bit moments stay 8-bit (codes + scales) through the plugin.

Byte counts (predicted == measured, 1 and 2 ranks) and the growth policy are in tests/test_optim.py.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import dense, run_distributed
from steptitan.optim import OptimizerHParams
from steptitan.registry import OPTIM

needs_apollo = pytest.mark.skipif(importlib.util.find_spec("apollo_torch") is None,
                                  reason="apollo-torch not installed (pip install 'steptitan[apollo]')")
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao not installed (pip install 'steptitan[adamw8bit]')")

HP = OptimizerHParams(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
PROJECTED = ("attention", "feed_forward")  # APOLLO's repository projects the attention and MLP linears


def _model(seed: int = 0):
    from steptitan.model import ModelShape

    # dim 128 / ffn 256 / vocab 64: every 2-D shard has >= 4096 elements in whole 256-blocks at 1 and 2
    # ranks, so torchao quantises the same blocks sharded and unsharded; w2 (128 x 256) is
    # projected from the left by APOLLO, the others from the right.
    shape = ModelShape(dim=128, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=64, ffn_hidden=256, max_seq_len=8)
    return dense(shape, seed)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def _apollo_reference(model, options: dict):
    """APOLLOAdamW as the APOLLO repository builds it: block linears of the targets projected."""
    from apollo_torch import APOLLOAdamW

    named = list(model.named_parameters())
    proj = [p for n, p in named if p.dim() == 2 and n.startswith("layers.") and any(f".{t}." in n for t in PROJECTED)]
    rest = [p for n, p in named if all(p is not q for q in proj)]
    group = {"params": proj, "rank": options["rank"], "proj": "random", "scale_type": options.get("scale_type", "channel"),
             "scale": options.get("scale", 1.0), "update_proj_gap": options["update_proj_gap"], "proj_type": "std"}
    return APOLLOAdamW([{"params": rest}, group], lr=HP.lr, betas=HP.betas, eps=HP.eps, weight_decay=HP.weight_decay)


def _adamw8bit_reference(model, options: dict):
    from torchao.optim import AdamW8bit

    return AdamW8bit(list(model.parameters()), lr=HP.lr, betas=HP.betas, eps=HP.eps, weight_decay=HP.weight_decay,
                     block_size=options.get("block_size", 256))


def _reference_step(name: str, opt) -> None:
    if name == "adamw8bit":  # torchao compiles its step (minutes on CPU); the same function, run eagerly
        with torch.compiler.set_stance("force_eager"):
            opt.step()
    else:
        opt.step()


def _steps_against_library(env, name: str, options: dict, steps: int):
    from steptitan.distributed import shard_model

    plugin = OPTIM.get(name)(OPTIM.get(name).Options(**options))
    ref = _model()
    ref_opt = {"apollo": _apollo_reference, "adamw8bit": _adamw8bit_reference}[name](ref, options)
    adamw_model = copy.deepcopy(ref)
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=HP.lr, betas=HP.betas, eps=HP.eps, weight_decay=HP.weight_decay)
    model = shard_model(copy.deepcopy(ref), env.mesh) if env.world_size > 1 else copy.deepcopy(ref)
    opt = plugin.build(list(model.named_parameters()), HP)
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        tokens = torch.randint(0, 64, (2, 9), generator=gen)  # the same batch on every rank: FSDP2's mean = it
        for m, o, step in ((model, opt, lambda o: o.step()), (ref, ref_opt, lambda o: _reference_step(name, o)),
                           (adamw_model, adamw, lambda o: o.step())):
            o.zero_grad()
            _loss(m, tokens).backward()
            step(o)
    from steptitan.distributed import full_tensor, local_tensor

    got = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}
    want = {n: p.detach().clone() for n, p in ref.named_parameters()}
    plain_adamw = {n: p.detach().clone() for n, p in adamw_model.named_parameters()}
    kinds = sorted({type(local_tensor(v)).__name__ for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor)})
    return got, want, plain_adamw, kinds


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.dist
@needs_apollo
@pytest.mark.parametrize("scale_type", ["channel", pytest.param("tensor", marks=pytest.mark.slow)])
def test_apollo_on_fsdp2_takes_the_library_steps(scale_type):
    """6 steps with a redraw every 2 (rank 4): the 2-rank sharded APOLLO equals APOLLOAdamW on the
    unsharded model to float rounding (gloo's reduction order), and is not AdamW."""
    options = {"rank": 4, "update_proj_gap": 2, "scale_type": scale_type}
    got, want, adamw, _ = run_distributed(_steps_against_library, 2, name="apollo", options=options, steps=6)[0]
    assert _max_diff(got, want) < 1e-5
    assert _max_diff(got, adamw) > 1e-3  # the comparison can tell another optimizer apart


@pytest.mark.dist
@needs_torchao
def test_adamw8bit_on_fsdp2_takes_the_library_steps():
    """4 steps: the 2-rank sharded plugin equals torchao's AdamW8bit on the unsharded model (the same
    256-element blocks are quantised: every shard is whole blocks), its moments are torchao's 8-bit
    state, and the result is not fp32 AdamW's."""
    got, want, adamw, kinds = run_distributed(_steps_against_library, 2, name="adamw8bit", options={}, steps=4)[0]
    assert "OptimState8bit" in kinds
    assert _max_diff(got, want) < 1e-5
    assert _max_diff(got, adamw) > 1e-4


@needs_apollo
def test_apollo_projector_rebuilt_after_load_continues_exactly():
    """state_dict() has no projector (DCP cannot save a Python object); loading it into a new optimizer
    and stepping on gives the same weights as the uninterrupted one, across a redraw (gap 3: the saved
    state is at step 4, drawn from the second seed; step 6 draws the third)."""
    options = {"rank": 4, "update_proj_gap": 3}
    plugin = OPTIM.get("apollo")(OPTIM.get("apollo").Options(**options))
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 64, (2, 9), generator=gen) for _ in range(8)]
    full, resumed = _model(), _model()
    opt_full = plugin.build(list(full.named_parameters()), HP)

    def train(model, opt, batch_list):
        for tokens in batch_list:
            opt.zero_grad()
            _loss(model, tokens).backward()
            opt.step()

    train(full, opt_full, batches[:4])
    saved = copy.deepcopy(opt_full.state_dict())
    assert all("projector" not in st for st in saved["state"].values())
    assert any("proj_seed" in st for st in saved["state"].values())
    resumed.load_state_dict(full.state_dict())
    opt_resumed = plugin.build(list(resumed.named_parameters()), HP)
    opt_resumed.load_state_dict(saved)
    train(full, opt_full, batches[4:])
    train(resumed, opt_resumed, batches[4:])
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


# --------------------------------------------------------------------------- 2-rank resume through the trainer


@pytest.mark.dist
@needs_apollo
@needs_torchao
def test_two_rank_resume_of_apollo_and_adamw8bit_is_bit_exact(tmp_path):
    """Stage 1 trains new blocks and adapters with APOLLO (redraw every 3 steps) and embeddings + head
    with 8-bit AdamW (block 32: both ranks' 501- and 500-row shards are quantised). A run resumed from
    its step-4 checkpoint (after the step-3 redraw) gives the uninterrupted run's losses bit for bit."""
    from test_optim import _recipe_dict, assert_two_rank_resume_is_bit_exact

    optim = {"default": {"name": "apollo", "rank": 4, "update_proj_gap": 3},
             "embeddings": {"name": "adamw8bit", "block_size": 32}, "head": {"name": "adamw8bit", "block_size": 32}}
    d = _recipe_dict(str(tmp_path / "run"), optim, checkpoint=True)
    d["stages"][1]["steps"] = 6
    assert_two_rank_resume_is_bit_exact(d, kept="stage01-step000004", dropped="stage01-step000006", n_losses=6)
