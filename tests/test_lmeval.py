"""steptitan eval: lm-evaluation-harness on an exported checkpoint, offline, checked against steptitan's forward."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import importlib.util

import pytest
import torch

from conftest import REPO, SHARED

lm_eval = pytest.importorskip("lm_eval")
KJV = SHARED / "data" / "kjv"
TASKS = REPO / "evaltasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # any attempt at the network fails at once instead of passing unnoticed
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not KJV.is_dir(), reason="../shared/data/kjv is missing")
def test_committed_tasks_are_what_the_build_script_makes():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from build_eval_tasks import build
    finally:
        sys.path.pop(0)
    cloze, choice = build(KJV / "valid.txt", 200, 0)
    assert cloze == _rows("kjv_cloze") and choice == _rows("kjv_choice")
    assert all(len(r["endings"]) == 4 and r["endings"].count(r["endings"][r["label"]]) == 1 for r in choice)
    assert sorted({r["label"] for r in choice}) == [0, 1, 2, 3]


def test_offline_task_folder_loads_in_lm_eval():
    """The bundled tasks, as `steptitan eval` finds them with `--include-path evaltasks` from a checkout
    (the same folder in an editable install, so on lm-eval's path once)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from steptitan.lmeval import bundled_tasks, task_paths

    assert bundled_tasks().resolve() == TASKS.resolve()  # importlib.resources -> the checkout's evaltasks/
    assert task_paths(None) == task_paths(str(TASKS)) == task_paths(os.path.relpath(TASKS)) == [str(bundled_tasks())]
    # only the folder's tasks: indexing lm-eval's thousands of built-in task files costs ~14 s of CPU (issue 23 item 10)
    manager = TaskManager(include_path=task_paths(os.path.relpath(TASKS)), include_defaults=False)
    tasks = get_task_dict(["kjv_cloze", "kjv_choice"], manager)
    cloze, choice = tasks["kjv_cloze"], tasks["kjv_choice"]
    docs = list(cloze.test_docs())
    assert len(docs) == 200
    words = _rows("kjv_cloze")[0]["text"].split(" ")
    assert cloze.doc_to_text(docs[0]) == " ".join(words[:-1]) and cloze.doc_to_target(docs[0]) == " " + words[-1]
    first = list(choice.test_docs())[0]
    assert choice.doc_to_choice(first) == _rows("kjv_choice")[0]["endings"]


def test_scores_are_flattened_without_stderr():
    from steptitan.lmeval import scalars

    results = {"results": {"kjv_cloze": {"alias": "kjv_cloze", "acc,none": 0.25, "acc_stderr,none": "N/A",
                                         "perplexity,none": 812.5, "sample_len": 12}}}
    assert scalars(results) == {"kjv_cloze/acc": 0.25, "kjv_cloze/perplexity": 812.5}


def _loglikelihood(model, tok, context: str, continuation: str, max_length: int) -> tuple[float, bool]:
    """log P(continuation | context) and "greedy", as lm-eval's HFLM defines them, with steptitan's forward."""
    n_spaces = len(context) - len(context.rstrip())  # HFLM moves the context's trailing spaces to the continuation
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation).ids
    ctx = tok.encode(context).ids
    cont = whole[len(ctx):]
    inp = (ctx + cont)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp])).float(), dim=-1)[0, -len(cont):]
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


