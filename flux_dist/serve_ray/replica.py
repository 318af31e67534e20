"""The Ray Serve deployment: a replica is one placement group of one ``ServeRank`` actor per rank.

Serve reserves each replica's placement group (``placement_group_bundles``: one bundle per rank, see
``build``); the replica actor itself holds no CPU or GPU and sits in bundle 0 beside rank 0. Its
constructor starts one rank per bundle with ``launch_ray``'s pieces (the torchrun variables, the
rendezvous on rank 0's node), waits until rank 0's serving loop is ready, and builds the app.

The app is `flux-dist serve`'s own FastAPI app (``server.create_app``), mounted with ``@serve.ingress``
and built per replica (``__serve_build_asgi_app__``) over this replica's ``JobQueue`` and a validator made
from rank 0's engine (``Engine.rules()``): the same routes, checks, error bodies and metrics as under
torchrun. (Chosen over proxying to an HTTP server on rank 0: one HTTP hop, no port to open on a rank's
node, and the handlers see Serve's request directly: a client that leaves cancels its job.) Every
response carries ``x-flux-dist-replica``.

A pump thread hands the queued jobs, one at a time, to rank 0 (``ServeRank.submit``), whose serving loop
broadcasts each to every rank; a client that leaves is passed on (``cancel``), a deadline travels as the
seconds left. A watcher thread runs ``launch_ray.watch`` over the ranks' ``serve`` calls: the first rank
that raises or dies marks the replica down (503s), kills the other ranks, and makes ``check_health``
raise, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any

from ray import serve

from ..config import RunConfig
from ..errors import FluxDistError
from ..launch_ray import RankFailedError, rendezvous, start_actors, stop_ranks, watch
from ..server.schema import ServeOptions
from .rank import ServeRank

log = logging.getLogger("flux_dist")

REPLICA_HEADER = "x-flux-dist-replica"
RANK_CONCURRENCY = 8  # serve + started + submit + cancel + stop + where, at once
RENDEZVOUS_TIMEOUT_S = 300.0  # the rank actors' processes start (their bundles are already reserved)


class _ReplicaHeader:
    """ASGI middleware: every response names the replica that answered."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app, self.tag = app, replica.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), (REPLICA_HEADER.encode(), self.tag)]}
            await send(msg)

        await self.app(scope, receive, tagged)


