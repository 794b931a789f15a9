"""The token cache's lowest layer: the tokenizer (trained BPE or a given one), cache-entry digests and locks,
and ``PreparedData`` (where a run's token files are). steptitan/data.py builds the cache on it, and
steptitan/given_tokens.py (tokens a user brings) uses it without importing data.py back.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from steptitan.corpus import DataError

EOS_TOKEN = "<|endoftext|>"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]



def train_bpe(docs: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE trained on the corpus; saved as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TOKEN}))


def load_tokenizer(path: str | Path):
    """torchtitan's HuggingFaceTokenizer from a tokenizer.json file or its folder."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    p = Path(os.path.expanduser(str(path)))
    folder = p.parent if p.name == "tokenizer.json" else p
    if not (folder / "tokenizer.json").is_file():
        raise DataError(f"tokenizer {str(path)!r}: no tokenizer.json there")
    try:
        return HuggingFaceTokenizer(str(folder))
    except Exception as exc:
        raise DataError(f"tokenizer {str(path)!r} is unreadable: {exc}") from None


def _progress(message: str) -> None:
    print(f"steptitan: data: {message}", file=sys.stderr, flush=True)



@contextmanager
def _locked(path: Path, entry: Path):
    """An exclusive flock on ``path`` guarding the cache entry ``entry``; says so when it has to wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if os.environ.get("LOCAL_RANK", "0") == "0":  # other ranks of one launch expect to wait for rank 0
                _progress(f"waiting for another process preparing data.cache_dir/{entry.parent.name}/{entry.name} "
                          f"(it holds lock {path.name})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class PreparedData:
    tokenizer_dir: Path
    train_path: Path
    val_path: Path
    vocab_size: int  # the tokenizer's
    eos_id: int
    dtype: str
    # [start, end) of each split in its file; None = the whole file (data.tokens split by val_fraction: one file)
    train_range: tuple[int, int] | None = None
    val_range: tuple[int, int] | None = None

    def tokens(self, split: str) -> np.ndarray:
        path, span = (self.train_path, self.train_range) if split == "train" else (self.val_path, self.val_range)
        ids = np.memmap(path, dtype=self.dtype, mode="r")
        return ids if span is None else ids[span[0] : span[1]]
