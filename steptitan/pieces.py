"""Tokenizing a corpus in pieces: in this process or in worker processes, resumable after a kill.

The document stream is cut into pieces of ~``piece_chars`` characters (whole
documents, a deterministic cut), and each piece is tokenized into its own file
``NNNNNN.bin`` -- written under a temporary name, fsynced, then renamed -- so a
piece file that exists is complete, and a run killed mid-way resumes by
tokenizing only the pieces that are missing. The pieces are then concatenated
into the cache's ``train.bin`` / ``val.bin`` (steptitan/data.py); the bytes are
those of tokenizing the whole stream at once (each document is encoded alone,
followed by the end-of-text id), whatever the number of workers or the piece size.

Workers are forked processes (spawned where fork does not exist), each with its own single-threaded
``tokenizers.Tokenizer`` (N workers = N cores); ``workers=0`` encodes in this
process with the tokenizers library's own batch threads (training's default).
"""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

PIECE_CHARS = 1 << 23  # ~8 Mi characters per piece: seconds of one core's work, the unit lost to a kill
_BATCH = 256  # documents per encode_batch call


def cut_pieces(docs: Iterable[str], piece_chars: int) -> Iterator[tuple[list[str], int]]:
    """(documents, characters) of consecutive pieces: whole documents until ``piece_chars`` is reached."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= piece_chars:
            yield batch, chars
            batch, chars = [], 0
    if batch:
        yield batch, chars


def piece_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.bin"


def encode_piece(tokenizer, docs: list[str], eos_id: int, dtype: str, path: Path) -> int:
    """Tokenize ``docs`` (each followed by ``eos_id``) into ``path``; returns its token count.

    ``tokenizer`` is a ``tokenizers.Tokenizer``. The file appears by one rename
    after an fsync, so a kill leaves either no piece or a complete one (plus a
    dot-file that the next run deletes).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # encode_batch_fast: the same ids without character offsets, ~1.9x the tokens per CPU second and
    # 2/3 of the memory on a 4 Mi-character document (measured, docs/data.md)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    with open(tmp, "wb") as fh:
        for start in range(0, len(docs), _BATCH):
            for enc in encode(docs[start : start + _BATCH]):
                fh.write(np.asarray(enc.ids + [eos_id], dtype=dtype).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    log = os.environ.get("STEPTITAN_PIECE_LOG")  # tests: which pieces this run tokenized (steptitan/faults.py)
    if log:
        with open(log, "a") as fh:
            fh.write(f"{path.parent.name}/{path.name}\n")
    return path.stat().st_size // np.dtype(dtype).itemsize


# --------------------------------------------------------------------------- worker processes

_worker_state: dict = {}


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str) -> None:
    # A forked worker inherits the caller's signal handlers. One that only records SIGTERM (the trainer's
    # deferred handler, a user's) would make the worker outlive pool.terminate(), whose join then waits
    # forever; Ctrl-C is the caller's to handle (it terminates the pool).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: N workers = N processes' worth
    from tokenizers import Tokenizer

    _worker_state.update(tokenizer=Tokenizer.from_file(tokenizer_json), eos_id=eos_id, dtype=dtype)


def worker_pool(workers: int, tokenizer_json: Path, eos_id: int, dtype: str):
    """``workers`` processes, each with the tokenizer loaded (``_init_worker``)."""
    import multiprocessing

    # fork (Linux): no re-import of the caller's __main__ (a script without a main guard);
    # the tokenizers library turns its threads off in a forked child, as _init_worker does anyway
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_init_worker,
                                                    initargs=(str(tokenizer_json), eos_id, dtype))


def _worker_encode(docs: list[str], path: str) -> int:
    s = _worker_state
    return encode_piece(s["tokenizer"], docs, s["eos_id"], s["dtype"], Path(path))


# --------------------------------------------------------------------------- driver


