"""Build the offline lm-eval tasks in evaltasks/ from the King James Bible's held-out chapters.

    python tools/build_eval_tasks.py [--source ../shared/data/kjv/valid.txt] [--n 200] [--seed 0]

Writes, next to the task YAMLs in evaltasks/:

* ``kjv_cloze.jsonl``: LAMBADA-style last-word prediction. ``text`` is the previous sentence plus a
  sentence of 10-40 words, ending with its last word (no final punctuation); the model must give
  that word (lm-eval's ``acc``: the greedy continuation is the word; and its perplexity).
* ``kjv_choice.jsonl``: HellaSwag-style 4-way continuation choice. ``ctx`` is the first ~60% of a
  sentence (after the previous sentence), ``endings`` holds its true ending and the endings of three
  other sentences of the corpus, ``label`` the true one's position (``acc`` and length-normalised
  ``acc_norm``).

valid.txt holds the last ~10% of every book's chapters (its SOURCE.md), which no steptitan
benchmark trains on when it trains on train.txt. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "evaltasks"


def sentences(text: str) -> list[str]:
    """Sentences ending with '.', '?' or '!' (KJV paragraphs hold many), whitespace normalised."""
    parts = re.split(r"(?<=[.?!])\s+", " ".join(text.split()))
    return [p for p in parts if p]


def build(source: Path, n: int, seed: int) -> tuple[list[dict], list[dict]]:
    sents = sentences(source.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    usable = [i for i in range(1, len(sents)) if 10 <= len(sents[i].split()) <= 40
              and re.fullmatch(r"[A-Za-z]+[.?!]", sents[i].split()[-1])]
    picked = rng.sample(usable, 2 * n)
    cloze = []
    for i in picked[:n]:
        passage = f"{sents[i - 1]} {sents[i]}"[:-1]  # drop the final punctuation: the last word is the target
        cloze.append({"text": passage})
    choice = []
    endings_pool = [" ".join(sents[i].split()[int(0.6 * len(sents[i].split())):]) for i in usable]
    for i in picked[n:]:
        words = sents[i].split()
        cut = int(0.6 * len(words))
        true_ending = " ".join(words[cut:])
        others = [e for e in rng.sample(endings_pool, 12) if e != true_ending][:3]
        label = rng.randrange(4)
        endings = others[:label] + [true_ending] + others[label:]
        choice.append({"ctx": f"{sents[i - 1]} {' '.join(words[:cut])}", "endings": endings, "label": label})
    return cloze, choice


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "kjv" / "valid.txt")
    p.add_argument("--n", type=int, default=200, help="examples per task")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cloze, choice = build(args.source, args.n, args.seed)
    for name, rows in (("kjv_cloze", cloze), ("kjv_choice", choice)):
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}: {len(rows)} examples")


if __name__ == "__main__":
    main()
