"""Documents -> tokenizer -> packed token blocks, cached on disk and read by index.

The documents come from steptitan/corpus.py (local files, a hub dataset or the
embedded ``stdlib-docs`` corpus). They are tokenized once into a flat token
file (nanoGPT-style memmap) and cut into ``seq_len + 1`` blocks. Sampling is a
pure function of a global sample counter, so the data position is one integer
in a checkpoint and is independent of the world size.

Preparation happens before any process group exists; concurrent ranks
serialise on a file lock and the later ones reuse the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from steptitan import faults
# Re-exported: the corpus's names are part of this module's interface (tests, experiments, train.py).
from steptitan.corpus import EMBEDDED_CORPUS, DataError, corpus_docs, source_fingerprint, stdlib_docstrings, truncate_docs
from steptitan.distributed import env_world_size
from steptitan.pieces import PIECE_CHARS, PieceProgress, concatenate, tokenize_in_pieces
from steptitan.recipe import DataConfig, Recipe, RecipeError
# Re-exported: the tokenizer and the cache's layout are part of this module's interface.
from steptitan.token_cache import EOS_TOKEN, PreparedData, _digest, _locked, _progress, load_tokenizer, train_bpe

__all__ = ["EMBEDDED_CORPUS", "EOS_TOKEN", "BlockSampler", "DataError", "PreparedData", "check_data_fits",
           "corpus_docs", "load_tokenizer", "prepare_data", "stdlib_docstrings", "train_bpe", "trained_tokenizer_dir"]

# --------------------------------------------------------------------------- tokenizer


# --------------------------------------------------------------------------- cache


class _Reading:
    """Pass documents through, counting characters and printing progress every ~5 s (long preparations)."""

    def __init__(self, docs: Iterable[str], what: str, max_chars: int):
        self.docs, self.what, self.max_chars = docs, what, max_chars
        self.chars = 0
        self.nonblank = False
        self.t0 = self.last = time.monotonic()

    def __iter__(self) -> Iterator[str]:
        for doc in self.docs:
            self.chars += len(doc)
            self.nonblank = self.nonblank or bool(doc.strip())
            now = time.monotonic()
            if now - self.last > 5:
                self.last = now
                of = f" of max_chars={self.max_chars:,} ({100 * self.chars / self.max_chars:.0f}%)" if self.max_chars else ""
                _progress(f"{self.what}: {self.chars:,} characters{of}, {now - self.t0:.0f} s")
            yield doc


def _estimated_chars(cfg: DataConfig, files: list[str]) -> int | None:
    """About how many characters the training corpus has (a progress bar's total), None when unknown."""
    sizes = [Path(os.path.expanduser(f)).stat().st_size for f in files
             if Path(f).suffix.lower() in (".txt", ".text", ".json", ".jsonl")]  # bytes ~ characters
    total = sum(sizes) if files and len(sizes) == len(files) else None
    if cfg.max_chars:
        total = min(total, cfg.max_chars) if total else cfg.max_chars
    return total


class _Bar:
    """A tqdm bar over the corpus's characters (so an ETA) with the tokens and tokens/s (``steptitan prepare``).

    Pieces kept from an interrupted run are taken off the total, not counted as this run's progress."""

    def __init__(self, total: int | None, what: str):
        from tqdm import tqdm

        self.total, self.kept_chars = total, 0
        self.bar = tqdm(total=total, desc=what, unit="char", unit_scale=True, mininterval=1.0, smoothing=0.1)

    def __call__(self, p: PieceProgress) -> None:
        if p.new_tokens == 0:
            self.kept_chars = p.chars
            self.bar.reset(total=max(self.total - p.chars, 0) if self.total else None)
        else:
            self.bar.update(p.chars - self.kept_chars - self.bar.n)
        self.bar.set_postfix_str(f"{p.tokens:,} tokens, {p.tokens_per_s:,.0f} tokens/s"
                                 + (f", {p.kept} pieces kept from an interrupted run" if p.kept else ""), refresh=False)

    def close(self) -> None:
        self.bar.close()


def _tokenize_entry(cfg: DataConfig, files: list[str], tok_json: Path, eos_id: int, dtype: str, data_dir: Path,
                    workers: int, bar: bool, piece_chars: int) -> tuple[int, int]:
    """Tokenize the corpus in resumable pieces (steptitan/pieces.py) into ``data_dir``'s train.bin and val.bin.

    Returns (tokens, pieces kept from an interrupted earlier run)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    docs: Iterable[str] = truncate_docs(corpus_docs(cfg, files), cfg.max_chars)
    report = _Bar(_estimated_chars(cfg, files), "tokenizing") if bar else None
    if report is None:
        docs = _Reading(docs, "tokenizing", cfg.max_chars)
    try:
        pieces, progress = tokenize_in_pieces(docs, tok_json, eos_id, dtype, data_dir / f"pieces-train-{piece_chars}",
                                              workers, piece_chars, report)
    finally:
        if report is not None:
            report.close()
    n_all = progress.tokens
    if n_all == 0:
        raise DataError("the training corpus is empty")
    if cfg.val_files:
        val_pieces, _ = tokenize_in_pieces(corpus_docs(cfg, cfg.val_files), tok_json, eos_id, dtype,
                                           data_dir / f"pieces-val-{piece_chars}", workers, piece_chars)
        concatenate(pieces, dtype, [(data_dir / "train.bin", n_all)])
        concatenate(val_pieces, dtype, [(data_dir / "val.bin", 0)])
    else:
        # Deterministic split: the last val_fraction of the token stream.
        n_val = max(1, int(n_all * cfg.val_fraction))
        concatenate(pieces, dtype, [(data_dir / "train.bin", n_all - n_val), (data_dir / "val.bin", 0)])
    return n_all, progress.kept


def trained_tokenizer_dir(cfg: DataConfig, model_vocab_size: int) -> Path:
    """Where ``prepare_data`` keeps the BPE it trains for ``cfg`` (when ``data.tokenizer`` is not set)."""
    key = {"bpe": model_vocab_size, **source_fingerprint(cfg, list(cfg.files))}
    return Path(os.path.expanduser(cfg.cache_dir)) / "tokenizers" / _digest(key)


def prepare_data(cfg: DataConfig, model_vocab_size: int, workers: int = 0, bar: bool = False,
                 piece_chars: int = PIECE_CHARS) -> PreparedData:
    """Tokenizer and token files for ``cfg`` (built once, then read from the cache).

    The tokens are written in resumable pieces (steptitan/pieces.py): ``workers``
    processes (0 = this one, with the tokenizers library's threads), a tqdm
    ``bar`` instead of progress lines (``steptitan prepare``).
    """
    if cfg.tokens:  # bring your own tokens: nothing to tokenize
        from steptitan.given_tokens import prepare_given_tokens

        return prepare_given_tokens(cfg, model_vocab_size)
    cache = Path(os.path.expanduser(cfg.cache_dir))
    files = list(cfg.files)
    fingerprint = source_fingerprint(cfg, files)
    val_fp = source_fingerprint(cfg, cfg.val_files) if cfg.val_files else {"val_fraction": cfg.val_fraction}

    if cfg.tokenizer:
        tok_dir = Path(os.path.expanduser(cfg.tokenizer))
        tok_dir = tok_dir.parent if tok_dir.name == "tokenizer.json" else tok_dir
        if not (tok_dir / "tokenizer.json").is_file():
            raise DataError(f"data.tokenizer {cfg.tokenizer!r}: no tokenizer.json there")
        tok_key = {"tokenizer": hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()[:16]}
    else:
        tok_key = {"bpe": model_vocab_size, **fingerprint}
        tok_dir = cache / "tokenizers" / _digest(tok_key)  # = trained_tokenizer_dir(cfg, model_vocab_size)

    key = _digest({"src": fingerprint, "val": val_fp, "tok": tok_key})
    data_dir = cache / "tokens" / key
    if not cfg.tokenizer:
        # One lock per cache entry: the tokenizer folder is shared by every data key with the same
        # training text, so it has its own lock (two runs differing only in validation data must
        # not train into it at once), and it appears by one rename, complete or not at all.
        with _locked(cache / "locks" / f"tokenizer-{tok_dir.name}.lock", tok_dir):
            if not (tok_dir / "tokenizer.json").is_file():
                faults.pause_point("tokenizer", 0, 0, 0)  # tests: park while holding the lock
                t0 = time.monotonic()
                _progress(f"training a byte-level BPE tokenizer (vocab {model_vocab_size:,}) -> "
                          f"data.cache_dir/tokenizers/{tok_dir.name}")
                reading = _Reading(truncate_docs(corpus_docs(cfg, files), cfg.max_chars), "tokenizer", cfg.max_chars)
                tmp_dir = tok_dir.with_name(f".tmp-{tok_dir.name}-{os.getpid()}")
                train_bpe(reading, model_vocab_size, tmp_dir)
                if not reading.nonblank:
                    shutil.rmtree(tmp_dir, ignore_errors=True)
                    raise DataError("the training corpus is empty")
                shutil.rmtree(tok_dir, ignore_errors=True)  # a partial folder from an older version
                os.replace(tmp_dir, tok_dir)
                _progress(f"tokenizer trained on {reading.chars:,} characters in {time.monotonic() - t0:.1f} s")
    with _locked(cache / "locks" / f"{key}.lock", data_dir):
        tokenizer = load_tokenizer(tok_dir)
        vocab = tokenizer.get_vocab_size()
        if vocab > model_vocab_size:
            raise DataError(f"tokenizer has {vocab} tokens but model.vocab_size is {model_vocab_size}; raise model.vocab_size")
        eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise DataError(f"tokenizer in {str(tok_dir)!r} has no end-of-text token (eos_token in tokenizer_config.json)")
        dtype = "uint16" if model_vocab_size <= 65535 else "uint32"
        meta_path = data_dir / "meta.json"
        if not meta_path.is_file():  # written last: a cache entry with meta.json is complete
            t0 = time.monotonic()
            _progress(f"tokenizing the corpus -> data.cache_dir/tokens/{key}"
                      + (f" ({workers} worker processes)" if workers else ""))
            n_all, kept = _tokenize_entry(cfg, files, tok_dir / "tokenizer.json", int(eos_id), dtype, data_dir,
                                          workers, bar, piece_chars)
            tmp = data_dir / f".meta.json.tmp-{os.getpid()}"
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "vocab": vocab, "eos_id": eos_id}))
            os.replace(tmp, meta_path)
            for pieces in data_dir.glob("pieces-*"):
                shutil.rmtree(pieces, ignore_errors=True)
            _progress(f"{n_all:,} tokens ready in {time.monotonic() - t0:.1f} s"
                      + (f" ({kept} pieces kept from an interrupted run)" if kept else ""))
    return PreparedData(tok_dir, data_dir / "train.bin", data_dir / "val.bin", vocab, int(eos_id), dtype)


# --------------------------------------------------------------------------- sampling


def num_blocks(n_tokens: int, seq_len: int) -> int:
    """Blocks of seq_len inputs (+1 shifted label) that ``n_tokens`` can fill."""
    return max(0, (n_tokens - 1) // seq_len)


def check_data_fits(recipe: Recipe, train_tokens: int, val_tokens: int) -> None:
    """seq_len and batch must be fillable from the prepared token files."""
    t = recipe.training
    world = env_world_size()
    for split, n_tokens in (("training", train_tokens), ("validation", val_tokens)):
        blocks = num_blocks(n_tokens, t.seq_len)
        if blocks == 0:
            raise RecipeError(
                f"training.seq_len={t.seq_len} is larger than the {split} data can fill "
                f"({n_tokens:,} tokens make no block of {t.seq_len + 1}); lower seq_len or add text"
            )
    blocks = num_blocks(train_tokens, t.seq_len)
    if blocks < world * t.batch_size:
        raise RecipeError(
            f"the training data makes {blocks} blocks of seq_len={t.seq_len}, fewer than one step needs "
            f"({world} ranks x batch_size {t.batch_size}); lower seq_len or batch_size, or add text"
        )


class BlockSampler:
    """Batches of packed blocks addressed by a global sample counter.

    Sample ``g`` is block ``perm_e[g mod n]`` of epoch ``e = g // n``, with a
    seeded permutation per epoch. Rank ``r`` of ``W`` takes samples
    ``counter + r*B ... counter + (r+1)*B - 1``: distinct shards per rank, and
    the same global order whatever the world size.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.n_blocks = num_blocks(len(tokens), seq_len)
        if self.n_blocks == 0:
            raise DataError(f"{len(tokens)} tokens cannot fill one block of seq_len {seq_len}")
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _block_index(self, g: int) -> int:
        epoch, i = divmod(g, self.n_blocks)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return int(self._perm[i])  # type: ignore[index]

    def block(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def batch(self, counter: int, rank: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = counter + rank * batch_size
        blocks = np.stack([self.block(self._block_index(g)) for g in range(first, first + batch_size)])
        t = torch.from_numpy(blocks)
        return t[:, :-1], t[:, 1:]
