"""Bring your own tokens: ``data.tokens`` used as they are, without tokenizing.

Two kinds of token source:

* a nanoGPT-style ``.bin``: a flat array of token ids (``data.tokens_dtype``,
  uint16 or uint32, native byte order, no header), read in place through a
  memmap -- nothing is copied;
* a ``datasets`` folder with an ``input_ids`` column (``save_to_disk``'s
  output, or a folder of parquet/json files), flattened once into a ``.bin``
  in ``data.cache_dir`` (each row followed by the end-of-text id unless it
  already ends with it, as steptitan's own tokenizing does).

``data.tokenizer`` must be the tokenizer that made the tokens: its vocabulary
must fit ``model.vocab_size`` and every id in the tokens must be below it, or
the recipe is refused with one message (a wrong ``tokens_dtype`` shows up this
way too, and uint32 ids read as uint16 are recognised by their zero high halves).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from steptitan.corpus import DataError
from steptitan.token_cache import EOS_TOKEN, PreparedData, _digest, _locked, _progress, load_tokenizer
from steptitan.recipe import DataConfig

_SCAN = 1 << 24  # ids per chunk when checking a .bin's largest id (64 MiB of uint32)


def _tokenizer_folder(cfg: DataConfig) -> Path:
    tok = Path(os.path.expanduser(cfg.tokenizer or ""))
    return tok.parent if tok.name == "tokenizer.json" else tok


def _check_bin(path: Path, key: str, dtype: str, vocab: int, model_vocab_size: int) -> int:
    """The number of ids in a .bin token file, after checking its size, dtype and ids; a DataError otherwise."""
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{key}: {str(path)!r} is empty")
    if size % itemsize:
        raise DataError(f"{key}: {str(path)!r} has {size:,} bytes, not a whole number of {dtype} ids; "
                        f"is data.tokens_dtype right?")
    if dtype == "uint16" and vocab > 65536:
        raise DataError(f"{key}: data.tokens_dtype = \"uint16\" holds ids below 65,536 but data.tokenizer has "
                        f"{vocab:,} tokens; its token files are uint32 (data.tokens_dtype = \"uint32\")")
    ids = np.memmap(path, dtype=dtype, mode="r")
    if dtype == "uint16":  # small uint32 ids read as uint16: every second value is a zero high half
        head = np.asarray(ids[: 1 << 20])
        if len(head) >= 2 and len(head) % 2 == 0 and not head[1::2].any() and head[0::2].any():
            raise DataError(f"{key}: every second uint16 value of {str(path)!r} is 0: the file looks like uint32 "
                            f"ids; set data.tokens_dtype = \"uint32\"")
    largest = max(int(ids[i : i + _SCAN].max()) for i in range(0, len(ids), _SCAN))
    _check_largest(largest, key, path, vocab, model_vocab_size,
                   " (the file may hold uint16 ids: data.tokens_dtype = \"uint16\")" if dtype == "uint32" and largest > 65535 else "")
    return len(ids)


def _check_largest(largest: int, key: str, path: Path, vocab: int, model_vocab_size: int, hint: str = "") -> None:
    if largest >= model_vocab_size:
        raise DataError(f"{key}: {str(path)!r} holds token id {largest:,}, but model.vocab_size is {model_vocab_size:,} "
                        f"(ids must be below it){hint}")
    if largest >= vocab:
        raise DataError(f"{key}: {str(path)!r} holds token id {largest:,}, but data.tokenizer has {vocab:,} tokens: "
                        f"were the tokens made by another tokenizer?{hint}")


def _load_token_rows(folder: Path, key: str):
    import datasets

    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise DataError(f"{key}: {str(folder)!r} holds several splits ({', '.join(splits)}); point at one, "
                        f"e.g. {str(folder / (splits or ['train'])[0])!r}")
    try:
        if (folder / "state.json").is_file():  # Dataset.save_to_disk's folder
            return datasets.load_from_disk(str(folder))
        return datasets.load_dataset(str(folder), split="train", streaming=True)
    except Exception as exc:
        raise DataError(f"{key}: could not read the dataset folder {str(folder)!r}: {exc}") from None


def _flatten_dataset(folder: Path, key: str, cfg: DataConfig, tok_hash: str, vocab: int, model_vocab_size: int,
                     eos_id: int, dtype: str) -> tuple[Path, int]:
    """A datasets folder's input_ids rows as one flat .bin in the cache (built once; by rename, so whole or absent)."""
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    fingerprint = {"tokens": [[str(f.resolve()), f.stat().st_size, int(f.stat().st_mtime)] for f in files],
                   "tokenizer": tok_hash, "dtype": dtype}
    entry = Path(os.path.expanduser(cfg.cache_dir)) / "tokens" / _digest(fingerprint)
    out = entry / "tokens.bin"
    with _locked(entry.parent.parent / "locks" / f"{entry.name}.lock", entry):
        if not out.is_file():
            _progress(f"{key}: flattening the input_ids of {str(folder)!r} -> data.cache_dir/tokens/{entry.name}")
            rows = _load_token_rows(folder, key)
            columns = rows.column_names
            if columns is not None and "input_ids" not in columns:
                raise DataError(f"{key}: {str(folder)!r} has no column 'input_ids' (columns: {', '.join(columns)})")
            entry.mkdir(parents=True, exist_ok=True)
            tmp = entry / f".tokens.bin.tmp-{os.getpid()}"
            with open(tmp, "wb") as fh:
                for batch in rows.iter(batch_size=1000):
                    if "input_ids" not in batch:
                        raise DataError(f"{key}: {str(folder)!r} has no column 'input_ids' (columns: {', '.join(batch)})")
                    for row in batch["input_ids"]:
                        ids = np.asarray(row, dtype=np.int64)
                        if len(ids) and (ids.min() < 0 or ids.max() >= min(vocab, model_vocab_size)):
                            tmp.unlink()
                            _check_largest(int(ids.max()), key, folder, vocab, model_vocab_size)
                            raise DataError(f"{key}: {str(folder)!r} holds a negative token id {int(ids.min())}")
                        if not len(ids) or ids[-1] != eos_id:
                            ids = np.append(ids, eos_id)
                        fh.write(ids.astype(dtype).tobytes())
            if tmp.stat().st_size == 0:
                tmp.unlink()
                raise DataError(f"{key}: {str(folder)!r} holds no tokens")
            os.replace(tmp, out)
    return out, out.stat().st_size // np.dtype(dtype).itemsize


