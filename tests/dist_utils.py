"""Run a function on N real processes joined by a gloo process group (spawned, like torchrun), and the
CLI in subprocesses."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch.multiprocessing as mp
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world: int, port: int, q: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        buf = io.BytesIO()  # plain bytes: shared-memory tensors would vanish when this process exits
        torch.save(out, buf)
        q.put((rank, "ok", buf.getvalue()))
        dist.destroy_process_group()
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable, world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Results of ``fn(rank, world, *args)`` per rank; any rank's exception fails the caller."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, q, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, out = q.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{out}")
            import torch

            results[rank] = torch.load(io.BytesIO(out), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


# -- the CLI in subprocesses (torchrun, one process, the launch scripts) ---------------------------
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--height", "64", "--width", "64", "--steps", "2", "--max-sequence-length", "16"]
TINY = ["--config", "configs/tiny.yaml", *SMALL]  # Ulysses 2: the layout every launcher test runs


def cli_env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "PYTHON": sys.executable, **extra}


def torchrun(n: int, *args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(free_port()), "-m", "flux_dist", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def single(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flux_dist", *args], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def png(p: Path | bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(p) if isinstance(p, bytes) else p), dtype=np.int16)


def fault_time(text: str) -> float:
    """When FLUX_DIST_FAULT fired (the hook prints ``t=<unix time>``)."""
    m = re.search(r"FLUX_DIST_FAULT: injecting .* t=([0-9.]+)", text)
    assert m, f"no injected fault in the output:\n{text[-3000:]}"
    return float(m.group(1))
