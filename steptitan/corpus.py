"""The corpus as documents: local text/json/parquet files, a hub dataset, or the embedded stdlib-docs corpus.

``corpus_docs`` yields the documents of ``data.files`` (a .txt file in pieces of
~4 Mi characters, strict UTF-8; json/jsonl/parquet one row each, streamed), of
``data.hub``, or of the embedded corpus: the docstrings of the installed Python
standard library, parsed with ``ast``, so a recipe with no data runs offline.
``source_fingerprint`` says which corpus a cache entry was built from.
Tokenizing, caching and sampling are steptitan/data.py's.
"""

from __future__ import annotations

import ast
import codecs
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from steptitan.recipe import DataConfig

EMBEDDED_CORPUS = "stdlib-docs"
# Modules whose docstrings we skip: tests, GUI/demo code and vendored packages.
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__",
              "lib2to3", "tkinter", "turtledemo", "ensurepip", "config-3.11"}


class DataError(ValueError):
    """The data source or tokenizer is unusable; the message says why."""


# --------------------------------------------------------------------------- reading


_stdlib_docs: list[str] | None = None  # the whole embedded corpus, once one pass has read it to the end


def iter_stdlib_docstrings() -> Iterator[str]:
    """Docstrings of the installed Python standard library, in a fixed order, yielded as they are parsed.

    Parsed with ``ast`` (nothing is imported), so it is always available and
    needs no network: the embedded default corpus. Streamed, so the first
    document comes after a file or two rather than after the whole library
    (~30 s): data preparation's progress lines flow from the start, and
    ``data.max_chars`` stops the parsing. A pass that reaches the end keeps the
    documents (~1.5 M characters), so the next pass (tokenizing, after the
    tokenizer was trained) does not parse again.
    """
    global _stdlib_docs
    if _stdlib_docs is not None:
        yield from _stdlib_docs
        return
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, filename).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        docs.append(doc)
                        yield doc
    _stdlib_docs = docs


def stdlib_docstrings() -> list[str]:
    """The embedded corpus as a list (``iter_stdlib_docstrings``)."""
    return list(iter_stdlib_docstrings())


_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


TEXT_PIECE_CHARS = 1 << 22  # a .txt file is read in pieces of ~4 Mi characters (one document each)