def prepare_given_tokens(cfg: DataConfig, model_vocab_size: int) -> PreparedData:
    """``PreparedData`` over ``data.tokens`` (and ``data.val_tokens``, or the last ``val_fraction`` of the tokens)."""
    tok_dir = _tokenizer_folder(cfg)
    tokenizer = load_tokenizer(tok_dir)
    vocab = tokenizer.get_vocab_size()
    if vocab > model_vocab_size:
        raise DataError(f"data.tokenizer has {vocab:,} tokens but model.vocab_size is {model_vocab_size:,}; "
                        f"raise model.vocab_size")
    eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise DataError(f"data.tokenizer {cfg.tokenizer!r} has no end-of-text token (eos_token in tokenizer_config.json)")
    tok_hash = hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()[:16]
    flat_dtype = "uint16" if model_vocab_size <= 65535 else "uint32"

    def source(key: str, where: str) -> tuple[Path, str, int]:
        path = Path(os.path.expanduser(where))
        if path.is_dir():
            flat, n = _flatten_dataset(path, key, cfg, tok_hash, vocab, model_vocab_size, int(eos_id), flat_dtype)
            return flat, flat_dtype, n
        if not path.is_file():
            raise DataError(f"{key}: {where!r} does not exist")
        return path, cfg.tokens_dtype, _check_bin(path, key, cfg.tokens_dtype, vocab, model_vocab_size)

    train_path, dtype, n_train = source("data.tokens", cfg.tokens or "")
    if cfg.val_tokens:
        val_path, val_dtype, _ = source("data.val_tokens", cfg.val_tokens)
        if val_dtype != dtype:
            raise DataError(f"data.val_tokens: its ids are {val_dtype}, data.tokens' are {dtype}; use the same kind of source")
        return PreparedData(tok_dir, train_path, val_path, vocab, int(eos_id), dtype)
    n_val = max(1, int(n_train * cfg.val_fraction))  # the last val_fraction, as for text
    return PreparedData(tok_dir, train_path, train_path, vocab, int(eos_id), dtype,
                        train_range=(0, n_train - n_val), val_range=(n_train - n_val, n_train))
