"""The benchmark's validation text cut, by document, into a *selection* slice and a *report* slice.

Every choice the benchmark makes (an LR, a warmup, a recipe variant) is scored on the selection
slice; the report slice is evaluated in full and used for nothing but the reported figures
(docs/benchmark.md, "Protocol"). The cut is by whole documents, so no article or chapter is in
both: document ``i`` goes to the selection slice when ``i % select_every == 0``, to the report
slice otherwise, which spreads both over the whole file (its topics and its order).

What a document is depends on the text (``rule``):

* ``wikitext``: a WikiText article, from one top-level heading line (`` = Title = ``) to the next;
* ``paragraph``: a block of lines between blank lines (the KJV files: one chapter per paragraph);
* ``auto``: ``wikitext`` when the text has at least two top-level headings, else ``paragraph``.

The slices are written once to ``<cache>/splits/<digest>/{selection,report}.txt`` (digest of the
text and the split settings, so a changed file or setting gives new slices, never stale ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SplitRule = Literal["auto", "wikitext", "paragraph"]
WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")  # a top-level WikiText heading (sections have == ... ==)


def documents(text: str, rule: SplitRule = "auto") -> list[str]:
    """The documents of ``text``, each with its own lines verbatim; their concatenation is ``text``."""
    lines = text.splitlines(keepends=True)
    if rule == "auto":
        rule = "wikitext" if sum(1 for ln in lines if WIKITEXT_HEADING.match(ln.rstrip("\n"))) >= 2 else "paragraph"
    docs: list[list[str]] = [[]]
    if rule == "wikitext":
        for ln in lines:
            if WIKITEXT_HEADING.match(ln.rstrip("\n")) and any(x.strip() for x in docs[-1]):
                docs.append([])
            docs[-1].append(ln)
    elif rule == "paragraph":
        blank_run = False
        for ln in lines:
            if ln.strip():
                if blank_run and any(x.strip() for x in docs[-1]):
                    docs.append([])
                blank_run = False
            else:
                blank_run = True
            docs[-1].append(ln)
    else:
        raise ValueError(f"unknown document rule {rule!r}: auto, wikitext or paragraph")
    return ["".join(d) for d in docs if any(x.strip() for x in d)]


def split_documents(docs: list[str], select_every: int) -> tuple[list[str], list[str]]:
    """(selection, report): document i is a selection document when i % select_every == 0."""
    if select_every < 2:
        raise ValueError(f"select_every must be >= 2 (one document in select_every goes to selection), got {select_every}")
    if len(docs) < select_every:
        raise ValueError(f"the validation text has {len(docs)} document(s); at least {select_every} are needed so "
                         f"that both slices get one (--select-every {select_every})")
    return ([d for i, d in enumerate(docs) if i % select_every == 0],
            [d for i, d in enumerate(docs) if i % select_every != 0])


@dataclass(frozen=True)
class Slices:
    selection: Path
    report: Path
    info: dict  # source, rule, documents and characters per slice

    def path(self, which: str) -> Path:
        return {"selection": self.selection, "report": self.report}[which]


def write_slices(val_file: Path, cache_dir: Path, rule: SplitRule = "auto", select_every: int = 3) -> Slices:
    """The two slices of ``val_file`` as files (written once per text and settings; an atomic rename)."""
    text = Path(val_file).read_text(encoding="utf-8")
    digest = hashlib.sha256(f"{rule}\0{select_every}\0".encode() + text.encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / "splits" / digest
    docs = documents(text, rule)
    selection, report = split_documents(docs, select_every)
    info = {"source": str(Path(val_file).resolve()), "rule": rule, "select_every": select_every,
            "documents": len(docs), "selection_documents": len(selection), "report_documents": len(report),
            "selection_chars": sum(map(len, selection)), "report_chars": sum(map(len, report))}
    out = Slices(folder / "selection.txt", folder / "report.txt", info)
    if not (out.selection.is_file() and out.report.is_file() and (folder / "slices.json").is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        for path, part in ((out.selection, selection), (out.report, report)):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(part), encoding="utf-8")
            tmp.replace(path)
        tmp = folder / f".slices.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(folder / "slices.json")
    return out
