"""``steptitan export`` / ``generate`` on checkpoints whose PEFT method keeps state beside the weights (issue 23).

Both commands build a fresh stage model, load the checkpoint's weights and each method's
``load_state_dict`` -- without ``init_weights``, which only training runs:

* SwitchLoRA (defect 1): its state holds candidate pools, which only ``init_weights`` allocates, so
  loading raised ``KeyError: 'layers.0.attention.wq'``; from a 2-rank run, "saved in 2 shards, this
  run has 1". The pools only matter for training on; the exported / sampled model is W + s B A.
* APEX (defect 2): the loaded unit selection reached the modules only when ``init_weights`` had run, so
  ``generate`` sampled the plain base weights (``export`` merged, and merge applies the selection).

Checkpoints are written in process with the trainer's ``Checkpointer`` (1 rank, and 2 real gloo ranks
with FSDP2 shards); the reference is the trained model's own forward / a greedy loop written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_distributed

transformers = pytest.importorskip("transformers")

SHAPE = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 300, "ffn_hidden": 64}
PROMPT = "the history of the"
NEW_TOKENS = 8


class _NoState:
    def state_dict(self):
        return {}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE of the kind the trainer makes (data.train_bpe), smaller than the model's vocabulary."""
    from steptitan.data import train_bpe

    out = tmp_path_factory.mktemp("tok")
    text = ["the history of the city is long and the river runs through the old town " * 4,
            "a model of language predicts the next token of a text from the tokens before it " * 4]
    train_bpe(text * 20, 280, out)
    return out


def recipe_dict(run: Path, tokenizer_dir: Path, peft: dict) -> dict:
    return {"model": dict(SHAPE), "training": {"seq_len": 32}, "output_dir": str(run),
            "data": {"tokenizer": str(tokenizer_dir)}, "stages": [{"steps": 3, "peft": peft}]}


SWITCHLORA = {"method": "switchlora", "layers": "all", "rank": 4, "alpha": 1.0}
APEX = {"method": "apex", "layers": "all", "score_steps": 1}


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Trained-looking adapters: anything but the identity an init leaves (this rank's shard of each)."""
    from steptitan.distributed import local_tensor

    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name or "apex_" in name:
            t = local_tensor(p)
            t.copy_(torch.randn(t.shape, generator=gen) * scale)


def greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """The reference: argmax continuation, the whole context re-run each token."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def prompt_ids(tokenizer_dir: Path) -> tuple[list[int], object]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return [tok.token_to_id("<|endoftext|>")] + tok.encode(PROMPT).ids, tok


def generate_cli(run: Path, capsys) -> str:
    from steptitan.cli import main

    capsys.readouterr()
    rc = main(["generate", str(run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out.rstrip("\n")


def expected_text(tok, tokens: list[int]) -> str:
    eos = tok.token_to_id("<|endoftext|>")
    return PROMPT + tok.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens)


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= 2e-5 * scale, f"max |got - ref| = {err:.3g} (scale {scale:.3g})"


def one_rank_checkpoint(run: Path, tokenizer_dir: Path, peft: dict, prepare) -> torch.nn.Module:
    """Stage 0 with ``peft`` on one process, ``prepare(model, method)`` after init, saved like the trainer."""
    from steptitan.checkpoint import Checkpointer
    from steptitan.model import init_model_weights
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict, to_dict

    recipe = recipe_from_dict(recipe_dict(run, tokenizer_dir, peft))
    plan = build_plan(recipe)[0]
    model = plan.build()
    model.to_empty(device="cpu")
    init_model_weights(model, seed=3)
    method = plan.peft[0]
    method.init_weights(model)
    prepare(model, method)
    Checkpointer(run / "checkpoints", 0, 1).save(0, 3, model, _NoState(), _NoState(), {"samples_seen": 0},
                                                {"0": method.state_dict()})
    (run / "recipe.json").write_text(json.dumps(to_dict(recipe)))
    return model.eval()


def test_switchlora_checkpoint_exports_and_generates(tmp_path, tokenizer_dir, capsys):
    from steptitan.cli import main

    run = tmp_path / "run"
    model = one_rank_checkpoint(run, tokenizer_dir, SWITCHLORA, lambda m, _: randomize_adapters(m, 1, 0.3))
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0  # was: KeyError 'layers.0.attention.wq'
    assert_close(hf_logits(tmp_path / "hf", tokens), ref)

    ids, tok = prompt_ids(tokenizer_dir)
    assert generate_cli(run, capsys) == expected_text(tok, greedy(model, ids, NEW_TOKENS))


def test_generate_applies_the_loaded_apex_selection(tmp_path, tokenizer_dir, capsys):
    def score_and_train(model, method):
        model.train()
        model(torch.randint(0, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(4)))  # votes
        method.finish_scoring(model)
        randomize_adapters(model, 2, 0.5)

    run = tmp_path / "run"
    model = one_rank_checkpoint(run, tokenizer_dir, APEX, score_and_train)
    ids, tok = prompt_ids(tokenizer_dir)
    trained = greedy(model, ids, NEW_TOKENS)
    for _, m in model.named_modules():  # the same weights without the selection: what generate sampled before
        if hasattr(m, "apex_rows"):
            m.apex_rows = None
    assert greedy(model, ids, NEW_TOKENS) != trained, "the test needs adapters that change the greedy tokens"
    assert generate_cli(run, capsys) == expected_text(tok, trained)


# --------------------------------------------------------------------------- a 2-rank SwitchLoRA checkpoint


def _two_rank_switchlora(env, run: str, tokenizer_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from steptitan.checkpoint import Checkpointer
    from steptitan.distributed import shard_model
    from steptitan.model import init_model_weights
    from steptitan.plan import build_plan
    from steptitan.recipe import recipe_from_dict

    recipe = recipe_from_dict(recipe_dict(Path(run), Path(tokenizer_dir), SWITCHLORA))
    plan = build_plan(recipe)[0]
    model = plan.build()
    shard_model(model, env.mesh)
    model.to_empty(device=env.device)
    init_model_weights(model, seed=3)
    method = plan.peft[0]
    method.init_weights(model)
    randomize_adapters(model, 1 + env.rank, 0.3)
    Checkpointer(Path(run) / "checkpoints", env.rank, 2).save(0, 3, model, _NoState(), _NoState(),
                                                              {"samples_seen": 0}, {"0": method.state_dict()})
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.dist
def test_two_rank_switchlora_checkpoint_exports_and_generates(tmp_path, tokenizer_dir, capsys):
    """Was: "SwitchLoRA candidate pools were saved in 2 shards, this run has 1"."""
    from steptitan.cli import main
    from steptitan.recipe import recipe_from_dict, to_dict

    run = tmp_path / "run"
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(0))
    ref = run_distributed(_two_rank_switchlora, 2, run=str(run), tokenizer_dir=str(tokenizer_dir), tokens=tokens)[0]
    (run / "recipe.json").write_text(json.dumps(to_dict(recipe_from_dict(recipe_dict(run, tokenizer_dir, SWITCHLORA)))))
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    assert_close(hf_logits(tmp_path / "hf", tokens), ref)

    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids, tok = prompt_ids(tokenizer_dir)
    assert generate_cli(run, capsys) == expected_text(tok, greedy(lambda x: hf(x).logits, ids, NEW_TOKENS))
