"""One rank of a Ray Serve replica: the engine and torchrun's serving loop, rank 0's jobs handed in by Ray calls.

``serve`` runs for the replica's whole life (``server.serve_jobs``, the loop `flux-dist serve` runs, minus
the socket); the other methods answer meanwhile (the actor is threaded): ``started`` (rank 0: what the
loaded engine accepts, once the loop is ready), ``submit`` / ``cancel`` (rank 0: one job, and its client
leaving), ``stop`` (a clean stop on every rank).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import RequestConfig, RunConfig
from ..launch_ray import RankActor
from ..validation import RequestRules


@dataclass
class EngineFacts:
    """What the replica's app needs from rank 0's engine (plain data, as the validator and ``/v1/models``)."""

    model: str
    rules: RequestRules
    adapters: list[dict] = field(default_factory=list)
    layout: dict = field(default_factory=dict)


class ServeRank(RankActor):
    """A rank actor (``launch_ray.RankActor``: placement, rendezvous) that serves instead of generating once."""

    def __init__(self) -> None:
        from ..server.loop import StopSignal

        self.stop_signal = StopSignal(exit_on_second=False)  # never installed: the actor's thread is not main
        self.jobs: Any = None  # rank 0's JobQueue, once the engine is loaded
        self.facts: EngineFacts | None = None
        self.running: dict[int, Any] = {}  # the replica's job id -> rank 0's Job

    def serve(self, cfg: RunConfig, env: dict[str, str], max_queue: int) -> int:
        """Every rank: load, then serve until ``stop`` (returns 0); a failed serving loop raises."""
        os.environ.update(env)
        from .. import distributed
        from ..engine import Engine
        from ..server import JobQueue, public_adapters, serve_jobs

        info = distributed.init(cfg.model.device, cfg.dist.startup_timeout_s, cfg.dist.watchdog_s)
        engine = Engine(cfg, info)
        jobs = None
        if info.is_main:
            jobs = JobQueue(max_queue)
            self.facts = EngineFacts(engine.c.name, engine.rules(), public_adapters(engine), engine.mesh.describe())
            self.jobs = jobs
        code = serve_jobs(cfg, engine, jobs, stop=self.stop_signal)
        if code:
            raise RuntimeError(f"rank {info.rank}: the serving loop ended with exit code {code} (a rank failed; "
                               "see its log)")
        engine.close()
        return 0

    def started(self) -> EngineFacts:
        """Rank 0: returns once its serving loop accepts jobs (the replica gives up on its own deadline)."""
        while self.jobs is None or not self.jobs.ready.is_set():
            time.sleep(0.05)
        assert self.facts is not None
        return self.facts

    def submit(self, key: int, requests: list[RequestConfig], remaining_s: float | None) -> Any:
        """Rank 0: run one job through the serving loop; its ``JobOutcome`` (images, no latents)."""
        deadline = None if remaining_s is None else time.monotonic() + remaining_s  # this host's clock
        job = self.jobs.submit(requests, deadline)
        self.running[key] = job
        try:
            outcome = job.future.result()  # FatalError (the loop ended), CancelledError (dropped): raised
        finally:
            self.running.pop(key, None)
        outcome.results = [dataclasses.replace(r, latents=None) for r in outcome.results]
        return outcome

    def cancel(self, key: int) -> None:
        """Rank 0: the job's client left (stopped at the next step, every rank together)."""
        job = self.running.get(key)
        if job is not None:
            job.client_gone.set()
            job.future.cancel()

    def stop(self) -> None:
        self.stop_signal.set()
