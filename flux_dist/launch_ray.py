"""Run one request on a Ray cluster: one actor per rank, the same ``Engine`` as under torchrun.

The driver reserves one bundle per rank in a placement group (STRICT_PACK when one node can hold
them all, PACK across nodes otherwise), starts one actor per bundle, picks the rendezvous address
and a free port on rank 0's node, and hands every actor the variables torchrun would set (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each actor then builds the process group itself
(NCCL on GPUs, gloo on CPU). The driver watches the ranks' long-running calls with ``ray.wait``:
the first rank that raises or dies gets every actor killed and an error naming that rank, so a
survivor never sits in a collective until the process-group timeout.

The pieces (``plan``, ``start_actors``, ``rendezvous``, ``watch``, ``stop_ranks``) also start and watch
the ranks of each Ray Serve replica (``serve_ray``).
"""

from __future__ import annotations

import io
import logging
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

from .config import RunConfig
from .errors import FluxDistError

log = logging.getLogger("flux_dist")

# Driver variables the ranks need too (offline mode, the test fault hook, a site's NCCL / gloo
# interface choices); anything else comes from the cluster's own environment.
FORWARD_PREFIXES = ("FLUX_DIST_", "NCCL_", "GLOO_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


@dataclass
class RayResult:
    png: bytes  # the image, PNG-encoded by rank 0
    metrics: dict  # rank 0's metrics, plus the Ray placement
    pids: list[int]  # the actors' process ids (all stopped when this returns)


class RankFailedError(FluxDistError):
    """A rank raised or died; every actor has been stopped."""

    def __init__(self, rank: int, message: str, pids: list[int]) -> None:
        super().__init__(message)
        self.rank = rank
        self.pids = pids


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise FluxDistError("the Ray launcher needs Ray: pip install 'flux-dist[ray]'") from e
    return ray


class RankActor:
    """One rank: sets torchrun's variables, then runs the engine exactly as the CLI does."""

    def where(self) -> tuple[str, str, int]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def free_port(self) -> int:
        # Bound and released here on rank 0's node; a tiny race with other programs is accepted.
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, cfg: RunConfig, env: dict[str, str]) -> dict | None:
        os.environ.update(env)
        from . import distributed
        from .engine import Engine
        from .validation import check_request

        info = distributed.init(cfg.model.device, cfg.dist.startup_timeout_s, cfg.dist.watchdog_s)
        check_request(cfg.request, cfg.limits)
        engine = Engine(cfg, info)
        distributed.set_timeout(cfg.dist.timeout_s)  # start-up is over: fail fast from here on
        res = engine.generate(cfg.request)
        out = None
        if info.is_main:
            buf = io.BytesIO()
            res.image.save(buf, format="PNG")
            out = {"png": buf.getvalue(), "metrics": res.metrics}
        engine.close()
        return out


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Join a running cluster (``address``, or RAY_ADDRESS) or start a local one; True if started here."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # "local": a new cluster even if `ray start` ran on this machine (reach that one with --address auto).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def plan(ray: Any, world: int, device: str) -> tuple[dict[str, float], str, str]:
    """(bundle, strategy, rank device): one GPU per rank when the cluster has them, else one CPU."""
    total = ray.cluster_resources()
    use_gpu = device == "cuda" or (device == "auto" and total.get("GPU", 0) >= world)
    kind = "GPU" if use_gpu else "CPU"
    if total.get(kind, 0) < world:
        raise FluxDistError(f"the layout needs {world} ranks with one {kind} each, but the Ray cluster has "
                            f"{total.get(kind, 0):g} {kind}s")
    per_node = [n["Resources"].get(kind, 0) for n in ray.nodes() if n.get("Alive")]
    strategy = "STRICT_PACK" if any(v >= world for v in per_node) else "PACK"
    device = "cuda" if use_gpu else "cpu"
    return rank_bundle(device), strategy, device


def rank_bundle(device: str) -> dict[str, float]:
    """One rank's share of a placement group: one GPU (and a CPU) on cuda, one CPU on cpu."""
    return {"CPU": 1.0, "GPU": 1.0} if device == "cuda" else {"CPU": 1.0}


def _forward_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}


def _describe(err: BaseException) -> tuple[bool, str]:
    """(died, text) for a failed rank call: a dead actor, or the rank's own exception and traceback."""
    import ray

    if isinstance(err, ray.exceptions.RayActorError):
        return True, f"died ({type(err).__name__}: {str(err).strip()[-1500:]})"
    cause = getattr(err, "cause", None)
    if isinstance(cause, FluxDistError):  # bad input: the rank's one line, not its remote traceback
        return False, f"error: {' '.join(str(cause).split())}"
    return False, f"raised:\n{str(err).strip()[-3000:]}"


