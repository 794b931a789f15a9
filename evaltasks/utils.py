"""Loaders for the offline tasks: the JSONL files next to this file, wherever lm-eval is run from.

(A YAML's ``dataset_kwargs.data_files`` is resolved against the working directory; ``custom_dataset``
is a function found next to the YAML, so the folder works from anywhere.) Built by
tools/build_eval_tasks.py from ../shared/data/kjv/valid.txt.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def _jsonl(name: str):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(HERE / f"{name}.jsonl")})


def kjv_cloze(**kwargs):
    return _jsonl("kjv_cloze")


def kjv_choice(**kwargs):
    return _jsonl("kjv_choice")
