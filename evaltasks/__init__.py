"""The offline lm-eval tasks (``kjv_cloze``, ``kjv_choice``): YAMLs, their JSONL data and the loaders in utils.py.

The top-level ``evaltasks/`` folder installs as ``steptitan.evaltasks`` (pyproject.toml ``package-dir``,
as ``registry/`` does), its files as package data, so ``steptitan eval`` finds the tasks through
``importlib.resources`` in a wheel install as in a checkout (steptitan/lmeval.py, docs/eval.md).
Nothing here is imported by steptitan: lm-eval reads the YAMLs and loads utils.py by its path.
"""