@pytest.mark.slow
@pytest.mark.skipif(not KJV.is_dir(), reason="../shared/data/kjv is missing")
def test_eval_of_a_tiny_run_matches_loglikelihoods_by_hand(tmp_path):
    """A real `steptitan eval` (lm-eval's HFLM on the merged export, offline) of a 2-stage STEP run with LoRA;
    acc, acc_norm and perplexity recomputed from steptitan's own forward of the unmerged stage model, and
    read back from TensorBoard and the offline W&B eval run. The tasks come from the installed package
    (no --include-path)."""
    run = tmp_path / "run"
    have_wandb = importlib.util.find_spec("wandb") is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1", **wandb_env(tmp_path)}
    train = subprocess.run(
        [sys.executable, "-m", "steptitan.train", "recipes/step.toml", f"data.files=[{KJV / 'train.txt'}]",
         "data.max_chars=300000", f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={run}", "model.vocab_size=512",
         "model.dim=64", "training.seq_len=64", "training.batch_size=4", "training.eval_batches=1",
         "training.warmup_steps=2", "stages.0.steps=6", "stages.1.steps=4",
         *(["metrics.wandb=true", "metrics.wandb_project=steptitan-test"] if have_wandb else [])],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    limit = 12
    out = subprocess.run(
        [sys.executable, "-m", "steptitan", "eval", str(run), "--tasks", "kjv_cloze,kjv_choice",
         "--limit", str(limit), "--batch-size", "4"],
        cwd=tmp_path, env={**env, **OFFLINE}, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run / "eval" / "kjv_cloze,kjv_choice.json").read_text())
    scores = record["scores"]
    assert record["stage"] == 1 and record["n_samples"]["kjv_cloze"]["effective"] == limit

    from tokenizers import Tokenizer

    from steptitan.export import find_checkpoint, find_tokenizer, load_stage_model, recipe_for

    info = find_checkpoint(run)
    recipe = recipe_for(info)
    plan, model = load_stage_model(recipe, info)  # LoRA adapters in place: steptitan's own forward
    model.eval()
    tok = Tokenizer.from_file(str(find_tokenizer(recipe)))
    max_length = recipe.training.seq_len  # steptitan eval gives HFLM the trained sequence length
    assert record["max_length"] == 64

    cloze = [_loglikelihood(model, tok, " ".join(r["text"].split(" ")[:-1]), " " + r["text"].split(" ")[-1], max_length)
             for r in _rows("kjv_cloze")[:limit]]
    assert scores["kjv_cloze/acc"] == pytest.approx(sum(g for _, g in cloze) / limit)
    assert scores["kjv_cloze/perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in cloze) / limit), rel=1e-4)
    acc = acc_norm = 0
    for r in _rows("kjv_choice")[:limit]:
        lls = [_loglikelihood(model, tok, r["ctx"], " " + e, max_length)[0] for e in r["endings"]]
        acc += max(range(4), key=lambda i: lls[i]) == r["label"]
        acc_norm += max(range(4), key=lambda i: lls[i] / len(r["endings"][i])) == r["label"]
    assert scores["kjv_choice/acc"] == pytest.approx(acc / limit)
    assert scores["kjv_choice/acc_norm"] == pytest.approx(acc_norm / limit)

    step = info.meta["global_step"]
    assert step == 10
    assert tb_scalars(run / "tb" / "eval")["eval/kjv_choice/acc"] == [(step, pytest.approx(acc / limit))]
    if have_wandb:
        (wb,) = read_eval_wandb_runs(run)
        (row,) = [h for h in wb["history"] if "eval/kjv_choice/acc" in h]
        assert row["_step"] == step and row["eval/kjv_choice/acc"] == pytest.approx(acc / limit)
        assert row["eval/kjv_cloze/perplexity"] == pytest.approx(scores["kjv_cloze/perplexity"])
        assert wb["run"].job_type == "eval" and wb["config"]["eval"]["tasks"] == ["kjv_cloze", "kjv_choice"]


# --------------------------------------------------------------------------- the tasks in an installed package

PACKAGE_SOURCES = ["pyproject.toml", "README.md", "steptitan", "registry", "evaltasks"]


def test_wheel_ships_the_offline_tasks_and_eval_finds_them_there(tmp_path):
    """A wheel built from the sources holds evaltasks/ as steptitan/evaltasks/; unpacked as a
    site-packages folder (no checkout around), importlib.resources finds the tasks there and lm-eval
    loads them, JSONL data included."""
    src = tmp_path / "src"
    src.mkdir()
    for name in PACKAGE_SOURCES:  # a copy: an in-tree build would write build/ into the checkout
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("steptitan-*.whl")
    shipped = {name.removeprefix("steptitan/evaltasks/") for name in zipfile.ZipFile(wheel).namelist()
               if name.startswith("steptitan/evaltasks/")}
    task_files = {f.name for f in TASKS.iterdir() if f.suffix in (".yaml", ".jsonl", ".py")}
    assert {"kjv_cloze.yaml", "kjv_cloze.jsonl", "kjv_choice.yaml", "kjv_choice.jsonl", "utils.py"} <= task_files
    assert shipped == task_files
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import json, steptitan.lmeval as m\n"
        "from lm_eval.tasks import TaskManager, get_task_dict\n"
        "folder = m.bundled_tasks()\n"
        "tasks = get_task_dict(['kjv_cloze', 'kjv_choice'], TaskManager(include_path=m.task_paths(None),"
        " include_defaults=False))\n"
        "print(json.dumps({'module': m.__file__, 'folder': str(folder), "
        "'docs': {k: len(list(t.test_docs())) for k, t in tasks.items()}}))\n")
    # PYTHONPATH comes before the editable install's finder (appended to sys.meta_path)
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(found["module"]).is_relative_to(site) and Path(found["folder"]) == site / "steptitan" / "evaltasks"
    assert found["docs"] == {"kjv_cloze": 200, "kjv_choice": 200}


