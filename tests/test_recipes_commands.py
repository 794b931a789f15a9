"""Every shipped recipe through every command a user chains after training (issue 23).

For each runnable recipe under recipes/ (``recipes/*.toml`` and ``recipes/*/*.toml`` with a
``[[stages]]`` table: a recipe added later is picked up without editing this file), at tiny shapes
and a couple of steps per stage, on the embedded corpus:

    steptitan train -> steptitan export (every stage's last checkpoint)
      -> transformers' LlamaForCausalLM loads each folder: its logits equal steptitan's forward of the
         checkpoint's merged model (export.load_merged_model)
      -> steptitan generate (greedy) prints what a greedy loop over the HF model writes
      -> the folder as model.init_from of a new recipe: the stage-0 model built from it gives HF's logits.

One rank, in this process (the fast run: the newest checkpoint is exported); two ranks through
torchrun for the recipes whose launch line runs them on 2 or more, exporting every stage (slow).
A recipe that turns checkpoints off (GaLore, Fira: their optimizer state holds Python objects DCP
cannot save, so the trainer refuses checkpoints with them) leaves nothing to export: there the test
asks that ``export`` and ``generate`` say so (exit 2, one line). Every console command (cli.USAGE)
and tools/ script answers ``--help``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_torchrun

transformers = pytest.importorskip("transformers")

TINY_DIM, TINY_HEADS, VOCAB, SEQ = 64, 4, 384, 32
STEPS = 1  # per stage; an APEX stage takes 2 (votes in step 1, the expanded adapters train in step 2)
PROMPT, NEW_TOKENS = "The", 4


def keeps_checkpoints(path: Path) -> bool:
    return tomllib.loads(path.read_text()).get("checkpoint", {}).get("enabled", True)


def runnable(path: Path) -> bool:
    try:
        return bool(tomllib.loads(path.read_text()).get("stages"))
    except (OSError, tomllib.TOMLDecodeError):
        return False


RECIPES = sorted((p for p in [*REPO.glob("recipes/*.toml"), *REPO.glob("recipes/*/*.toml")] if runnable(p)),
                 key=lambda p: (len(p.relative_to(REPO / "recipes").parts), p.name))  # top-level recipes first


def _optimizer_names(entry) -> list[str]:
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, dict):
        return [entry["name"]] if isinstance(entry.get("name"), str) else [n for v in entry.values() for n in _optimizer_names(v)]
    return []


def structure(path: Path) -> str:
    """What the commands can see of a recipe: per stage its growth operator and PEFT methods, the
    optimizers, the frozen weights' dtype and whether it checkpoints. Sizes, steps, ranks and
    learning rates are left out: the tiny overrides change or do not reach them."""
    raw = tomllib.loads(path.read_text())
    training = raw.get("training", {})
    stages = {json.dumps([(s.get("growth") or {}).get("name"),
                          sorted(p.get("method") for p in [s.get("peft"), *s.get("extra_peft", [])] if p)])
              for s in raw["stages"]}
    optims = {training.get("optimizer", "adamw"), *_optimizer_names(training.get("optim")),
              *(n for s in raw["stages"] for n in _optimizer_names(s.get("optim")))}
    return json.dumps([sorted(stages), sorted(optims), training.get("frozen_dtype"), keeps_checkpoints(path)])


def split_by_structure(recipes: list[Path]) -> tuple[list[Path], list[Path]]:
    """(the first recipe of each structure, the others): the fast run takes one recipe per structure,
    so a new recipe with something new in it is in the fast run without editing this file."""
    seen: set[str] = set()
    first, repeats = [], []
    for p in recipes:
        (repeats if structure(p) in seen else first).append(p)
        seen.add(structure(p))
    return first, repeats


def recipe_id(p: Path) -> str:
    return str(p.relative_to(REPO / "recipes"))


def launched_ranks(path: Path) -> int:
    """The --nproc_per_node of the recipe's own launch line (its header comment), 1 if none."""
    found = re.findall(r"--nproc_per_node[= ](\d+)", path.read_text())
    return int(found[0]) if found else 1


