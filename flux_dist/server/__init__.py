"""HTTP serving: rank 0 answers HTTP, every rank runs the same serving loop (``loop.py``; with replica
groups, ``replicas.py``: rank 0 hands each job to a free group).

``serve(cfg, engine, host, port, ...)`` is the one entry point; torchrun (``flux-dist serve``), a
Slurm job or a Ray actor calls it on every rank once the engine is loaded, and it returns the
process exit code (0 after a stop, non-zero when the ranks lost each other).
"""

from __future__ import annotations

import logging
from typing import Any

from .. import distributed
from ..config import RunConfig
from ..errors import FluxDistError
from ..lockstep import FatalError, JobOutcome, RequestStopped, broadcast, run_together
from .app import RequestValidator, create_app
from .http import FrontEnd
from .jobs import Job, JobQueue
from .loop import LoopHooks, StopSignal, serve_loop
from .protocol import DEFAULT_MAX_WORK
from .schema import ServeOptions

__all__ = ["FatalError", "Job", "JobOutcome", "JobQueue", "RequestStopped", "RequestValidator", "ServeOptions",
           "StopSignal", "create_app", "public_adapters", "serve", "serve_jobs", "run_together"]

log = logging.getLogger("flux_dist")


def serve(
    cfg: RunConfig,
    engine: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_key: str | None = None,
    max_queue: int = 16,
    max_images: int = 4,
    request_timeout_s: float = 600.0,
    max_work: int | None = DEFAULT_MAX_WORK,
    read_timeout_s: float = 10.0,
    max_connections: int = 64,
    heartbeat_s: float | None = None,
    stop: StopSignal | None = None,
    on_listening: Any = None,
) -> int:
    """Serve until stopped; call on every rank with the same arguments. Returns the exit code.

    ``stop`` lets an embedding launcher stop the server itself; by default SIGTERM / SIGINT do.
    ``on_listening(host, port)`` is called on rank 0 once the socket is bound (port 0 -> the real one).
    """
    opts = ServeOptions(host, port, api_key or None, max_queue, max_images, request_timeout_s, max_work,
                        read_timeout_s, max_connections)
    opts.check()
    main = engine.dist.is_main
    front: FrontEnd | None = None
    err: str | None = None
    if main:
        validator = RequestValidator(cfg.request, engine.validate, engine.true_cfg, engine.c.name,
                                     public_adapters(engine), cfg.limits)
        try:
            front = FrontEnd(opts, validator)
        except OSError as e:
            err = f"cannot listen on {host}:{port}: {e}"
        else:
            try:
                front.start()  # answers 503 "starting" until the loop marks it ready
            except RuntimeError as e:
                front.close()
                front, err = None, f"the HTTP server on {host}:{port} did not start: {e}"

    def listening() -> None:
        assert front is not None
        h, p = front.address
        log.info("serving %s on http://%s:%d%s (queue %d, up to %d images a request, deadline %g s, work limit %s)",
                 engine.c.name, h, p, " with an API key" if api_key else "", max_queue, max_images, request_timeout_s,
                 max_work)
        if on_listening is not None:
            on_listening(h, p)

    try:
        return serve_jobs(cfg, engine, front.jobs if front else None, err=err, heartbeat_s=heartbeat_s, stop=stop,
                          on_serving=listening)
    finally:
        if front is not None:
            front.close()


def public_adapters(engine: Any) -> list[dict]:
    """The LoRA adapters loaded at start, as ``GET /v1/models`` lists them (names, ranks; no paths)."""
    lora = getattr(engine, "lora", None)
    return [{k: v for k, v in a.items() if k != "path"} for a in lora.describe()] if lora else []


def serve_jobs(cfg: RunConfig, engine: Any, jobs: JobQueue | None, *, err: str | None = None,
               heartbeat_s: float | None = None, stop: StopSignal | None = None,
               on_serving: Any = None) -> int:
    """The serving part every transport shares; call on every rank, rank 0 with the ``JobQueue`` its
    transport fills (HTTP here, a Ray Serve replica in ``serve_ray``), the others with None.

    A start-up barrier (rank 0's ``err`` takes every rank down with that message), the short collective
    timeout, the stop signal, then ``serve_loop`` marking ``jobs`` ready / down. Returns the exit code.
    """
    main = engine.dist.is_main
    # Doubles as the start-up barrier: every rank has its engine once this returns, and a rank 0
    # that cannot listen takes every rank down with the same message.
    status = broadcast(("start", err), engine.dist.device)
    if status[1]:
        raise FluxDistError(status[1])
    # Serving from here: a dead peer should fail the next collective in minutes, not the start-up timeout.
    distributed.set_timeout(cfg.dist.timeout_s)
    hb = heartbeat_s if heartbeat_s is not None else max(0.5, min(5.0, cfg.dist.timeout_s / 4))
    stop = stop or StopSignal(exit_on_second=main)
    stop.install()
    hooks = LoopHooks()
    if jobs is not None:
        jobs.stopping = stop.event  # /health says 503 from the signal on, not only once the loop is left
        if on_serving is not None:
            on_serving()
        hooks = LoopHooks(on_ready=jobs.mark_ready, on_fatal=jobs.mark_down)
    code = 1
    try:
        if len(engine.layouts) > 1 or engine.layouts[0].replicas > 1:  # replica groups (--replicas, --layouts)
            from .replicas import serve_groups

            code = serve_groups(engine, jobs, stop, heartbeat_s=hb, hooks=hooks)
        else:  # one group of every rank: rank 0 broadcasts each job
            code = serve_loop(engine, jobs, stop, heartbeat_s=hb, hooks=hooks)
    finally:
        if jobs is not None:
            jobs.mark_down("shutting down" if code == 0 else "a rank failed")
    log.info("server stopped (exit %d)", code)
    return code