class PieceProgress:
    """What ``tokenize_in_pieces`` reports after each piece (a callback's argument)."""

    def __init__(self) -> None:
        self.chars = 0  # characters of the finished (or kept) pieces
        self.tokens = 0
        self.new_tokens = 0  # tokenized by this run (the rate's numerator)
        self.kept = 0  # pieces found complete from an earlier run
        self.done = 0
        self.t0 = time.monotonic()

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(time.monotonic() - self.t0, 1e-9)


def tokenize_in_pieces(docs: Iterable[str], tokenizer_json: Path, eos_id: int, dtype: str, folder: Path,
                       workers: int = 0, piece_chars: int = PIECE_CHARS,
                       on_piece: Callable[[PieceProgress], None] | None = None) -> tuple[list[Path], PieceProgress]:
    """Tokenize ``docs`` into piece files under ``folder`` (keeping complete pieces of an earlier run).

    Returns the piece files in stream order and the final progress (tokens, pieces kept). ``workers`` > 0 encodes in that
    many spawned processes (at most 2 pieces per worker in flight, so memory is
    bounded by a few pieces); 0 encodes here with the tokenizers library's threads.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp-*"):  # a killed run's partial piece: never taken as complete
        stale.unlink(missing_ok=True)
    progress = PieceProgress()
    itemsize = np.dtype(dtype).itemsize
    paths: list[Path] = []
    pool = None
    tokenizer = None
    in_flight: collections.deque = collections.deque()

    def finished(n_tokens: int, chars: int, new: bool) -> None:
        progress.chars += chars
        progress.tokens += n_tokens
        progress.new_tokens += n_tokens if new else 0
        progress.kept += 0 if new else 1
        progress.done += 1
        if on_piece is not None:
            on_piece(progress)

    try:
        for index, (piece, chars) in enumerate(cut_pieces(docs, piece_chars)):
            path = piece_path(folder, index)
            paths.append(path)
            if path.is_file():
                finished(path.stat().st_size // itemsize, chars, new=False)
                continue
            if workers <= 0:
                if tokenizer is None:
                    from tokenizers import Tokenizer

                    tokenizer = Tokenizer.from_file(str(tokenizer_json))
                finished(encode_piece(tokenizer, piece, eos_id, dtype, path), chars, new=True)
                continue
            if pool is None:
                pool = worker_pool(workers, tokenizer_json, eos_id, dtype)
            in_flight.append((pool.apply_async(_worker_encode, (piece, str(path))), chars))
            while len(in_flight) >= 2 * workers:
                result, c = in_flight.popleft()
                finished(result.get(), c, new=True)
        while in_flight:
            result, c = in_flight.popleft()
            finished(result.get(), c, new=True)
        if pool is not None:  # done: the workers get the pool's stop sentinels and exit on their own
            pool.close()
            pool.join()
            pool = None
    finally:
        if pool is not None:  # an error or Ctrl-C: stop the workers now
            pool.terminate()
            pool.join()
    return paths, progress


def concatenate(pieces: list[Path], dtype: str, outputs: list[tuple[Path, int]]) -> None:
    """Write the pieces' token stream, in order, into ``outputs`` = [(path, n_tokens), ...] (the last takes the rest).

    Each output is written under a temporary name and renamed when complete.
    """
    itemsize = np.dtype(dtype).itemsize
    stream = (np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else np.zeros(0, dtype) for p in pieces)
    current = np.zeros(0, dtype)
    for n_out, (path, n_tokens) in enumerate(outputs):
        last = n_out == len(outputs) - 1
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            written = 0
            while last or written < n_tokens:
                if not len(current):
                    nxt = next(stream, None)
                    if nxt is None:
                        break
                    current = nxt
                take = len(current) if last else min(len(current), n_tokens - written)
                fh.write(np.asarray(current[:take]).tobytes())
                written += take
                current = current[take:]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        assert last or path.stat().st_size == n_tokens * itemsize
