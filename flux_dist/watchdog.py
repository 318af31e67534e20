"""The rank watchdog: every rank beats into the rendezvous store and listens for every other rank.

A rank that stops answering (SIGSTOP, a frozen process or host, a GIL held for good, a stopped store
host) ends the job on every rank within ``dist.watchdog_s`` plus a beat, each rank printing one line
that names it. ``distributed.init`` starts it once the process group exists; ``distributed.shutdown``
stops it, marking the rank done so a clean exit is never taken for a hang. ``alive()`` /
``silent_ranks()`` tell the server's ``/health`` whether every rank still answers.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

log = logging.getLogger("flux_dist")

WATCHDOG_EXIT_CODE = 1
_DONE = 1 << 40  # added to a rank's beat counter when it stops cleanly: finished, not hung


def _proc_identity(pid: int) -> str | None:
    """``"boot_id pid start_time"`` of a process on this machine (Linux), to recognise a peer's process."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        stat = open(f"/proc/{pid}/stat").read()
        start = stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name
    except (OSError, IndexError):
        return None
    return f"{boot} {pid} {start}"


def _exit_now(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(WATCHDOG_EXIT_CODE)  # the main thread may sit in a collective: no clean-up can run


def _bounded(fn: Callable[[], object], timeout_s: float) -> None:
    """Run a store call that may block forever (a stopped store host) for at most ``timeout_s``."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout_s)


class Watchdog:
    """One per rank: a thread beats into the rendezvous store every ``period_s`` and reads every peer's
    beat; a second thread judges. A peer whose beat has not moved for ``window_s``, or a store that has
    not answered for ``window_s`` (its host is stopped), ends this rank at once (``on_alarm``: one
    line, then ``os._exit``), after telling every other rank through the store so they end too, naming
    the same rank, and after killing the silent peer's process when it runs on this machine (a stopped
    process ignores the launcher's SIGTERM; torchrun waits 30 s before its SIGKILL).

    The beats come from their own thread, so a long compile or a slow step on the main thread is not
    silence; a stopped process (SIGSTOP), one that holds the GIL, or a dead host is. ``stop()`` marks
    this rank done, so a clean exit is never reported as a hang.
    """

    def __init__(self, store: dist.Store, rank: int, world: int, window_s: float, *, store_where: str = "store",
                 store_host_rank: int | None = 0, on_alarm: Callable[[str], None] = _exit_now) -> None:
        self.store, self.rank, self.world, self.window_s = store, rank, world, float(window_s)
        self.period_s = min(2.0, max(0.05, self.window_s / 10))
        self.health_s = min(self.window_s, 3 * self.period_s + 1.0)  # silent_ranks(): late enough to say so
        self.store_where, self.store_host_rank, self.on_alarm = store_where, store_host_rank, on_alarm
        self.peers = [p for p in range(world) if p != rank]
        now = time.monotonic()
        self._lock = threading.Lock()
        self._seen = {p: (-1, now) for p in self.peers}  # last beat counter, when it last moved
        self._store_ok = now
        self._done: set[int] = set()
        self._identity: dict[int, str] = {}
        self._stop = threading.Event()
        self._fired = threading.Lock()
        self._threads = [threading.Thread(target=self._beat, name="flux-dist-heartbeat", daemon=True),
                         threading.Thread(target=self._judge, name="flux-dist-watchdog", daemon=True)]

    def start(self) -> Watchdog:
        # Published before watching, so a peer can kill this process however soon it stops answering.
        _bounded(lambda: self.store.set(f"identity/{self.rank}", _proc_identity(os.getpid()) or ""), 5.0)
        for t in self._threads:
            t.start()
        return self

    def stop(self, clean: bool = True) -> None:
        """Stop watching; ``clean``: tell the peers this rank finished (so its silence is no alarm)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if clean:
            _bounded(lambda: self.store.add(f"hb/{self.rank}", _DONE), 2.0)

    # -- what the server's /health asks -----------------------------------------------------------
    def ages(self) -> dict[int, float]:
        """Seconds since each peer's beat last moved (as seen here); a finished peer is left out."""
        now = time.monotonic()
        with self._lock:
            store_age = now - self._store_ok
            return {p: max(now - t, store_age) for p, (_, t) in self._seen.items() if p not in self._done}

    def silent_ranks(self, older_than_s: float | None = None) -> list[int]:
        limit = self.health_s if older_than_s is None else older_than_s
        return sorted(p for p, age in self.ages().items() if age > limit)

    # -- the two threads --------------------------------------------------------------------------
    def _beat(self) -> None:
        keys = [f"hb/{p}" for p in self.peers] + ["alarmed"]
        ready = False
        while not self._stop.is_set():
            try:
                if not ready:  # multi_get waits for a missing key: create every key it reads first
                    for k in keys:
                        self.store.add(k, 0)
                    ready = True
                self.store.add(f"hb/{self.rank}", 1)
                values = [int(v) for v in self.store.multi_get(keys)]
                if len(self._identity) < len(self.peers):
                    ids = [f"identity/{p}" for p in self.peers]
                    if self.store.check(ids):
                        self._identity = dict(zip(self.peers, (v.decode() for v in self.store.multi_get(ids)),
                                                  strict=True))
            except Exception as e:  # noqa: BLE001 - a store that errors is as silent as one that hangs
                log.debug("watchdog: store call failed: %s", e)
                self._stop.wait(self.period_s)
                continue
            now = time.monotonic()
            with self._lock:
                self._store_ok = now
                for p, v in zip(self.peers, values, strict=False):
                    if v >= _DONE:
                        self._done.add(p)
                    if v != self._seen[p][0]:
                        self._seen[p] = (v, now)
            if values[-1] and not self._stop.is_set():  # another rank raised the alarm
                text = ""
                try:
                    text = self.store.get("alarm").decode()
                except Exception:  # noqa: BLE001
                    pass
                culprit, _, why = text.partition(" ")
                self._fire(int(culprit) if culprit.isdigit() else None, why or "reported by another rank",
                           publish=False)
            self._stop.wait(self.period_s)

    def _judge(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.period_s):
            now = time.monotonic()
            if now - last > 3 * self.period_s + 1.0:
                # This process itself was stopped or starved: nothing was measured meanwhile, so start over.
                with self._lock:
                    self._store_ok = now
                    self._seen = {p: (v, now) for p, (v, _) in self._seen.items()}
            last = now
            with self._lock:
                if self._done:  # a peer finished cleanly: the job is ending, its store may go with it
                    continue
                store_age = now - self._store_ok
                silent = [(now - t, p) for p, (_, t) in self._seen.items() if now - t > self.window_s]
            if store_age > self.window_s:
                host = self.store_host_rank
                where = f"the rendezvous store it hosts at {self.store_where} has not answered either" \
                    if host is not None else f"torchrun's rendezvous store at {self.store_where} is not answering"
                self._fire(host, f"last heartbeat {store_age:.0f} s ago; {where}")
            elif silent:
                age, p = max(silent)
                self._fire(p, f"last heartbeat {age:.0f} s ago")

    def _fire(self, culprit: int | None, why: str, publish: bool = True) -> None:
        if self._stop.is_set() or not self._fired.acquire(blocking=False):
            return  # stopped cleanly, or the other thread fires already
        who = f"rank {culprit}" if culprit is not None else "the rendezvous store"
        line = f"[rank{self.rank}] flux-dist: error: {who} stopped answering ({why}); ending the job"
        if publish:  # first to notice: tell every other rank, which then ends naming the same rank
            text = f"{culprit if culprit is not None else '-'} {why}, reported by rank {self.rank}"
            _bounded(lambda: (self.store.compare_set("alarm", "", text), self.store.add("alarmed", 1)), 2.0)
        line += self._kill_if_here(culprit)
        self.on_alarm(line)

    def _kill_if_here(self, culprit: int | None) -> str:
        """SIGKILL the silent peer when it is a process of this machine (checked by boot id, pid and start
        time): a stopped process keeps a launcher waiting for its own grace period before the SIGKILL.
        Returns what was done, for the alarm line."""
        if culprit is None:
            return ""
        ident = self._identity.get(culprit)
        if not ident:
            return " (its process was not known here: not killed)"
        try:
            pid = int(ident.split()[1])
            if pid == os.getpid() or _proc_identity(pid) != ident:
                return ""  # another machine's process (or this one): its own launcher ends it
            os.kill(pid, signal.SIGKILL)
            return f" (killed its process {pid} on this machine)"
        except (ValueError, IndexError, OSError) as e:
            return f" (could not kill its process: {e})"


_watchdog: Watchdog | None = None


def store_client(name: str, timeout_s: float) -> tuple[dist.Store, str, int | None]:
    """A client of its own on the process group's rendezvous store (its own socket: a call never waits
    behind another thread's), under the prefix ``flux_dist/NAME/<restart>/``; the store's address, and
    the rank that hosts it (None: torchrun's agent). Also the serving mailbox's (``server/replicas.py``)."""
    base = dist.distributed_c10d._get_default_store()
    s = base
    while not isinstance(s, dist.TCPStore) and hasattr(s, "underlying_store"):
        s = s.underlying_store
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    prefix = f"flux_dist/{name}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    if isinstance(s, dist.TCPStore):
        client = dist.TCPStore(s.host, s.port, is_master=False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
        return dist.PrefixStore(prefix, client), f"{s.host}:{s.port}", None if agent else 0
    return dist.PrefixStore(prefix, base), type(base).__name__, None if agent else 0


def start_watchdog(window_s: float) -> Watchdog | None:
    """Start this rank's watchdog (once; after the process group exists; no-op for one process)."""
    global _watchdog
    if _watchdog is not None or not dist.is_initialized() or dist.get_world_size() == 1:
        return _watchdog
    if not isinstance(window_s, int | float) or isinstance(window_s, bool) or window_s <= 0:
        from .errors import FluxDistError

        raise FluxDistError(f"dist.watchdog_s must be a positive number of seconds (0: off), got {window_s!r}")
    store, where, host = store_client("watchdog", max(2.0, min(10.0, window_s / 2)))
    _watchdog = Watchdog(store, dist.get_rank(), dist.get_world_size(), window_s, store_where=where,
                         store_host_rank=host).start()
    return _watchdog


def stop_watchdog(clean: bool = True) -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop(clean)
        _watchdog = None


def silent_ranks(older_than_s: float | None = None) -> list[int]:
    """Ranks whose heartbeat is late (default: by more than ~3 beats, well before the watchdog ends the
    job). Empty for one process, or when the watchdog is off (``dist.watchdog_s: 0``)."""
    return [] if _watchdog is None else _watchdog.silent_ranks(older_than_s)


def alive() -> bool:
    """Whether every rank is answering: what the server's ``/health`` should check on rank 0."""
    return not silent_ranks()
