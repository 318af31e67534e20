"""The serving loop every rank runs: rank 0 broadcasts one message at a time, all ranks act on it.

Messages (a tuple, sent with ``broadcast_object_list`` from rank 0):

- ``("job", id, [request dicts])``: every rank runs ``Engine.generate`` on the same requests, then
  the ranks agree on success with one ``all_reduce(MIN)``, so a failure on any rank is a failure of
  the job on all of them and nobody is left waiting in a collective.
- ``("ping",)``: sent while idle, so the waiting ranks' broadcast never reaches the process-group
  timeout and a dead peer is noticed while idle, not only at the next request.
- ``("stop",)``: every rank leaves the loop and exits 0.

A failed collective (peer died, timeout) is fatal: the ranks may be out of step, so the loop ends
and the process exits non-zero rather than serving half-alive.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..config import RequestConfig
from ..errors import FluxDistError

log = logging.getLogger("flux_dist")

JOB, PING, STOP = "job", "ping", "stop"


class FatalError(RuntimeError):
    """The ranks can no longer be trusted to be in step: end the server."""


@dataclass
class Job:
    """One queued unit of work (one HTTP request, n images) and the future its HTTP thread waits on."""

    id: int
    requests: list[RequestConfig]
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0


@dataclass
class JobOutcome:
    """What every rank knows after a job: all ranks succeeded (results on rank 0) or the errors."""

    ok: bool
    results: list[Any]  # engine Results (rank 0 holds the images)
    errors: list[str]  # one line per failing rank, "rank R: message"
    bad_request: bool = False  # every failing rank raised FluxDistError: the input's fault (400)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast(msg: tuple | None, device: torch.device) -> tuple:
    """Rank 0's ``msg`` on every rank (``msg`` is ignored elsewhere)."""
    if _world() == 1:
        assert msg is not None
        return msg
    box = [msg]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def run_together(engine: Any, requests: list[RequestConfig]) -> JobOutcome:
    """Generate ``requests`` on every rank, then agree on the outcome (call on every rank, same requests).

    An exception on one rank is caught there; the agreement makes it a failure of the job everywhere.
    A failed collective (``torch.distributed.DistError``) is re-raised as ``FatalError``.
    """
    results: list[Any] = []
    err: BaseException | None = None
    try:
        for r in requests:
            results.append(engine.generate(r))
    except dist.DistError as e:
        raise FatalError(f"a collective failed during a job: {e}") from e
    except Exception as e:  # noqa: BLE001 - any model failure must be reported, not kill the rank
        err = e
        log.error("job failed on this rank: %s: %s", type(e).__name__, e)
    if _world() == 1:
        msgs = [] if err is None else [f"rank 0: {err}"]
        return JobOutcome(err is None, results, msgs, isinstance(err, FluxDistError))
    dev = engine.dist.device
    try:
        flags = torch.tensor([0 if err is None else 1, 0 if err is None or isinstance(err, FluxDistError) else 1],
                             device=dev, dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        failed, model_failed = (bool(v) for v in flags.tolist())
        errors: list[str] = []
        if failed:  # rare path: every rank knows it is taken, so this collective is matched too
            gathered: list[Any] = [None] * _world()
            dist.all_gather_object(gathered, None if err is None else f"{type(err).__name__}: {err}")
            errors = [f"rank {r}: {m}" for r, m in enumerate(gathered) if m is not None]
    except Exception as e:
        raise FatalError(f"the ranks could not agree on a job's outcome: {e}") from e
    return JobOutcome(not failed, results if not failed else [], errors, failed and not model_failed)


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
    jobs: queue.Queue | None,
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
            try:
                outcome = run_together(engine, requests)
            except FatalError as e:
                if job is not None:
                    job.future.set_exception(e)
                raise
            if job is not None:
                hooks.on_done(job, outcome)
                job.future.set_result(outcome)
    except Exception as e:  # noqa: BLE001 - a broken process group ends the server on every rank
        text = f"serving loop ended: {type(e).__name__}: {e}"
        log.error(text)
        hooks.on_fatal(text)
        return 1
