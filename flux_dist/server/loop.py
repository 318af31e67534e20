"""The serving loop every rank runs: rank 0 broadcasts one message at a time, all ranks act on it.

Messages (a tuple, sent with ``broadcast_object_list`` from rank 0):

- ``("job", id, [request dicts])``: every rank runs ``Engine.generate`` on the same requests
  (``lockstep.run_together``), then the ranks agree on the outcome with one ``all_reduce``, so a
  failure on any rank is a failure of the job on all of them and nobody is left waiting in a
  collective. Before every denoise step the ranks agree whether to stop the job there (its deadline,
  its client gone, a stop signal: rank 0 knows; ``lockstep.step_control``).
- ``("ping",)``: sent while idle, so the waiting ranks' broadcast never reaches the process-group
  timeout and a dead peer is noticed while idle, not only at the next request.
- ``("stop",)``: every rank leaves the loop and exits 0.

A failed collective (peer died, timeout) is fatal: the ranks may be out of step, so the loop ends
and the process exits non-zero rather than serving half-alive.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import RequestConfig
from ..lockstep import FatalError, JobOutcome, RequestStopped, broadcast, run_together, step_control
from .jobs import Job, JobQueue

__all__ = ["FatalError", "Job", "JobOutcome", "LoopHooks", "RequestStopped", "StopSignal", "broadcast",
           "run_together", "serve_loop"]

log = logging.getLogger("flux_dist")

JOB, PING, STOP = "job", "ping", "stop"


class StopSignal:
    """SIGTERM / SIGINT -> a flag the loop reads between messages."""

    def __init__(self, exit_on_second: bool = True) -> None:
        self.event = threading.Event()
        self.when = 0.0
        # Rank 0: a second signal is the user insisting. Other ranks: under torchrun the agent's own
        # SIGTERM follows the user's SIGINT; they keep waiting for rank 0's stop message instead.
        self.exit_on_second = exit_on_second

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; the caller stops us itself
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            if not self.exit_on_second:
                return
            import os

            log.error("second signal %d: exiting now", signum)
            os._exit(1)
        self.when = time.monotonic()
        self.event.set()

    def set(self) -> None:
        self.when = time.monotonic()
        self.event.set()


@dataclass
class LoopHooks:
    """Rank 0's callbacks into the front end (no-ops on the other ranks)."""

    on_ready: Callable[[], None] = lambda: None
    on_done: Callable[[Job, JobOutcome], None] = lambda job, out: None
    on_fatal: Callable[[str], None] = lambda msg: None


def serve_loop(
    engine: Any,
    jobs: JobQueue | None,
    stop: StopSignal,
    *,
    heartbeat_s: float = 5.0,
    stop_grace_s: float = 30.0,
    hooks: LoopHooks | None = None,
) -> int:
    """Run until a stop message (0) or a failed collective (1). Every rank calls this.

    Rank 0 passes the job queue its HTTP threads fill; the other ranks pass None. A stop signal on a
    non-zero rank waits up to ``stop_grace_s`` for rank 0's stop message (under torchrun every rank
    gets the signal; leaving alone would turn a clean shutdown into a failure on rank 0).
    """
    hooks = hooks or LoopHooks()
    main = engine.dist.is_main
    dev = engine.dist.device
    try:
        hooks.on_ready()  # the caller's start-up exchange has seen every rank: ready
        last_sent = time.monotonic()
        while True:
            job: Job | None = None
            if main:
                assert jobs is not None
                msg = None
                while msg is None:
                    if stop.event.is_set():
                        msg = (STOP,)
                        break
                    try:
                        job = jobs.get(timeout=min(0.2, heartbeat_s))
                    except queue.Empty:
                        if time.monotonic() - last_sent >= heartbeat_s:
                            msg = (PING,)
                        continue
                    if not job.future.set_running_or_notify_cancel():
                        job = None  # its client gave up while it waited
                        continue
                    job.started = time.perf_counter()
                    msg = (JOB, job.id, [dataclasses.asdict(r) for r in job.requests])
            else:
                msg = None
            msg = broadcast(msg, dev)
            last_sent = time.monotonic()
            kind = msg[0]
            if kind == STOP:
                log.info("stop message: leaving the serving loop")
                return 0
            if not main and stop.event.is_set() and time.monotonic() - stop.when > stop_grace_s:
                log.error("signalled %.0f s ago and rank 0 sent no stop message: exiting", stop_grace_s)
                return 1
            if kind == PING:
                continue
            requests = [RequestConfig(**d) for d in msg[2]]
            # Rank 0 decides whether to stop (deadline, client gone, stop signal); every rank takes the verdict at
            # the same step.
            check = functools.partial(job.stop_reason, stop.event) if job is not None else None
            start = time.time()
            try:
                outcome = run_together(engine, requests, control=step_control(dev, check))
            except FatalError as e:
                if job is not None:
                    job.future.set_exception(e)
                raise
            if job is not None:
                job.layout, job.start, job.end = engine.mesh.name, start, time.time()
                hooks.on_done(job, outcome)
                job.future.set_result(outcome)
    except Exception as e:  # noqa: BLE001 - a broken process group ends the server on every rank
        text = f"serving loop ended: {type(e).__name__}: {e}"
        log.error(text)
        hooks.on_fatal(text)
        return 1
