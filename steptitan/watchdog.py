"""Rank-failure detection: heartbeats through the rendezvous store.

Why: a gloo/nccl collective waits for a dead or hung peer until the process
group timeout fires (10 minutes by default), and under torchrun only the
*local* agent notices a worker that died -- a hung worker (stopped, deadlocked,
stuck in I/O) or a dead rank on another node is never noticed. So every rank
runs a daemon thread that

* increments its own counter ``steptitan/<attempt>/hb/<rank>`` in the
  rendezvous store every ``interval`` seconds, and
* watches its peers' counters with its own monotonic clock (no cross-host
  clock comparison). A peer whose counter has not moved for ``timeout_s`` is
  declared failed: the detecting rank publishes one ``failure`` key naming it,
  prints ``steptitan: error on rank R: rank K stopped responding ...`` and
  leaves with exit code 4 through ``os._exit`` (the main thread may be stuck in
  a collective and cannot be interrupted). Every other rank sees the
  ``failure`` key within one interval and leaves the same way, naming the
  same rank; torchrun then reports the job failed.
* Across nodes (torchrun --nnodes=N, docs/scale-out.md) the same keys work,
  since every node's ranks share the job's store, and messages name the node
  (torchrun's GROUP_RANK) and host of the failed rank. A rank whose torchrun
  agent died (a node going down, the agent killed) notices that its parent
  process changed, publishes the failure naming itself and exits: workers run
  in their own session, so they would otherwise train on as orphans, and the
  job would never end. If the dead agent hosted the store, the ranks of the
  other nodes lose the store and leave after ``timeout_s``.
* A hung rank on the same host is SIGKILLed by the rank that detects it (each
  rank publishes its PID namespace, PID and start time, ``process_namespace``;
  not the host name, which containers on different machines may share):
  torchrun's SIGTERM does not end a stopped process and would wait 30 s before
  its own SIGKILL, and a deadlocked rank on another host exits by itself once
  its watchdog sees the ``failure`` key.

A rank that finishes (or stops on an error every rank sees, like a NaN loss)
marks itself ``done`` first, so peers do not mistake a normal exit for a failure.

Cost: one store write plus one multi-key read per interval per rank. With more
than 64 ranks each rank watches only its two ring neighbours; a failure still
reaches every rank through the shared ``failure`` key.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time

EXIT_PEER_FAILED = 4  # the process exit code when a peer rank failed (see train.py)


class Watchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, host: str, port: int):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.host, self.port = host, port
        self.interval = min(max(timeout_s / 5, 0.1), 5.0)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # keys of a restarted job must not collide
        self.prefix = f"steptitan/{attempt}"
        if world_size <= 64:
            self.peers = [r for r in range(world_size) if r != rank]
        else:
            self.peers = sorted({(rank + 1) % world_size, (rank - 1) % world_size})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steptitan-watchdog", daemon=True)
        self._store = None
        # Under torchrun our parent is the node's agent; if it dies we are reparented (os.getppid changes).
        self.launcher_pid = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self.where = f"node {os.environ.get('GROUP_RANK', '0')}, host {socket.gethostname()}"

    # ------------------------------------------------------------------ public

    def start(self) -> "Watchdog":
        import torch.distributed as dist

        # A client connection of our own: the process group's store client is
        # used by the main thread, and a second connection costs nothing.
        self._store = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=max(self.timeout_s, 5.0)))
        self._store.set(self._key(self.rank), "0")
        self._store.set(f"{self.prefix}/pid/{self.rank}", f"{process_namespace()}:{os.getpid()}:{process_start(os.getpid())}")
        self._store.set(f"{self.prefix}/where/{self.rank}", self.where)
        self._thread.start()
        return self

    def stop(self, status: str = "done") -> None:
        """Stop beating and tell the peers this rank left on purpose."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval + 1)
        try:
            if self._store is not None:
                self._store.set(self._key(self.rank), status)
        except Exception:  # noqa: BLE001 - the store may be gone at shutdown; nothing to tell then
            pass

    def peer_status(self, rank: int) -> str | None:
        """Rank ``rank``'s heartbeat value: a count, ``done`` or ``failed:<why>`` (None if unreadable)."""
        try:
            return self._store.get(self._key(rank)).decode()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the store is gone
            return None

    def failure(self) -> str | None:
        """The job's published failure (``rank K failed: ...`` / ``rank K stopped responding ...``), None if none."""
        try:
            key = f"{self.prefix}/failure"
            return self._store.get(key).decode() if self._store.check([key]) else None  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the store is gone
            return None

    # ------------------------------------------------------------------ thread

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/hb/{rank}"

    def _where(self, rank: int) -> str:
        """' on node 1, host h': where a peer runs, as it published it ('' if unknown)."""
        try:
            return f" on {self._store.get(f'{self.prefix}/where/{rank}').decode()}"  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the store is gone: the rank number alone still names it
            return ""

    def _kill_if_local(self, rank: int) -> None:
        try:
            published = self._store.get(f"{self.prefix}/pid/{rank}").decode()  # type: ignore[union-attr]
            if killable(published):
                os.kill(int(published.split(":")[-2]), signal.SIGKILL)
        except Exception:  # noqa: BLE001 - already gone, or not ours to kill
            pass

    def _fail(self, message: str, publish: bool, hung_rank: int | None = None) -> None:
        if hung_rank is not None:
            self._kill_if_local(hung_rank)
        if publish:
            try:
                self._store.set(f"{self.prefix}/failure", message)  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - exit anyway
                pass
        print(f"steptitan: error on rank {self.rank}: {message}; exiting", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_FAILED)

    def _run(self) -> None:
        store = self._store
        assert store is not None
        beat = 0
        now = time.monotonic()
        last_value: dict[int, str | None] = {r: None for r in self.peers}
        last_change = {r: now for r in self.peers}
        last_store_ok = now
        failure_key = f"{self.prefix}/failure"
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if self.launcher_pid is not None and os.getppid() != self.launcher_pid:
                self._fail(f"rank {self.rank} ({self.where}) lost its torchrun agent (pid {self.launcher_pid} died: "
                           f"the node went down or the agent was killed)", publish=True)
            try:
                beat += 1
                store.set(self._key(self.rank), str(beat))
                if store.check([failure_key]):
                    self._fail(store.get(failure_key).decode(), publish=False)
                watched = [r for r in self.peers if last_value[r] != "done"]
                present = [r for r in watched if store.check([self._key(r)])]
                values = store.multi_get([self._key(r) for r in present]) if present else []
                last_store_ok = now
            except Exception as exc:  # noqa: BLE001 - store unreachable
                if self._stop.is_set():
                    return
                if now - last_store_ok > self.timeout_s:
                    hosted = ("node 0's torchrun agent hosts it" if self.launcher_pid is not None
                              else "the process hosting it")
                    self._fail(f"lost the rendezvous store {self.host}:{self.port} for {now - last_store_ok:.1f} s "
                               f"({hosted}: it died, or its node went down): {exc}", publish=False)
                continue
            for r, raw in zip(present, values):
                value = raw.decode()
                if value.startswith("failed:"):
                    self._fail(f"rank {r} failed: {value[len('failed:'):]}{self._where(r)}", publish=True)
                if value != last_value[r]:
                    last_value[r], last_change[r] = value, now
            for r in watched:
                if last_value[r] != "done" and now - last_change[r] > self.timeout_s:
                    self._fail(f"rank {r} stopped responding (no heartbeat for {now - last_change[r]:.1f} s; "
                               f"killed, crashed or hung; training.heartbeat_timeout_s={self.timeout_s:g}){self._where(r)}",
                               publish=True, hung_rank=r)


def process_namespace() -> str:
    """Which PID namespace of which running kernel this process lives in: "<boot id>/<pid-ns inode>".

    A PID means the same process only inside one PID namespace of one kernel. Host names do not say
    that: containers on different machines often share one (issue 15, defect 7), and containers on one
    machine have their own PID numbering. Falls back to the host name where /proc is missing."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the PID it
    names one process, so a PID reused after the rank died is never killed."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def killable(published: str) -> bool:
    """True when ``published`` ("<namespace>:<pid>:<start>", from ``Watchdog.start``) is a live process in
    this process's PID namespace, the very one that published it."""
    parts = published.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    namespace, pid, start = parts
    return namespace == process_namespace() and start != "?" and process_start(int(pid)) == start


def start_watchdog(rank: int, world_size: int, timeout_s: float) -> Watchdog | None:
    """A running watchdog for a multi-rank job launched with a TCP store, else None."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world_size <= 1 or timeout_s <= 0 or not host or not port:
        return None
    return Watchdog(rank, world_size, timeout_s, host, int(port)).start()
