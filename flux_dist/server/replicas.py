"""Replica groups serving at once (``--replicas R``, ``--layouts``): rank 0 hands each job to a free group.

Rank 0 runs a dispatcher thread beside its HTTP thread. Each group's first rank (its leader) reads its own
mailbox in the rendezvous store (a store client of its own, ``watchdog.store_client``), so a group takes
work while rank 0's own group computes; the leader broadcasts what it reads to its group on the group's
process group, and the group runs it as the one-group loop does (``lockstep``: the same requests, one
agreed outcome, a stop taken by every rank of the group at the same step). The leader puts the outcome
(the images, the metrics, where and when it ran) back in the store; the dispatcher answers the job.

Store keys (prefix ``flux_dist/serve/<restart>/``):

- ``box/E/G/N``: the N-th message to group G of layout epoch E: ``("job", id, [request dicts])``,
  ``("layout", name)`` (every rank switches to that layout; the epoch counts switches) or ``("stop",)``.
- ``stop/ID``: the running job ID must stop before its next step (deadline, client gone, shutdown);
  the leader reads it at every step boundary (rank 0 knows; the leader asks).
- ``done/ID``: ``(replica, layout, start, end, JobOutcome)`` from the leader.
- ``fatal``: a group lost a collective: every group leaves and the server goes down.

Layouts (``--layouts``): the dispatcher switches only when every group is idle and a job waits, to
``layouts.pick_layout``'s choice for the queue's depth. An idle leader pings its group every
``heartbeat_s`` (a broadcast), so a waiting member never reaches the collective timeout.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pickle
import queue
import threading
import time
from typing import Any

from ..config import RequestConfig
from ..layouts import pick_layout
from ..lockstep import FatalError, broadcast, run_together, step_control
from ..watchdog import store_client
from .jobs import Job, JobQueue
from .loop import LoopHooks, StopSignal

log = logging.getLogger("flux_dist")

JOB, LAYOUT, PING, STOP, FATAL = "job", "layout", "ping", "stop", "fatal"
POLL_S = 0.01  # how often an idle leader looks at its mailbox, and the dispatcher at its groups


def _client() -> Any:
    return store_client("serve", 60.0)[0]


class Dispatcher:
    """Rank 0's thread: the job queue -> free groups of the current layout; their answers -> the jobs."""

    def __init__(self, jobs: JobQueue, layouts: list, stop: StopSignal, hooks: LoopHooks) -> None:
        self.jobs, self.layouts, self.stop, self.hooks = jobs, layouts, stop, hooks
        self.store = _client()
        self.layout, self.epoch = layouts[0], 0
        self.seq: dict[int, int] = {}  # group -> its next mailbox number in this epoch
        self.running: dict[int, Job] = {}  # group -> its job
        self.flagged: set[int] = set()  # jobs told to stop
        self.thread = threading.Thread(target=self._run, name="flux-dist-dispatcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _send(self, group: int, msg: tuple) -> None:
        n = self.seq.get(group, 0)
        self.seq[group] = n + 1
        self.store.set(f"box/{self.epoch}/{group}/{n}", pickle.dumps(msg))

    def _run(self) -> None:
        last_fatal_check = 0.0
        try:
            while True:
                if time.monotonic() - last_fatal_check > 0.25:
                    last_fatal_check = time.monotonic()
                    if self.store.check([FATAL]):
                        return self._fatal(self.store.get(FATAL).decode())
                self._collect()
                self._stop_running()
                if self.stop.event.is_set():
                    if not self.running:  # every job answered: tell every group to leave
                        for g in range(self.layout.replicas):
                            self._send(g, (STOP,))
                        return
                else:
                    self._assign()
                time.sleep(POLL_S)
        except Exception as e:  # noqa: BLE001 - a dispatcher bug must take the server down, not hang it
            log.exception("dispatcher failed")
            text = f"the dispatcher failed: {type(e).__name__}: {e}"
            try:
                self.store.compare_set(FATAL, "", text)
            finally:
                self._fatal(text)

    def _fatal(self, text: str) -> None:
        for job in self.running.values():
            job.future.set_exception(FatalError(text))
        self.running.clear()
        self.hooks.on_fatal(f"serving loop ended: {text}")

    def _collect(self) -> None:
        for g, job in list(self.running.items()):
            key = f"done/{job.id}"
            if not self.store.check([key]):
                continue
            replica, layout, start, end, outcome = pickle.loads(self.store.get(key))
            self.store.delete_key(key)
            if job.id in self.flagged:
                self.flagged.discard(job.id)
                self.store.delete_key(f"stop/{job.id}")
            job.replica, job.layout, job.start, job.end = replica, layout, start, end
            del self.running[g]
            self.hooks.on_done(job, outcome)
            job.future.set_result(outcome)

    def _stop_running(self) -> None:
        for job in self.running.values():
            if job.id not in self.flagged and (reason := job.stop_reason(self.stop.event)):
                self.store.set(f"stop/{job.id}", reason)
                self.flagged.add(job.id)

    def _assign(self) -> None:
        waiting = self.jobs.qsize()
        if not waiting:
            return
        if not self.running and len(self.layouts) > 1:  # every group idle: the layout may change here
            want = pick_layout(self.layouts, waiting)
            if want != self.layout:
                for g in range(self.layout.replicas):
                    self._send(g, (LAYOUT, want.name))
                log.info("layout %s -> %s (%d waiting)", self.layout.name, want.name, waiting)
                self.layout, self.epoch, self.seq = want, self.epoch + 1, {}
        for g in range(self.layout.replicas):
            if g in self.running:
                continue
            job = None
            while job is None:
                try:
                    job = self.jobs.get(timeout=0)
                except queue.Empty:
                    return
                if not job.future.set_running_or_notify_cancel():
                    job = None  # its client gave up while it waited
            job.started = time.perf_counter()
            self.running[g] = job
            self._send(g, (JOB, job.id, [dataclasses.asdict(r) for r in job.requests]))


def _stop_reason(store: Any, job_id: int) -> str | None:
    """The leader's check before every step: has rank 0 told this job to stop?"""
    key = f"stop/{job_id}"
    return store.get(key).decode() if store.check([key]) else None


def _next_message(store: Any, key: str, heartbeat_s: float) -> tuple:
    """The leader's mailbox message, else a ping once ``heartbeat_s`` has passed (or the fatal news)."""
    t0 = time.monotonic()
    while True:
        if store.check([key]):
            msg = pickle.loads(store.get(key))
            store.delete_key(key)
            return msg
        if time.monotonic() - t0 >= heartbeat_s:
            return (FATAL, store.get(FATAL).decode()) if store.check([FATAL]) else (PING,)
        time.sleep(POLL_S)


def group_loop(engine: Any, stop: StopSignal, *, heartbeat_s: float, stop_grace_s: float = 30.0) -> int:
    """Every rank: serve the jobs its group's leader reads, switching layouts when told. 0 after a stop
    message, 1 when a collective failed (here or in another group)."""
    store, dev = _client(), engine.dist.device
    name, epoch, seq = engine.layouts[0].name, 0, 0
    try:
        while True:
            mesh = engine.use_layout(name)
            key = f"box/{epoch}/{mesh.replica}/{seq}"
            msg = _next_message(store, key, heartbeat_s) if mesh.is_leader else None
            msg = broadcast(msg, dev, team=mesh)
            kind = msg[0]
            if kind not in (PING, FATAL):
                seq += 1
            if kind == STOP:
                log.info("stop message: leaving the serving loop")
                return 0
            if kind == FATAL:
                log.error("another group failed (%s): leaving", msg[1])
                return 1
            if engine.dist.rank != 0 and stop.event.is_set() and time.monotonic() - stop.when > stop_grace_s:
                log.error("signalled %.0f s ago and rank 0 sent no stop message: exiting", stop_grace_s)
                return 1
            if kind == LAYOUT:
                name, epoch, seq = msg[1], epoch + 1, 0
            elif kind == JOB:
                _run_job(engine, store, mesh, msg)
    except Exception as e:  # noqa: BLE001 - a broken process group ends the server on every rank
        text = f"serving loop ended: {type(e).__name__}: {e}"
        log.error(text)
        try:
            store.compare_set(FATAL, "", f"rank {engine.dist.rank}: {type(e).__name__}: {e}")
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0
            pass
        return 1


def _run_job(engine: Any, store: Any, mesh: Any, msg: tuple) -> None:
    _, job_id, reqs = msg
    check = functools.partial(_stop_reason, store, job_id) if mesh.is_leader else None
    start = time.time()
    outcome = run_together(engine, [RequestConfig(**d) for d in reqs],
                           control=step_control(engine.dist.device, check, team=mesh), team=mesh)
    end = time.time()
    if mesh.is_leader:  # the images go to rank 0; the latents stay here
        outcome.results = [dataclasses.replace(r, latents=None) for r in outcome.results]
        store.set(f"done/{job_id}", pickle.dumps((mesh.replica, mesh.name, start, end, outcome)))


def serve_groups(engine: Any, jobs: JobQueue | None, stop: StopSignal, *, heartbeat_s: float,
                 hooks: LoopHooks | None = None) -> int:
    """The replica-group server on every rank (rank 0 passes the job queue and runs the dispatcher too)."""
    hooks = hooks or LoopHooks()
    dispatcher = None
    if jobs is not None:
        dispatcher = Dispatcher(jobs, engine.layouts, stop, hooks)
        dispatcher.start()
        log.info("replica groups: layouts %s (rule: the widest whose groups start every waiting request)",
                 ", ".join(lay.name for lay in engine.layouts))
    hooks.on_ready()
    code = group_loop(engine, stop, heartbeat_s=heartbeat_s)
    if code and jobs is not None:
        hooks.on_fatal("serving loop ended: a group failed")
    if dispatcher is not None:
        dispatcher.thread.join(timeout=5.0)
    return code
