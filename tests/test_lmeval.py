"""steptitan eval: lm-evaluation-harness on an exported checkpoint, offline, checked against steptitan's forward."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

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
    from lm_eval.tasks import TaskManager, get_task_dict

    # only the folder's tasks: indexing lm-eval's thousands of built-in task files costs ~14 s of CPU (issue 23 item 10)
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
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
    acc, acc_norm and perplexity recomputed from steptitan's own forward of the unmerged stage model."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "steptitan.train", "recipes/step.toml", f"data.files=[{KJV / 'train.txt'}]",
         "data.max_chars=300000", f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={run}", "model.vocab_size=512",
         "model.dim=64", "training.seq_len=64", "training.batch_size=4", "training.eval_batches=1",
         "training.warmup_steps=2", "stages.0.steps=6", "stages.1.steps=4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    limit = 12
    out = subprocess.run(
        [sys.executable, "-m", "steptitan", "eval", str(run), "--tasks", "kjv_cloze,kjv_choice",
         "--include-path", str(TASKS), "--limit", str(limit), "--batch-size", "4"],
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

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb" / "eval"))
    events.Reload()
    logged = events.Scalars("eval/kjv_choice/acc")
    assert [(e.step, e.value) for e in logged] == [(info.meta["global_step"], pytest.approx(acc / limit))]
