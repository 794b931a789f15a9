"""``steptitan prepare``: tokenizing in resumable pieces with worker processes; the cache training reads."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from steptitan.data import prepare_data
from steptitan.pieces import cut_pieces, tokenize_in_pieces
from steptitan.recipe import DataConfig

WORDS = ("the of and to in he that it was for on are as with his they at be this from have or by one had not but what "
         "all were when we there can an your which their said if do will each about how up out them then she many some "
         "so these would other into has more her two like him see time could no make than first been its who now people "
         "my made over did down only way find use may water long little very after words called just where most know").split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120))) + "." for _ in range(n)]


def train_tokenizer(tmp: Path) -> Path:
    """A small byte-level BPE trained (prepare_data's own training) on the tests' kind of text."""
    text = tmp / "t.txt"
    text.write_text("\n".join(_docs(2000, seed=1)))
    data = prepare_data(DataConfig(files=[str(text)], cache_dir=str(tmp / "cache")), 400)
    return data.tokenizer_dir / "tokenizer.json"


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def _reference_tokens(docs: list[str], tokenizer_json: Path) -> np.ndarray:
    """The stream as training has always defined it: each document encoded alone, then the end-of-text id."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    eos = tok.token_to_id("<|endoftext|>")
    return np.array([i for d in docs for i in tok.encode(d).ids + [eos]], dtype=np.uint16)


def _write_jsonl(path: Path, docs: list[str], column: str = "text") -> None:
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))


# --------------------------------------------------------------------------- pieces


def test_pieces_are_whole_documents_in_order():
    docs = ["a" * 5, "b" * 3, "c" * 9, "d", "e" * 2]
    assert list(cut_pieces(docs, 8)) == [(["a" * 5, "b" * 3], 8), (["c" * 9], 9), (["d", "e" * 2], 3)]


def test_resume_tokenizes_only_missing_pieces_and_ignores_partial_files(tmp_path, tokenizer_json, monkeypatch):
    from tokenizers import Tokenizer

    docs = _docs(600, seed=4)
    folder = tmp_path / "pieces"
    eos = Tokenizer.from_file(str(tokenizer_json)).token_to_id("<|endoftext|>")
    paths, progress = tokenize_in_pieces(docs, tokenizer_json, eos, "uint16", folder, workers=0, piece_chars=5000)
    n = len(paths)
    assert n > 8 and progress.kept == 0
    full = {p.name: p.read_bytes() for p in paths}
    # A kill: pieces 3 and 7 never finished, and piece 5 was mid-write (a truncated temporary file).
    for i in (3, 5, 7):
        paths[i].unlink()
    (folder / f".{paths[5].name}.tmp-99999").write_bytes(full[paths[5].name][:10])
    log = tmp_path / "log"
    monkeypatch.setenv("STEPTITAN_PIECE_LOG", str(log))
    again, progress = tokenize_in_pieces(docs, tokenizer_json, eos, "uint16", folder, workers=2, piece_chars=5000)
    assert sorted(log.read_text().split()) == [f"pieces/{paths[i].name}" for i in (3, 5, 7)]
    assert progress.kept == n - 3
    assert {p.name: p.read_bytes() for p in again} == full
    assert not list(folder.glob(".*"))  # the partial file was removed, not used
    ref = _reference_tokens(docs, tokenizer_json)
    assert np.array_equal(np.concatenate([np.fromfile(p, dtype=np.uint16) for p in again]), ref)


def test_pool_workers_take_sigterm_by_default_whatever_handler_their_caller_has(tokenizer_json):
    """The forked workers inherit the caller's signal handlers. With a Python SIGTERM handler that only
    records (the trainer's deferred one, or a user's), a worker ignored the SIGTERM of ``pool.terminate()``;
    when the pool's stop sentinels had been drained first (a race that a loaded machine wins), the call
    never returned (seen as a hung test run: both workers waiting on the task queue's lock). (Killing a
    worker here to show it would itself break the pool: a worker killed while holding the queue's lock
    hangs every later terminate(); so the test reads the worker's disposition.)"""
    from tokenizers import Tokenizer

    from steptitan.pieces import worker_pool

    old = signal.signal(signal.SIGTERM, lambda *a: None)  # records nothing, ends nothing
    try:
        eos = Tokenizer.from_file(str(tokenizer_json)).token_to_id("<|endoftext|>")
        pool = worker_pool(2, tokenizer_json, eos, "uint16")
        try:
            assert pool.map(_sigterm_and_sigint_disposition, range(4)) == [("default", "ignored")] * 4
        finally:
            pool.close()
            pool.join()
    finally:
        signal.signal(signal.SIGTERM, old)


