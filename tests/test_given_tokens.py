"""Bring your own tokens: data.tokens as a nanoGPT .bin or a datasets folder with input_ids, no tokenizing."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from steptitan.corpus import DataError
from steptitan.data import prepare_data
from steptitan.recipe import DataConfig, RecipeError, load_recipe
from test_prepare import _docs, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))  # 400 tokens, <|endoftext|> = 0


def _rows(tok, n: int, seed: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok))
    return [t.encode(d).ids for d in _docs(n, seed)]


def _nanogpt_bin(path, rows, dtype) -> np.ndarray:
    """nanoGPT's prepare.py layout: each document's ids then the end-of-text id, flat, no header."""
    ids = np.array([i for r in rows for i in r + [0]], dtype=dtype)
    ids.tofile(path)
    return ids


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_file_is_read_in_place_and_split(tmp_path, tok, dtype):
    ids = _nanogpt_bin(tmp_path / "train.bin", _rows(tok, 300, 1), dtype)
    cfg = DataConfig(tokens=str(tmp_path / "train.bin"), tokens_dtype=dtype, tokenizer=str(tok),
                     cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, 512)
    n_val = int(len(ids) * 0.05)
    assert np.array_equal(data.tokens("train"), ids[: len(ids) - n_val])
    assert np.array_equal(data.tokens("val"), ids[len(ids) - n_val :])
    assert data.train_path == tmp_path / "train.bin" and data.eos_id == 0 and data.vocab_size <= 400
    assert not (tmp_path / "cache").exists()  # nothing tokenized, nothing copied
    val = _nanogpt_bin(tmp_path / "val.bin", _rows(tok, 20, 2), dtype)
    both = prepare_data(DataConfig(tokens=str(tmp_path / "train.bin"), val_tokens=str(tmp_path / "val.bin"),
                                   tokens_dtype=dtype, tokenizer=str(tok)), 512)
    assert np.array_equal(both.tokens("train"), ids) and np.array_equal(both.tokens("val"), val)


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_datasets_folder_with_input_ids(tmp_path, tok, kind):
    import datasets

    rows = _rows(tok, 200, 3)
    rows[5] = rows[5] + [0]  # a row that already ends with the end-of-text id gets no second one
    table = datasets.Dataset.from_dict({"input_ids": rows, "n": list(range(len(rows)))})
    folder = tmp_path / "ds"
    if kind == "save_to_disk":
        table.save_to_disk(str(folder))
    else:
        folder.mkdir()
        table.to_parquet(str(folder / "part-0.parquet"))
    data = prepare_data(DataConfig(tokens=str(folder), tokenizer=str(tok), cache_dir=str(tmp_path / "cache")), 512)
    expected = np.array([i for k, r in enumerate(rows) for i in (r if k == 5 else r + [0])], dtype=np.uint16)
    assert np.array_equal(np.concatenate([data.tokens("train"), data.tokens("val")]), expected)
    again = prepare_data(DataConfig(tokens=str(folder), tokenizer=str(tok), cache_dir=str(tmp_path / "cache")), 512)
    assert again.train_path == data.train_path  # flattened once, then read from the cache


def test_mismatches_are_refused_with_one_message(tmp_path, tok):
    import datasets

    rows = _rows(tok, 100, 4)
    rows[0] += [7] * (sum(len(r) + 1 for r in rows) % 2)  # an even count: readable as uint32 too
    assert len(_nanogpt_bin(tmp_path / "u16.bin", rows, "uint16")) % 2 == 0
    _nanogpt_bin(tmp_path / "u32.bin", rows, "uint32")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    cases = {
        "u16.bin as uint32": (dict(tokens="u16.bin", tokens_dtype="uint32"), 512,
                              r"holds token id [\d,]+, but model.vocab_size is 512 .*may hold uint16 ids"),
        "u32.bin as uint16": (dict(tokens="u32.bin", tokens_dtype="uint16"), 512,
                              r"every second uint16 value .* looks like uint32 ids; set data.tokens_dtype = \"uint32\""),
        "odd size": (dict(tokens="odd.bin"), 512, r"3 bytes, not a whole number of uint16 ids"),
        "model vocab below the tokenizer's": (dict(tokens="u16.bin"), 300,
                                              r"data.tokenizer has 400 tokens but model.vocab_size is 300"),
    }
    for name, (kw, vocab, match) in cases.items():
        kw["tokens"] = str(tmp_path / kw["tokens"])
        with pytest.raises(DataError, match=match):
            prepare_data(DataConfig(tokenizer=str(tok), cache_dir=str(tmp_path / "c"), **kw), vocab)
    big = rows[:3] + [[399, 7, 1000]]  # id 1000 >= model.vocab_size 512
    datasets.Dataset.from_dict({"input_ids": big}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"holds token id 1,000, but model.vocab_size is 512"):
        prepare_data(DataConfig(tokens=str(tmp_path / "ds"), tokenizer=str(tok), cache_dir=str(tmp_path / "c")), 512)
    datasets.Dataset.from_dict({"ids": rows}).save_to_disk(str(tmp_path / "ds2"))
    with pytest.raises(DataError, match=r"no column 'input_ids' \(columns: ids\)"):
        prepare_data(DataConfig(tokens=str(tmp_path / "ds2"), tokenizer=str(tok), cache_dir=str(tmp_path / "c")), 512)
    assert not list((tmp_path / "c").rglob("*.bin"))  # nothing half-written was kept
    # a 16-bit file for a tokenizer beyond 65,536 tokens cannot be right
    from steptitan.given_tokens import _check_bin

    with pytest.raises(DataError, match=r"uint16\" holds ids below 65,536 but data.tokenizer has 100,000 tokens"):
        _check_bin(tmp_path / "u16.bin", "data.tokens", "uint16", 100_000, 128_000)


def test_recipe_errors(tmp_path, tok):
    (tmp_path / "t.bin").write_bytes(b"\0\0")
    for overrides, match in (
        ([f"data.tokens={tmp_path / 't.bin'}"], "data.tokens: needs data.tokenizer"),
        ([f"data.tokens={tmp_path / 't.bin'}", f"data.tokenizer={tok}", f"data.files=[{tmp_path / 't.bin'}]"],
         "give one of data.files, data.hub and data.tokens"),
        (["data.tokens_dtype=int8"], "data.tokens_dtype"),
    ):
        with pytest.raises(RecipeError, match=match):
            load_recipe(REPO / "recipes/vanilla.toml", overrides)


def test_training_runs_on_given_tokens(tmp_path, tok):
    """A real `steptitan train` on a nanoGPT .bin: no tokenizing line, the run finishes."""
    _nanogpt_bin(tmp_path / "train.bin", _rows(tok, 400, 5), "uint16")
    cmd = [sys.executable, "-m", "steptitan.train", "recipes/vanilla.toml", f"data.tokens={tmp_path / 'train.bin'}",
           f"data.tokenizer={tok}", f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}",
           "model.vocab_size=512", "model.n_layers=1", "training.seq_len=32", "training.batch_size=2",
           "training.eval_batches=1", "stages.0.steps=2", "training.warmup_steps=1", "checkpoint.enabled=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenizing" not in proc.stderr and (tmp_path / "run" / "summary.json").is_file()