@serve.deployment(name="FluxDist", ray_actor_options={"num_cpus": 0})
@serve.ingress()
class FluxDist:
    """One replica; see the module doc. ``cfg``: a serving config whose ``model.device`` is cpu or cuda."""

    async def __init__(self, cfg: RunConfig, opts: ServeOptions, start_timeout_s: float = 1800.0) -> None:
        import ray
        from ray.util import get_current_placement_group

        from ..server import JobQueue

        self.tag = serve.get_replica_context().replica_tag
        if not log.handlers:  # this process's flux_dist lines (the ranks tag theirs "[rankN]")
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(f"[replica {self.tag}] %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        self.failed: str | None = None
        self.closing = threading.Event()
        self.jobs = JobQueue(opts.max_queue)
        self.actors: list[Any] = []
        pg = get_current_placement_group()
        p = cfg.parallel
        world = p.ulysses * p.ring * p.cfg_parallel
        if pg is None or len(pg.bundle_specs) != world:
            raise FluxDistError(f"the replica needs a placement group of {world} bundles (one per rank): deploy "
                                "it with flux_dist.serve_ray:build")
        bundle = {k: v for k, v in pg.bundle_specs[0].items() if k in ("CPU", "GPU")}
        try:
            self.actors = start_actors(ray, ServeRank, pg, bundle, world, max_concurrency=RANK_CONCURRENCY)
            rv = await asyncio.to_thread(rendezvous, ray, self.actors, RENDEZVOUS_TIMEOUT_S)
            self.pids, self.master, self.nodes = rv.pids, rv.master, rv.nodes
            self.refs = {a.serve.remote(cfg, e, opts.max_queue): r
                         for r, (a, e) in enumerate(zip(self.actors, rv.envs, strict=True))}
            threading.Thread(target=self._watch, name="flux-dist-watch", daemon=True).start()
            facts = await self._started(start_timeout_s)
            from ..server import RequestValidator, create_app

            validator = RequestValidator(cfg.request, facts.rules, facts.rules.true_cfg, facts.model, facts.adapters,
                                         cfg.limits)
            self.http = create_app(opts, validator, self.jobs)  # (`app` is Serve's own attribute)
            self.http.add_middleware(_ReplicaHeader, replica=self.tag)
        except BaseException:
            self.closing.set()
            stop_ranks(ray, self.actors)
            raise
        self.layout = facts.layout
        self.jobs.mark_ready()
        threading.Thread(target=self._pump, name="flux-dist-pump", daemon=True).start()
        log.info("replica %s: %d ranks (%s), rendezvous %s, %d node(s), pids %s", self.tag, world, bundle,
                 self.master, self.nodes, self.pids)

    def __serve_build_asgi_app__(self) -> Any:
        return self.http

    async def _started(self, timeout_s: float) -> Any:
        """Rank 0's engine facts once its loop is ready; raises if a rank fails first or time runs out."""
        fut = asyncio.wrap_future(self.actors[0].started.remote().future())
        deadline = time.monotonic() + timeout_s
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.5)
            if done:
                return fut.result()
            if self.failed:
                raise FluxDistError(f"replica {self.tag}: a rank failed while starting: {self.failed}")
            if time.monotonic() > deadline:
                raise FluxDistError(f"replica {self.tag}: the ranks were not serving within {timeout_s:g} s")

    # -- the two threads --------------------------------------------------------------------------
    def _watch(self) -> None:
        import ray

        try:
            watch(ray, self.refs, self.pids, float("inf"), 1.0, 3.0)
            reason = "the ranks left the serving loop"
        except RankFailedError as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - the watch itself failed: as bad as a rank failing
            reason = f"watching the ranks failed: {type(e).__name__}: {e}"
        self._down(reason)

    def _pump(self) -> None:
        try:
            self._pump_jobs()
        except Exception as e:  # noqa: BLE001 - a replica that cannot reach its ranks is down
            self._down(f"handing jobs to rank 0 failed: {type(e).__name__}: {e}")

    def _down(self, reason: str) -> None:
        import ray

        if self.closing.is_set() or self.failed:
            return
        self.failed = reason
        log.error("replica %s: %s; failing health checks so Ray Serve replaces it", self.tag, reason)
        self.jobs.mark_down(f"a rank failed: {reason.splitlines()[0]}")
        stop_ranks(ray, self.actors)  # no survivor waits in a collective

    def _pump_jobs(self) -> None:
        import ray

        from ..lockstep import FatalError

        while not self.closing.is_set() and self.failed is None:
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            if not job.future.set_running_or_notify_cancel():
                continue  # its client left while it waited
            job.started = time.perf_counter()
            left = None if job.deadline is None else max(0.0, job.deadline - time.monotonic())
            ref = self.actors[0].submit.remote(job.id, job.requests, left)
            cancelled = False
            done: list[Any] = []
            while not done and self.failed is None:
                done, _ = ray.wait([ref], timeout=0.2)
                if not done and job.client_gone.is_set() and not cancelled:
                    self.actors[0].cancel.remote(job.id)
                    cancelled = True
            try:
                if not done:
                    raise FatalError(self.failed or "the replica is down")
                job.future.set_result(ray.get(ref))
            except Exception as e:  # noqa: BLE001 - answered 503 by the app; the watcher judges the replica
                cause = getattr(e, "cause", e)  # a rank's own exception, without Ray's remote traceback
                job.future.set_exception(cause if isinstance(cause, FatalError) else FatalError(
                    f"rank 0 did not answer: {type(cause).__name__}: {' '.join(str(cause).split())[:300]}"))

    # -- what Serve and operators call ------------------------------------------------------------
    def check_health(self) -> None:
        if self.failed:
            raise RuntimeError(f"flux-dist replica {self.tag} is down: {self.failed}")

    def describe(self) -> dict:
        """This replica: its id, its ranks' process ids, the layout, the rendezvous (for operators and tests)."""
        return {"replica": self.tag, "pids": list(self.pids), "layout": self.layout, "master": self.master,
                "nodes": self.nodes, "failed": self.failed}

    def __del__(self) -> None:
        import ray

        if not hasattr(self, "refs") or self.closing.is_set():
            return  # the constructor failed (and stopped its ranks), or already stopped
        self.closing.set()
        self.jobs.mark_down("shutting down")
        if self.failed is None and self.actors:
            try:  # a clean stop: every rank leaves the loop together
                self.actors[0].stop.remote()
                ray.wait(list(self.refs), num_returns=len(self.refs), timeout=10)
            except Exception:  # noqa: BLE001 - killed below either way
                pass
        stop_ranks(ray, self.actors)
