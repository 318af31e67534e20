"""Rank 0's job queue: what the HTTP front end hands the serving loop, and the server's health state.

The front end (any thread or event loop) calls ``submit``; the serving loop on the main thread calls
``get``. A ``Job`` carries its deadline and a "client gone" flag, which rank 0 reads at every denoise
step (``stop_reason``) so a request can be stopped mid-way, every rank at the same step.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..config import RequestConfig
from ..lockstep import CANCELLED, DEADLINE, SHUTDOWN
from ..watchdog import silent_ranks


class QueueFull(Exception):
    """More than ``max_queue`` jobs wait: the client should retry later (429)."""


class NotReady(Exception):
    """Starting, stopping, or a rank failed: nothing is accepted (503). The message says which."""


@dataclass
class Job:
    """One queued unit of work (one HTTP request, n images) and the future its HTTP handler waits on."""

    id: int
    requests: list[RequestConfig]
    deadline: float | None = None  # time.monotonic() after which the job is stopped at the next step
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    client_gone: threading.Event = field(default_factory=threading.Event)
    # Where and when it ran (the reply's timings): the replica group, the layout (REPLICASxDEGREE), and the
    # Unix times its compute started and ended.
    replica: int = 0
    layout: str = ""
    start: float = 0.0
    end: float = 0.0

    def stop_reason(self, stopping: threading.Event) -> str | None:
        """Why the running job should stop now (rank 0 asks before every denoise step), or None."""
        if stopping.is_set():
            return SHUTDOWN
        if self.client_gone.is_set():
            return CANCELLED
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return DEADLINE
        return None


class JobQueue:
    """A bounded FIFO of jobs plus the server's state (starting / ready / stopping / down)."""

    def __init__(self, max_queue: int) -> None:
        self._q: queue.Queue[Job] = queue.Queue(maxsize=max(1, max_queue))
        self.ready = threading.Event()
        self.stopping = threading.Event()  # set from the stop signal on (shared with StopSignal)
        self.down_reason: str | None = None
        self._ids = itertools.count(1)

    @property
    def maxsize(self) -> int:
        return self._q.maxsize

    def qsize(self) -> int:
        return self._q.qsize()

    def status(self) -> tuple[bool, str, str | None]:
        """``(accepting, state, reason)``; state is ready, starting, stopping or down."""
        if self.stopping.is_set() and self.down_reason is None:
            return False, "stopping", "shutting down"
        silent = silent_ranks()  # the watchdog's view: late heartbeats, seconds before it ends the job
        if silent and self.down_reason is None:
            return False, "down", f"rank(s) {', '.join(map(str, silent))} not answering"
        if self.ready.is_set():
            return True, "ready", None
        return False, ("down" if self.down_reason else "starting"), self.down_reason

    def submit(self, requests: list[RequestConfig], deadline: float | None) -> Job:
        ok, state, reason = self.status()
        if not ok:
            raise NotReady(reason or state)
        job = Job(next(self._ids), requests, deadline)
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.maxsize} waiting); retry later") from None
        return job

    def get(self, timeout: float) -> Job:
        """The next job (``queue.Empty`` after ``timeout``); the serving loop's side."""
        return self._q.get(timeout=timeout)

    def mark_ready(self) -> None:
        self.ready.set()

    def mark_down(self, reason: str) -> None:
        """Not ready from now on (a rank died, or shutting down); queued jobs are cancelled (answered 503)."""
        self.down_reason = reason
        self.ready.clear()
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            job.future.cancel()