def start_actors(ray: Any, cls: type, pg: Any, bundle: dict[str, float], world: int, **options: Any) -> list[Any]:
    """One actor of ``cls`` per bundle of ``pg`` (rank r in bundle r), never restarted."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    remote = ray.remote(cls)
    return [remote.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_restarts=0,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
                           **options).remote() for r in range(world)]


@dataclass
class Rendezvous:
    envs: list[dict[str, str]]  # per rank: what torchrun would set, plus the driver's forwarded variables
    pids: list[int]
    master: str  # rank 0's HOST:PORT
    nodes: int


def rendezvous(ray: Any, actors: list[Any], timeout_s: float, env: dict[str, str] | None = None) -> Rendezvous:
    """Where each actor runs, a free port on rank 0's node, and each rank's torchrun variables."""
    world = len(actors)
    where = ray.get([a.where.remote() for a in actors], timeout=timeout_s)
    master_addr, master_port = where[0][1], ray.get(actors[0].free_port.remote(), timeout=60)
    local: dict[str, int] = defaultdict(int)
    node_size = {n: sum(w[0] == n for w in where) for n, _, _ in where}
    envs = []
    for r, (node, _, _) in enumerate(where):
        envs.append({**_forward_env(), **(env or {}), "RANK": str(r), "WORLD_SIZE": str(world),
                     "LOCAL_RANK": str(local[node]), "LOCAL_WORLD_SIZE": str(node_size[node]),
                     "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        local[node] += 1
    return Rendezvous(envs, [w[2] for w in where], f"{master_addr}:{master_port}", len(node_size))


def stop_ranks(ray: Any, actors: list[Any], pg: Any = None) -> None:
    """Kill every actor (already dead is fine), then free ``pg``."""
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
    if pg is not None:
        from ray.util.placement_group import remove_placement_group

        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001
            pass


def ray_generate(cfg: RunConfig, *, address: str | None = None, num_cpus: int | None = None,
                 timeout_s: float = 3600.0, poll_s: float = 1.0, grace_s: float = 3.0,
                 env: dict[str, str] | None = None, placement_timeout_s: float = 120.0) -> RayResult:
    """Generate ``cfg.request`` on Ray with the layout ``cfg.parallel`` asks for; see the module doc."""
    ray = _import_ray()
    from ray.util.placement_group import placement_group

    p = cfg.parallel
    world = p.ulysses * p.ring * p.cfg_parallel
    started = connect(address, num_cpus)
    actors: list[Any] = []
    pids: list[int] = []
    pg = None
    try:
        bundle, strategy, device = plan(ray, world, cfg.model.device)
        cfg = replace(cfg, model=replace(cfg.model, device=device))
        pg = placement_group([dict(bundle)] * world, strategy=strategy)
        ready, _ = ray.wait([pg.ready()], timeout=placement_timeout_s)
        if not ready:
            raise FluxDistError(f"Ray could not place {world} bundles of {bundle} ({strategy}) within "
                                f"{placement_timeout_s:g} s; cluster resources: {ray.cluster_resources()}")
        actors = start_actors(ray, RankActor, pg, bundle, world)
        rv = rendezvous(ray, actors, placement_timeout_s, env)
        pids = rv.pids
        refs = {a.run.remote(cfg, e): r for r, (a, e) in enumerate(zip(actors, rv.envs, strict=True))}
        log.info("ray: %d ranks (%s, %s bundles %s), rendezvous %s", world, device, strategy, bundle, rv.master)
        out = watch(ray, refs, pids, timeout_s, poll_s, grace_s)
        metrics = {**out["metrics"], "launcher": {"name": "ray", "strategy": strategy, "bundle": bundle,
                                                   "nodes": rv.nodes, "master": rv.master}}
        return RayResult(png=out["png"], metrics=metrics, pids=pids)
    finally:
        stop_ranks(ray, actors, pg)  # success or failure: no rank outlives the request
        if started:
            ray.shutdown()


def watch(ray: Any, refs: dict[Any, int], pids: list[int], timeout_s: float, poll_s: float,
           grace_s: float) -> dict:
    """Wait for every rank's call (``refs``: ref -> rank); rank 0's result. On the first failure collect the
    others' for ``grace_s``, then raise ``RankFailedError`` naming the rank (a death first)."""
    pending = list(refs)
    results: dict[int, Any] = {}
    failures: list[tuple[int, bool, str]] = []
    deadline = time.monotonic() + timeout_s

    def collect(done: list[Any]) -> None:
        for ref in done:
            pending.remove(ref)
            try:
                results[refs[ref]] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a rank's failure, reported below
                failures.append((refs[ref], *_describe(e)))

    while pending:
        done, _ = ray.wait(pending, num_returns=1, timeout=poll_s)
        collect(done)
        if failures:
            # A dead rank often makes its peers' collectives fail first; give its death time to show.
            end = time.monotonic() + grace_s
            while pending and time.monotonic() < end:
                done, _ = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, end - time.monotonic()))
                collect(done)
            first = sorted(failures, key=lambda f: not f[1])[0]  # a death first, else the earliest
            if all(text == first[2] and text.startswith("error: ") for _, _, text in failures):
                ranks = ", ".join(str(r) for r in sorted(r for r, _, _ in failures))  # bad input: one line
                raise RankFailedError(first[0], f"{first[2][7:]} (rank(s) {ranks}; all ranks stopped)", pids)
            others = [f"rank {r}" for r, _, _ in failures if r != first[0]]
            msg = f"rank {first[0]} {first[2]}"
            if others:
                msg += f"\n(then also failed: {', '.join(others)})"
            msg += "\nall ranks stopped"
            raise RankFailedError(first[0], msg, pids)
        if time.monotonic() > deadline:
            ranks = sorted(refs[r] for r in pending)
            raise RankFailedError(ranks[0], f"timed out after {timeout_s:g} s; ranks still running: {ranks}; "
                                  "all ranks stopped", pids)
    return results[0]