# --------------------------------------------------------------------------- trackers


def wandb_env(tmp: Path) -> dict[str, str]:
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb-dir"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_DATA_DIR": str(tmp / "wandb-data"),
            "WANDB_SILENT": "true"}


def read_eval_wandb_runs(run_dir: Path) -> list[dict]:
    """Every offline W&B run in ``run_dir/wandb`` but the training run's (its id in run_id)."""
    from test_everyday import wandb_records

    train_id = (run_dir / "wandb" / "run_id").read_text().strip()
    runs = []
    for f in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        out = {"run": None, "history": [], "config": {}}
        for r in wandb_records(Path(f)):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["run"] = r.run
                out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "history":
                out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        if out["run"].run_id != train_id:
            runs.append(out)
    return runs


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the wandb package is not installed")
def test_eval_scores_go_to_tensorboard_and_an_offline_wandb_eval_run(tmp_path, monkeypatch):
    from steptitan.recipe import recipe_from_dict
    from steptitan.trackers import log_eval_scores

    for k, v in wandb_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    run_dir = tmp_path / "run"
    (run_dir / "wandb").mkdir(parents=True)
    (run_dir / "wandb" / "run_id").write_text("trainrun\n")  # what training wrote
    recipe = recipe_from_dict({"name": "tiny", "output_dir": str(tmp_path / "elsewhere"), "stages": [{"steps": 1}],
                               "metrics": {"wandb": True, "wandb_project": "steptitan-test"}})
    values = {"kjv_cloze/acc": 0.25, "kjv_cloze/perplexity": 812.5, "kjv_choice/acc_norm": 0.5}
    about = {"checkpoint": "stage00-step000007", "tasks": ["kjv_cloze", "kjv_choice"], "limit": 12}
    where = log_eval_scores(recipe, run_dir, 7, values, about)
    assert len(where) == 2

    assert tb_scalars(run_dir / "tb" / "eval") == {f"eval/{k}": [(7, v)] for k, v in values.items()}
    (wb,) = read_eval_wandb_runs(run_dir)  # a run of its own, in the run folder (not the recipe's output_dir)
    assert not (tmp_path / "elsewhere").exists()
    assert wb["run"].project == "steptitan-test" and wb["run"].display_name == "tiny-eval"
    assert wb["run"].job_type == "eval" and wb["run"].run_group == "trainrun"
    assert wb["config"]["eval"] == {**about, "train_run_id": "trainrun"} and wb["config"]["name"] == "tiny"
    rows = [h for h in wb["history"] if any(k.startswith("eval/") for k in h)]
    assert len(rows) == 1 and rows[0]["_step"] == 7
    assert {k: v for k, v in rows[0].items() if k.startswith("eval/")} == {f"eval/{k}": v for k, v in values.items()}