def tiny_overrides(path: Path, out: Path, cache: Path) -> list[str]:
    """key=value overrides that keep the recipe's structure (stages, growth, PEFT, optimizers, precision)
    and shrink what costs time: shapes wider than TINY_DIM, steps, batch, sequence, corpus, compile."""
    raw = tomllib.loads(path.read_text())
    model, stages = raw.get("model", {}), raw["stages"]
    o = [f"output_dir={out}", f"data.cache_dir={cache}", "data.hub=null", "data.files=[]", "data.val_files=[]",
         "data.tokenizer=null", "data.max_chars=20000", f"model.vocab_size={VOCAB}", "training.batch_size=2",
         f"training.seq_len={SEQ}", "training.grad_accum=1", "training.eval_batches=1", "training.warmup_steps=1",
         "training.steps_per_log=1", "training.compile=false", "checkpoint.interval=0", "checkpoint.keep_last=0",
         "metrics.sample_prompts=[]"]
    if model.get("dim", 0) > 128:  # a GPU-sized recipe: its structure at a CPU size
        o += [f"model.dim={TINY_DIM}", f"model.n_heads={TINY_HEADS}", "model.n_kv_heads=null", "model.ffn_hidden=null"]
    for i, stage in enumerate(stages):
        steps = STEPS
        if "warmup_steps" in stage:
            o.append(f"stages.{i}.warmup_steps=1")
        for key, peft in [("peft", stage.get("peft"))] + [(f"extra_peft.{j}", p) for j, p in enumerate(stage.get("extra_peft", []))]:
            if isinstance(peft, dict) and peft.get("method") == "apex":
                o.append(f"stages.{i}.{key}.score_steps=1")  # select after step 1, train the adapters in step 2
                steps = 2
        o.append(f"stages.{i}.steps={steps}")
    return o


def train_in_process(args: list[str]) -> None:
    from steptitan.train import main as train_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = train_main(args)
    assert rc == 0, err.getvalue()[-4000:]


def last_checkpoint_per_stage(run: Path) -> list:
    from steptitan.checkpoint import list_checkpoints

    last: dict[int, object] = {}
    for info in list_checkpoints(run / "checkpoints"):
        last[info.stage] = info
    return [last[s] for s in sorted(last)]


