"""Experiments over recipes: sweeps (spec, runner, report) and the benchmark, as ``steptitan sweep`` / ``steptitan bench``.

* ``spec``: sweep files -> runs, each a resolved recipe dict (paths anchored, docs/sweeps.md);
* ``runner``: launching runs with torchrun from their resolved TOML, resume / skip / failure bookkeeping;
* ``report``: reading summaries and TensorBoard scalars, tables and plots (sweep and bench alike);
* ``stats``: seed statistics of the benchmark (paired ratios, t-intervals, FLOPs-to-target);
* ``sweep`` and ``bench``: the two command lines.
"""