def _sigterm_and_sigint_disposition(_) -> tuple[str, str]:
    names = {signal.SIG_DFL: "default", signal.SIG_IGN: "ignored"}
    return tuple(names.get(signal.getsignal(s), "a Python handler") for s in (signal.SIGTERM, signal.SIGINT))


def test_workers_give_the_bytes_of_one_process_and_training_reads_the_prepared_cache(tmp_path, tokenizer_json):
    docs = _docs(1500, seed=5)
    corpus = tmp_path / "c.jsonl"
    _write_jsonl(corpus, docs)
    cache = tmp_path / "cache"
    overrides = [f"data.files=[{corpus}]", f"data.tokenizer={tokenizer_json}", f"data.cache_dir={cache}",
                 "model.vocab_size=400", "data.max_chars=0"]
    out = subprocess.run([sys.executable, "-m", "steptitan", "prepare", "recipes/step.toml", *overrides,
                          "--workers", "2", "--piece-chars", "20000"],
                         cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens/s" in out.stderr and "tokenizing" in out.stderr  # the tqdm bar
    ref = _reference_tokens(docs, tokenizer_json)
    entry = next((cache / "tokens").iterdir())
    got = np.concatenate([np.fromfile(entry / "train.bin", np.uint16), np.fromfile(entry / "val.bin", np.uint16)])
    assert np.array_equal(got, ref)
    assert len(np.fromfile(entry / "val.bin", np.uint16)) == int(len(ref) * 0.05)
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # pieces removed
    # Training's own preparation (same recipe, same overrides) finds the entry and tokenizes nothing.
    from steptitan.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes/step.toml", overrides)
    before = (entry / "train.bin").stat().st_mtime_ns
    data = prepare_data(recipe.data, recipe.model.vocab_size)
    assert data.train_path == entry / "train.bin" and (entry / "train.bin").stat().st_mtime_ns == before


@pytest.mark.slow
def test_prepare_killed_mid_way_resumes_to_the_same_bytes(tmp_path, tokenizer_json):
    """SIGKILL `steptitan prepare` (and its workers) once some pieces are written; the same command resumes,
    tokenizes only the missing pieces, and the cache entry equals an uninterrupted run's byte for byte."""
    corpus = tmp_path / "c.jsonl"
    _write_jsonl(corpus, _docs(40_000, seed=6))  # ~10 MB
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPTITAN_PIECE_LOG": str(tmp_path / "log")}

    def cmd(cache: Path) -> list[str]:
        return [sys.executable, "-m", "steptitan", "prepare", "recipes/step.toml", f"data.files=[{corpus}]",
                f"data.tokenizer={tokenizer_json}", f"data.cache_dir={cache}", "model.vocab_size=400",
                "data.max_chars=0", "--workers", "2", "--piece-chars", "100000"]

    proc = subprocess.Popen(cmd(tmp_path / "a"), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    pieces: list[Path] = []
    while time.monotonic() < deadline and len(pieces) < 5:
        time.sleep(0.05)
        pieces = list((tmp_path / "a").glob("tokens/*/pieces-train-*/0*.bin"))
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and both workers, mid-piece
    proc.wait()
    folder = next((tmp_path / "a").glob("tokens/*/pieces-train-*"))
    finished_at_kill = {f"{folder.name}/{p.name}" for p in folder.glob("0*.bin")}
    assert not (folder.parent / "meta.json").exists() and len(finished_at_kill) >= 5
    (tmp_path / "log").unlink()

    resumed = subprocess.run(cmd(tmp_path / "a"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{len(finished_at_kill)} pieces kept from an interrupted run" in resumed.stderr
    tokenized_on_resume = set((tmp_path / "log").read_text().split())
    assert not tokenized_on_resume & finished_at_kill
    (tmp_path / "log").unlink()

    whole = subprocess.run(cmd(tmp_path / "b"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    all_pieces = set((tmp_path / "log").read_text().split())
    assert tokenized_on_resume | finished_at_kill == all_pieces
    entry_a, entry_b = (next((tmp_path / x / "tokens").iterdir()) for x in "ab")
    assert entry_a.name == entry_b.name
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (entry_a / name).read_bytes() == (entry_b / name).read_bytes(), name
    assert sorted(p.name for p in entry_a.iterdir()) == ["meta.json", "train.bin", "val.bin"]