def hf_model(folder: Path):
    return transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def assert_logits_equal(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= 2e-5 * scale, f"{what}: max |difference| = {err:.3g} (logit scale {scale:.3g})"


def check_chain(path: Path, run: Path, tmp: Path, cache: Path, capsys, every_stage: bool) -> None:
    """export (each stage's last checkpoint, or the newest) -> HF logits == merged steptitan forward;
    generate == HF greedy; the export as model.init_from. Without checkpoints: both commands refuse clearly."""
    from tokenizers import Tokenizer

    from steptitan.cli import main
    from steptitan.export import load_merged_model, recipe_for

    if not keeps_checkpoints(path):
        for argv in (["export", str(run), str(tmp / "hf")], ["generate", str(run), "--prompt", PROMPT]):
            capsys.readouterr()
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert "checkpoint.enabled = false" in err and len(err.strip().splitlines()) == 1, err
        return
    recipe_stages = len(tomllib.loads(path.read_text())["stages"])
    infos = last_checkpoint_per_stage(run)
    assert [i.stage for i in infos] == list(range(recipe_stages)), f"checkpoints of stages {[i.stage for i in infos]}"
    infos = infos if every_stage else infos[-1:]
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    for info in infos:
        out = tmp / f"hf{info.stage}"
        assert main(["export", str(info.path), str(out)]) == 0, capsys.readouterr().err
        plan, model = load_merged_model(recipe_for(info), info)
        with torch.no_grad():
            ref = model.eval()(tokens)
        hf = hf_model(out)
        with torch.no_grad():
            assert_logits_equal(hf(tokens).logits, ref, f"stage {info.stage} export")
    # generate (the run's newest checkpoint, greedy) writes what a greedy loop over the exported model writes
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    ids = [eos] + tok.encode(PROMPT).ids
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    new = ids[-NEW_TOKENS:]
    capsys.readouterr()
    rc = main(["generate", str(run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert printed.out.rstrip("\n") == PROMPT + tok.decode(new[:new.index(eos)] if eos in new else new)
    # the last export as model.init_from: shape and tokenizer from the folder, weights into stage 0
    check_import(out, tmp, cache, tokens, hf)


def check_import(folder: Path, tmp: Path, cache: Path, tokens: torch.Tensor, hf) -> None:
    from steptitan.hf import load_hf_weights
    from steptitan.model import init_model_weights
    from steptitan.plan import build_plan
    from steptitan.recipe import load_recipe

    recipe_file = tmp / "from_hf.toml"
    recipe_file.write_text(f'[model]\ninit_from = "{folder}"\n[[stages]]\nsteps = 1\n')
    recipe = load_recipe(str(recipe_file), [f"data.cache_dir={cache}", f"output_dir={tmp / 'from_hf'}"])
    assert Path(recipe.data.tokenizer).resolve() == folder.resolve()
    plan = build_plan(recipe)[0]
    model = plan.build()
    model.to_empty(device="cpu")
    init_model_weights(model, plan.shape, seed=7)
    load_hf_weights(model, folder, plan.shape)
    with torch.no_grad():
        assert_logits_equal(model.eval()(tokens), hf(tokens).logits, "model.init_from import")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One tokenizer and token cache for every recipe (they share the corpus, vocabulary and cut)."""
    return tmp_path_factory.mktemp("recipes-cache")


FAST, REPEATS = split_by_structure(RECIPES)
ONE_RANK = [pytest.param(p, id=recipe_id(p)) for p in FAST] + [
    pytest.param(p, id=recipe_id(p), marks=pytest.mark.slow) for p in REPEATS]


def test_every_structure_is_in_the_fast_run():
    assert {structure(p) for p in FAST} == {structure(p) for p in RECIPES} and len(FAST) + len(REPEATS) == len(RECIPES)


@pytest.mark.parametrize("path", ONE_RANK)
def test_recipe_through_every_command_on_one_rank(path, tmp_path, shared_cache, capsys):
    run = tmp_path / "run"
    train_in_process([str(path), *tiny_overrides(path, run, shared_cache)])
    check_chain(path, run, tmp_path, shared_cache, capsys, every_stage=False)


TWO_RANK = [p for p in RECIPES if launched_ranks(p) >= 2]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("path", TWO_RANK, ids=[recipe_id(p) for p in TWO_RANK])
def test_recipe_through_every_command_on_two_ranks(path, tmp_path, shared_cache, capsys):
    run = tmp_path / "run"
    proc = run_torchrun([str(path), *tiny_overrides(path, run, shared_cache)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    check_chain(path, run, tmp_path, shared_cache, capsys, every_stage=True)


# --------------------------------------------------------------------------- --help everywhere


def console_commands() -> list[str]:
    """The commands ``steptitan --help`` lists (cli.USAGE), so a new command is covered once listed."""
    from steptitan.cli import USAGE

    block = USAGE.split("commands:", 1)[1]
    return [line.split()[0] for line in block.splitlines() if line.startswith("  ") and line.split()]


def test_console_help_lists_the_commands():
    assert {"train", "export", "generate", "plan", "sweep", "bench", "paired", "list-plugins"} <= set(console_commands())


def _help_output(call) -> tuple[int, str]:
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        try:
            rc = call()
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return rc, buf.getvalue() + err.getvalue()


@pytest.mark.parametrize("command", ["--help", *console_commands()])
def test_console_command_help(command):
    from steptitan.cli import main

    argv = ["--help"] if command == "--help" else [command, "--help"]
    rc, text = _help_output(lambda: main(argv))
    assert rc == 0, text
    assert "usage" in text.lower() or command == "list-plugins", text


TOOLS = sorted(p for p in (REPO / "tools").glob("*.py"))


@pytest.mark.parametrize("tool", TOOLS, ids=[p.name for p in TOOLS])
def test_tool_help(tool, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(tool), "--help"])
    rc, text = _help_output(lambda: runpy.run_path(str(tool), run_name="__main__"))
    assert rc == 0 and "usage" in text.lower(), text
