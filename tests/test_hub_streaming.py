"""data.hub streamed through datasets' load_dataset(..., streaming=True), tested offline on local dataset folders."""

from __future__ import annotations

import numpy as np
import pytest

from steptitan.corpus import DataError
from steptitan.data import prepare_data
from steptitan.recipe import DataConfig
from test_prepare import _docs, _reference_tokens, _write_jsonl, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_dataset_folder_is_streamed_with_its_text_column(tmp_path, tokenizer_json, kind, monkeypatch):
    """data.hub = a local dataset folder (several files) goes through load_dataset(..., streaming=True):
    rows in order, a text column named "body", and nothing converted into the datasets cache
    (a non-streamed load_dataset writes the whole dataset there as Arrow files first)."""
    import datasets

    hf_cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
    folder = tmp_path / "ds"
    folder.mkdir()
    shards = [_docs(300, seed=10 + k) for k in range(3)]
    for k, docs in enumerate(shards):
        if kind == "parquet":
            datasets.Dataset.from_list([{"body": d, "id": i} for i, d in enumerate(docs)]).to_parquet(
                str(folder / f"train-{k:05d}.parquet"))
        else:
            _write_jsonl(folder / f"train-{k:05d}.jsonl", docs, column="body")
    cfg = DataConfig(hub=str(folder), text_column="body", cache_dir=str(tmp_path / "cache"), tokenizer=str(tokenizer_json))
    data = prepare_data(cfg, 400)
    ref = _reference_tokens([d for docs in shards for d in docs], tokenizer_json)
    assert np.array_equal(np.concatenate([data.tokens("train"), data.tokens("val")]), ref)
    arrow = [p for p in hf_cache.rglob("*.arrow")] if hf_cache.exists() else []
    assert arrow == [], f"the dataset was converted (downloaded) whole: {arrow[:3]}"
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body, id\)"):
        prepare_data(DataConfig(hub=str(folder), cache_dir=str(tmp_path / "cache"), tokenizer=str(tokenizer_json)), 400)


def test_dataset_folder_stops_reading_at_max_chars(tmp_path, tokenizer_json, capsys):
    """max_chars stops a streamed dataset after the rows it needs: a folder whose later files are
    unreadable is prepared from its first file (a whole-dataset load would fail on them)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    docs = _docs(400, seed=3)
    _write_jsonl(folder / "a-00000.jsonl", docs)
    (folder / "a-00001.jsonl").write_text("{not json at all\n" * 1000)
    max_chars = sum(len(d) for d in docs[:100])
    cfg = DataConfig(hub=str(folder), cache_dir=str(tmp_path / "cache"), tokenizer=str(tokenizer_json), max_chars=max_chars)
    data = prepare_data(cfg, 400)
    ref = _reference_tokens(docs[:100], tokenizer_json)
    assert np.array_equal(np.concatenate([data.tokens("train"), data.tokens("val")]), ref)
    with pytest.raises(DataError, match="could not read dataset"):  # without max_chars the bad file is reached
        prepare_data(DataConfig(hub=str(folder), cache_dir=str(tmp_path / "cache2"), tokenizer=str(tokenizer_json)), 400)


