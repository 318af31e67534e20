"""Process group from the launcher's environment (torchrun, Slurm, Ray set the same variables).

NCCL on GPUs, gloo on CPU. The first timeout is long (loading and compiling a 32 B model takes
minutes); after start-up ``set_timeout`` drops it on every group (subgroups included), so a
collective that a live peer never joins fails in ``dist.timeout_s``. A stopped or frozen peer is
caught sooner, and during start-up too, by the watchdog (``watchdog.py``, started by ``init``): a
rank silent for ``dist.watchdog_s`` ends the job on every rank, naming it.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .watchdog import alive, silent_ranks, start_watchdog, stop_watchdog

__all__ = ["DistInfo", "alive", "env_layout", "fail_together", "init", "pick_device", "set_timeout", "setup_logging",
           "shutdown", "silent_ranks", "start_watchdog", "stop_watchdog"]

log = logging.getLogger("flux_dist")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for n in names:
        if os.environ.get(n):
            return int(os.environ[n])
    return default


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            from .errors import FluxDistError

            raise FluxDistError("device 'cuda' requested but no CUDA device is visible")
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def env_layout() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment.

    torchrun and the Ray launcher set RANK / WORLD_SIZE / LOCAL_RANK. Under ``srun`` with one task
    per GPU nothing sets them, so Slurm's own per-task variables stand in; they are read only inside
    a job step (SLURM_STEP_ID set), so a plain command in a batch script stays one process.
    """
    if os.environ.get("RANK") is None and os.environ.get("WORLD_SIZE") is None and _in_slurm_step():
        return (_env_int("SLURM_PROCID", default=0), _env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1),
                _env_int("SLURM_LOCALID", default=0))
    return _env_int("RANK", default=0), _env_int("WORLD_SIZE", default=1), _env_int("LOCAL_RANK", default=0)


def _in_slurm_step() -> bool:
    return bool(os.environ.get("SLURM_STEP_ID")) and bool(os.environ.get("SLURM_PROCID"))


def _export_layout(rank: int, world: int, local_rank: int) -> None:
    """Make a Slurm-derived layout look like torchrun's, for ``env://`` and for error messages."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if world > 1 and not os.environ.get("MASTER_ADDR"):
        from .errors import FluxDistError

        raise FluxDistError(
            "MASTER_ADDR is not set: under srun with one task per GPU the sbatch script exports the first "
            "host of the job (scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1); see slurm/")
    if world > 1 and not os.environ.get("MASTER_PORT"):
        # The same port on every task of the job, derived from the job id when the script sets none.
        os.environ["MASTER_PORT"] = str(20000 + _env_int("SLURM_JOB_ID", default=0) % 20000)


def init(device: str = "auto", startup_timeout_s: float = 1800.0, watchdog_s: float = 20.0) -> DistInfo:
    """Join the process group the environment describes (or none, for one process).

    With more than one rank, the watchdog starts here (``watchdog_s`` > 0): loading and compiling
    are covered too, since it beats from its own thread whatever the main thread does.
    """
    rank, world, local_rank = env_layout()
    if world > 1:
        _export_layout(rank, world, local_rank)
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=startup_timeout_s), **kwargs
        )
    setup_logging(rank)
    if world > 1 and watchdog_s:
        start_watchdog(watchdog_s)
    return DistInfo(rank, world, local_rank, dev)


def set_timeout(timeout_s: float) -> None:
    """Shorten the collective timeout of every process group (the default one and every subgroup, such
    as the mesh's Ulysses / ring / cfg groups) once start-up (loading, compiling) is over.

    A collective that a peer never joins then fails this rank after ``timeout_s`` instead of the long
    start-up timeout (a peer that is stopped or frozen is caught sooner by the watchdog).
    """
    if not dist.is_initialized():
        return
    td = datetime.timedelta(seconds=timeout_s)
    groups = list(dist.distributed_c10d._world.pg_map) or [dist.group.WORLD]
    failed = []
    for g in groups:
        try:
            dist.set_timeout(td, group=g)
        except Exception as e:  # noqa: BLE001 - depends on the backend build (MPI, UCC cannot)
            failed.append(f"{dist.get_process_group_ranks(g)}: {e}")
    if failed:
        log.warning("could not shorten the collective timeout of %d group(s): %s", len(failed), "; ".join(failed))


def fail_together(timeout_s: float = 10.0) -> None:
    """On a failing rank: count the failure in the rendezvous store, then give the other ranks up to
    ``timeout_s`` to reach (and print) the same error before this one exits and the launcher stops them.

    Bad input fails identically on every rank; without this the first rank out gets its peers killed
    before they say why. A rank failing alone only waits the timeout.
    """
    world = env_layout()[1]
    if world <= 1:
        return
    if not dist.is_initialized():
        time.sleep(2.0)  # peers parse the same config in about the same time
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        store.add("flux_dist/failed", 1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and store.add("flux_dist/failed", 0) < world:
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store may be gone with a dead peer; exit anyway
        pass


def shutdown() -> None:
    """Stop the watchdog (telling the peers this rank is done, not hung), then destroy the process
    group (at the end of a run, so NCCL does not warn or leak)."""
    stop_watchdog()
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_logging(rank: int) -> None:
    """Info on rank 0 only; warnings and errors from every rank, tagged with the rank."""
    root = logging.getLogger("flux_dist")
    if getattr(root, "_flux_dist_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    root._flux_dist_configured = True  # type: ignore[attr-defined]

