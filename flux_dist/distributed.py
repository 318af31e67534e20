"""Process group from the launcher's environment (torchrun, Slurm, Ray set the same variables).

NCCL on GPUs, gloo on CPU. The first timeout is long (loading and compiling a 32 B model takes
minutes); after start-up the timeout drops so a dead peer fails the job fast instead of hanging.
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


def init(device: str = "auto", startup_timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group the environment describes (or none, for one process)."""
    rank = _env_int("RANK", default=0)
    world = _env_int("WORLD_SIZE", default=1)
    local_rank = _env_int("LOCAL_RANK", default=0)
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=startup_timeout_s), **kwargs
        )
    setup_logging(rank)
    return DistInfo(rank, world, local_rank, dev)


def set_timeout(timeout_s: float) -> None:
    """Shorten the collective timeout once start-up is over (best effort: a private torch API)."""
    if not dist.is_initialized():
        return
    fn = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if fn is not None:
        try:
            fn(datetime.timedelta(seconds=timeout_s), None)
        except Exception as e:  # pragma: no cover - depends on the backend build
            log.debug("could not shorten the process-group timeout: %s", e)


def fail_together(timeout_s: float = 10.0) -> None:
    """On a failing rank: count the failure in the rendezvous store, then give the other ranks up to
    ``timeout_s`` to reach (and print) the same error before this one exits and the launcher stops them.

    Bad input fails identically on every rank; without this the first rank out gets its peers killed
    before they say why. A rank failing alone only waits the timeout.
    """
    world = _env_int("WORLD_SIZE", default=1)
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
