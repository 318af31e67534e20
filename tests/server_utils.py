"""Start a real server (torchrun, or plain processes the way Slurm starts them) and talk HTTP to it."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--height", "64", "--width", "64", "--steps", "2", "--max-sequence-length", "16"]


def env(**extra: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


class Headers(dict):
    """Response headers, looked up case-insensitively (HTTP/1.1 servers may send them in lower case)."""

    def __init__(self, items: Any) -> None:
        super().__init__((k.lower(), v) for k, v in items)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


def call(port: int, method: str, path: str, body: Any = None, *, headers: dict | None = None,
         timeout: float = 120) -> tuple[int, Headers, bytes]:
    """One request on a fresh connection: (status, headers, body). ``body`` bytes go as is, else JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        return r.status, Headers(r.getheaders()), r.read()
    finally:
        conn.close()


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


class Server:
    """A server in its own process group, always stopped by ``stop()`` (SIGTERM, then SIGKILL)."""

    def __init__(self, args: list[str], *, world: int = 2, launcher: str = "torchrun", extra_env: dict | None = None,
                 log_path: Path | None = None) -> None:
        self.port = free_port()
        self.world = world
        cli = ["-m", "flux_dist", "serve", "--port", str(self.port), *args]
        self.log_path = log_path
        self.procs: list[subprocess.Popen] = []
        e = env(**(extra_env or {}))
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
                   str(free_port()), *cli]
            self.procs.append(self._popen(cmd, e))
        else:  # one process per rank with the rendezvous in the environment, as an sbatch script does
            master = str(free_port())
            for r in range(world):
                re = {**e, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": master}
                self.procs.append(self._popen([sys.executable, *cli], re))

    def _popen(self, cmd: list[str], e: dict) -> subprocess.Popen:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path and self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 180, headers: dict | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"server exited with {p.returncode} before ready:\n{self.log()}")
            try:
                code, _, _ = call(self.port, "GET", "/health", headers=headers, timeout=5)
                if code == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready within {timeout} s:\n{self.log()}")

    def rank_pid(self, rank: int) -> int:
        """The pid of the worker with this RANK (under torchrun: a child of the agent)."""
        if len(self.procs) > 1:
            return self.procs[rank].pid
        agent = self.procs[0].pid
        kids = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
        for k in kids:
            try:
                environ = Path(f"/proc/{k}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(k)
        raise LookupError(f"no worker with RANK={rank} among {kids}")

    def wait(self, timeout: float) -> list[int | None]:
        """Exit codes (None where still running after ``timeout``)."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs]

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            alive = [p for p in self.procs if p.poll() is None]
            if not alive:
                return
            for p in alive:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            self.wait(grace)


@contextlib.contextmanager
def server_with_cli_image(d: Path, args: list[str], prompt: str, seed: int, world: int = 2) -> Iterator[Server]:
    """A torchrun server (``world`` ranks, the tiny config at SMALL, plus ``args``) and, made beside it by one
    ``flux-dist generate`` process (Ulysses 1: the layout must not change the image either), the CLI's
    image for ``prompt`` / ``seed`` at ``server.cli_png``."""
    cli = subprocess.Popen(
        [sys.executable, "-m", "flux_dist", "generate", "--config", "configs/tiny.yaml", *SMALL, "--ulysses", "1",
         "--prompt", prompt, "--seed", str(seed), "--output", str(d / "cli.png"), "--metrics", ""],
        cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=open(d / "cli.log", "wb"))  # noqa: SIM115
    s = Server(["--config", "configs/tiny.yaml", *SMALL, *args], world=world, log_path=d / "server.log")
    try:
        s.wait_ready()
        assert cli.wait(timeout=240) == 0, (d / "cli.log").read_text()[-3000:]
        s.cli_png = d / "cli.png"
        yield s
    finally:
        s.stop()
        if cli.poll() is None:
            cli.kill()