def test_eval_scores_go_nowhere_when_the_run_has_no_trackers(tmp_path):
    from steptitan.recipe import recipe_from_dict
    from steptitan.trackers import log_eval_scores

    recipe = recipe_from_dict({"name": "tiny", "stages": [{"steps": 1}],
                               "metrics": {"tensorboard": False, "wandb": False}})
    assert log_eval_scores(recipe, tmp_path, 7, {"kjv_cloze/acc": 0.25}, {}) == []
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bad input


def fake_run(root: Path) -> Path:
    """A run folder as find_checkpoint and recipe_for read it: recipe.json and a checkpoint's meta.json
    (no weights: what is tested here must be refused before they are read)."""
    from steptitan.recipe import recipe_from_dict, to_dict

    run = root / "run"
    ckpt = run / "checkpoints" / "stage00-step000003"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"stage": 0, "step": 3, "global_step": 3}))
    recipe = recipe_from_dict({"name": "tiny", "output_dir": str(run), "stages": [{"steps": 3}]})
    (run / "recipe.json").write_text(json.dumps(to_dict(recipe)))
    return run


def eval_main(capsys, *argv: str) -> tuple[int, str]:
    from steptitan.lmeval import main

    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--limit", "-2"), ("--max-length", "0")])
def test_limit_below_one_is_refused(capsys, tmp_path, flag, value):
    code, err = eval_main(capsys, str(fake_run(tmp_path)), "--tasks", "kjv_cloze", flag, value)
    assert code == 2 and "--limit, --batch-size and --max-length must be >= 1" in err


def test_missing_checkpoint_is_refused(capsys, tmp_path):
    code, err = eval_main(capsys, str(tmp_path / "no-such-run"), "--tasks", "kjv_cloze")
    assert code == 2 and "no-such-run: neither a steptitan checkpoint" in err


def test_a_folder_with_meta_json_that_is_no_checkpoint_is_refused_without_a_traceback(capsys, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "meta.json").write_text("{}")
    code, err = eval_main(capsys, str(folder), "--tasks", "kjv_cloze")
    assert code == 2 and f"checkpoint {str(folder)!r} is not a complete steptitan checkpoint" in err


def test_unknown_task_is_refused_with_suggestions_before_the_export(capsys, tmp_path, monkeypatch):
    import steptitan.export

    def no_export(*args, **kwargs):
        raise AssertionError("exported before the task names were checked")

    monkeypatch.setattr(steptitan.export, "export", no_export)
    code, err = eval_main(capsys, str(fake_run(tmp_path)), "--tasks", "kjv_cloze,kjv_clozee,no_such_task_xyz")
    assert code == 2
    assert "unknown lm-eval task(s): 'kjv_clozee' (did you mean kjv_cloze" in err and "'no_such_task_xyz'" in err
    assert "'kjv_cloze'" not in err.replace("'kjv_clozee'", "")


def test_a_continuation_longer_than_the_trained_context_is_refused_with_a_way_out(tmp_path):
    """HFLM asserts (with no message) that each continuation fits max_length, which steptitan eval sets
    to the trained sequence length: that must be a one-line EvalError naming --max-length, and a longer
    --max-length must then score the task."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lm_eval.tasks import TaskManager

    from steptitan.lmeval import EvalError, bundled_tasks, evaluate_folder

    # a byte-level word tokenizer over the task's own words: every ending is several tokens long
    words = sorted({w for row in _rows("kjv_choice")[:2] for e in (row["ctx"], *row["endings"]) for w in e.split()})
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=256)).save_pretrained(tmp_path)
    longest = max(len(e.split()) for row in _rows("kjv_choice")[:2] for e in row["endings"])
    manager = TaskManager(include_path=str(bundled_tasks()), include_defaults=False)  # not lm-eval's own ~14 s index
    with pytest.raises(EvalError, match="--max-length"):
        evaluate_folder(tmp_path, ["kjv_choice"], manager, 2, 2, "cpu", max_length=longest - 1)
    ok = evaluate_folder(tmp_path, ["kjv_choice"], manager, 2, 2, "cpu", max_length=longest + 64)
    assert ok["results"]["kjv_choice"]["acc,none"] in (0.0, 0.5, 1.0)