def _first_bad_utf8(p: Path) -> tuple[int, int]:
    """(byte offset, byte) of the first invalid UTF-8 sequence in ``p`` (only called once decoding failed)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(p, "rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                # the decoder may hold up to 3 bytes of an unfinished sequence from the previous chunk
                return max(0, offset + exc.start - len(decoder.getstate()[0])), chunk[max(exc.start, 0)]
            offset += len(chunk)
    return offset, 0


def _read_text(p: Path, shown: str) -> Iterator[str]:
    """A .txt file as documents of at most TEXT_PIECE_CHARS characters, cut after a newline.

    Streamed: only the pieces a consumer asks for are read, so ``data.max_chars``
    stops the reading (a file smaller than one piece is one document, as before).
    Decoding is strict UTF-8 with universal newlines; a file that is not UTF-8
    text, or holds NUL bytes (binary), is one DataError naming the file.
    """
    rest = ""
    with open(p, encoding="utf-8", errors="strict", newline=None) as fh:
        while True:
            try:
                chunk = fh.read(TEXT_PIECE_CHARS)
            except UnicodeDecodeError as exc:
                with open(p, "rb") as raw:
                    if b"\0" in raw.read(1 << 16):
                        raise DataError(f"data file {shown!r} holds NUL bytes: a binary file, not text") from None
                offset, byte = _first_bad_utf8(p)
                raise DataError(f"data file {shown!r} is not UTF-8 text: byte 0x{byte:02x} at offset {offset:,} is "
                                f"not valid UTF-8 ({exc.reason}); it may be latin-1/cp1252 text or a binary file. "
                                f"Convert it, e.g. `iconv -f latin1 -t utf-8 {shown} > {Path(shown).stem}.utf8.txt`") from None
            if "\0" in chunk:
                raise DataError(f"data file {shown!r} holds NUL bytes (offset ~{fh.tell():,}): a binary file, not text")
            if not chunk:
                if rest:
                    yield rest
                return
            text = rest + chunk
            cut = text.rfind("\n", 0, TEXT_PIECE_CHARS) + 1 if len(text) >= TEXT_PIECE_CHARS else 0
            if cut <= 0:
                rest = text
                if len(rest) >= 2 * TEXT_PIECE_CHARS:  # no newline at all: cut anywhere
                    yield rest[:TEXT_PIECE_CHARS]
                    rest = rest[TEXT_PIECE_CHARS:]
                continue
            yield text[:cut]
            rest = text[cut:]


def _load_file_docs(path: str, text_column: str) -> Iterator[str]:
    """One document per row (json/parquet, streamed) or per ~4 Mi-character piece of a .txt file."""
    import datasets

    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise DataError(f"data file {path!r} does not exist")
    builder = _BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise DataError(f"data file {path!r}: unsupported type {p.suffix!r}; use one of {', '.join(sorted(_BUILDERS))}")
    if builder == "text":
        yield from _read_text(p, path)
        return
    try:  # streaming: rows are read as they are consumed, so max_chars stops the reading
        rows = iter(datasets.load_dataset(builder, data_files=str(p), split="train", streaming=True))
        first = next(rows, None)
    except Exception as exc:
        raise DataError(f"could not read {path!r}: {exc}") from None
    if first is None:
        return
    if text_column not in first:
        raise DataError(f"{path!r} has no column {text_column!r} (columns: {', '.join(first)}); set data.text_column")
    yield first[text_column]
    try:
        yield from (row[text_column] for row in rows)
    except Exception as exc:
        raise DataError(f"could not read {path!r}: {exc}") from None


def _load_hub_docs(cfg: DataConfig) -> Iterator[str]:
    """Rows of a hub dataset (or a local dataset folder), streamed: nothing is downloaded or converted first.

    ``datasets``' streaming mode reads the dataset's files as rows are consumed,
    so ``data.max_chars`` stops the reading, the progress lines start with the
    first rows, and memory stays one shard's worth however large the dataset.
    A local folder of parquet/json/jsonl/csv files goes through the same
    ``load_dataset`` call (its builder is inferred from the file types).
    """
    import datasets

    where = "the local folder" if Path(os.path.expanduser(cfg.hub)).is_dir() else "the hub (needs network)"
    try:
        rows = iter(datasets.load_dataset(os.path.expanduser(cfg.hub) if where == "the local folder" else cfg.hub,
                                          cfg.hub_config, split=cfg.hub_split, streaming=True))
        first = next(rows, None)
    except Exception as exc:
        raise DataError(f"could not load dataset {cfg.hub!r} from {where}: {exc}") from None
    if first is None:
        return
    if cfg.text_column not in first:
        raise DataError(f"dataset {cfg.hub!r} has no column {cfg.text_column!r} (columns: {', '.join(first)}); "
                        f"set data.text_column")
    yield first[cfg.text_column]
    try:
        yield from (row[cfg.text_column] for row in rows)
    except Exception as exc:
        raise DataError(f"could not read dataset {cfg.hub!r}: {exc}") from None


def corpus_docs(cfg: DataConfig, files: list[str] | None = None) -> Iterator[str]:
    files = cfg.files if files is None else files
    if files:
        for f in files:
            yield from _load_file_docs(f, cfg.text_column)
    elif cfg.hub:
        yield from _load_hub_docs(cfg)
    else:
        yield from iter_stdlib_docstrings()


def truncate_docs(docs: Iterable[str], max_chars: int) -> Iterator[str]:
    used = 0
    for doc in docs:
        if max_chars and used + len(doc) > max_chars:
            if max_chars - used > 0:
                yield doc[: max_chars - used]
            return
        used += len(doc)
        yield doc


def source_fingerprint(cfg: DataConfig, files: list[str]) -> dict:
    def stat(path: str) -> list:
        p = Path(os.path.expanduser(path))
        if not p.is_file():
            raise DataError(f"data file {path!r} does not exist")
        st = p.stat()
        return [str(p.resolve()), st.st_size, int(st.st_mtime)]

    if files:
        src = {"files": [stat(f) for f in files]}
    elif cfg.hub and Path(os.path.expanduser(cfg.hub)).is_dir():  # a local dataset folder: its files' sizes and times
        folder = Path(os.path.expanduser(cfg.hub))
        src = {"hub": [str(folder.resolve()), cfg.hub_config, cfg.hub_split],
               "hub_files": [stat(str(f)) for f in sorted(folder.rglob("*")) if f.is_file() and ".cache" not in f.parts]}
    elif cfg.hub:
        src = {"hub": [cfg.hub, cfg.hub_config, cfg.hub_split]}
    else:
        src = {"embedded": EMBEDDED_CORPUS, "python": sys.version.split()[0]}
    return {**src, "text_column": cfg.text_column, "max_chars": cfg.max_chars}
