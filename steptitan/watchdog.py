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
* A hung rank on the same host is SIGKILLed by the rank that detects it (each
  rank publishes ``host:pid``): torchrun's SIGTERM does not end a stopped
  process and would wait 30 s before its own SIGKILL, and a deadlocked rank
  on another host exits by itself once its watchdog sees the ``failure`` key.

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

    # ------------------------------------------------------------------ public

    def start(self) -> "Watchdog":
        import torch.distributed as dist

        # A client connection of our own: the process group's store client is
        # used by the main thread, and a second connection costs nothing.
        self._store = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=max(self.timeout_s, 5.0)))
        self._store.set(self._key(self.rank), "0")
        self._store.set(f"{self.prefix}/pid/{self.rank}", f"{socket.gethostname()}:{os.getpid()}")
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

    # ------------------------------------------------------------------ thread

    def _key(self, rank: int) -> str:
        return f"{self.prefix}/hb/{rank}"

    def _kill_if_local(self, rank: int) -> None:
        try:
            host, pid = self._store.get(f"{self.prefix}/pid/{rank}").decode().rsplit(":", 1)  # type: ignore[union-attr]
            if host == socket.gethostname():
                os.kill(int(pid), signal.SIGKILL)
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
                    self._fail(f"lost the rendezvous store {self.host}:{self.port} for {now - last_store_ok:.1f} s "
                               f"(the launcher or the rank hosting it died): {exc}", publish=False)
                continue
            for r, raw in zip(present, values):
                value = raw.decode()
                if value.startswith("failed:"):
                    self._fail(f"rank {r} failed: {value[len('failed:'):]}", publish=True)
                if value != last_value[r]:
                    last_value[r], last_change[r] = value, now
            for r in watched:
                if last_value[r] != "done" and now - last_change[r] > self.timeout_s:
                    self._fail(f"rank {r} stopped responding (no heartbeat for {now - last_change[r]:.1f} s; "
                               f"killed, crashed or hung; training.heartbeat_timeout_s={self.timeout_s:g})",
                               publish=True, hung_rank=r)


def start_watchdog(rank: int, world_size: int, timeout_s: float) -> Watchdog | None:
    """A running watchdog for a multi-rank job launched with a TCP store, else None."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world_size <= 1 or timeout_s <= 0 or not host or not port:
        return None
    return Watchdog(rank, world_size, timeout_s, host, int(port)).start()
