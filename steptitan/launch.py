"""``steptitan train RECIPE --nproc-per-node N``: torchrun's launcher, run in this process, quietly.

The same as ``torchrun --standalone --nproc-per-node N -m steptitan.train RECIPE ...`` (one host,
a local rendezvous), with torchrun's own chatter left out: its warnings ("Received 2 death
signal, shutting down workers", OMP_NUM_THREADS notices), the ``SignalException`` traceback it
prints after a Ctrl-C and the ``ChildFailedError`` table after a failure. The ranks' own lines
(``steptitan: error: ...``, ``steptitan: interrupted ...``) say what happened; this launcher
exits with the code of the first rank that failed (train.py's exit codes), 130 after Ctrl-C.
For several hosts, use torchrun itself (docs/scale-out.md).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Sequence


def split_nproc(argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """(N, the other arguments) from ``--nproc-per-node N`` / ``--nproc-per-node=N`` (None when absent)."""
    rest, n, it = [], None, iter(argv)
    for arg in it:
        if arg in ("--nproc-per-node", "--nproc_per_node"):
            value = next(it, "")
        elif arg.startswith(("--nproc-per-node=", "--nproc_per_node=")):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
            continue
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--nproc-per-node needs a positive integer, got {value!r}")
        n = int(value)
    return n, rest


def launch(nproc: int, train_args: Sequence[str]) -> None:
    """Run the job and leave the process with its exit code. ``os._exit``: the ranks are gone and
    the launcher has nothing to save, while interpreter teardown may run torch elastic's rendezvous
    finalizers from their own thread ("Exception ignored ... cannot join current thread")."""
    code = _run(nproc, train_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(nproc: int, train_args: Sequence[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets for N > 1 anyway, minus its warning
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in [n for n in logging.Logger.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.ERROR)  # each sets its own level (elastic/utils/logging.py)
    from steptitan.stopping import EXIT_INTERRUPTED, EXIT_PREEMPTED

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "steptitan.train",
                                         *train_args])
    try:
        run(args)
    except SignalException as exc:  # the ranks got the signal too (torchrun forwards it) and said where they stopped
        return EXIT_INTERRUPTED if exc.sigval == signal.SIGINT else EXIT_PREEMPTED
    except ChildFailedError as exc:
        _, first = exc.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1  # < 0: killed by a signal
    return 0
