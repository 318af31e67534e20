"""What the command line checks on every rank before the model loads, and how a failed rank reports.

Torch-free checks of the config and the request are ``validation.py``'s. This module adds what needs
the launch: rank 0's checks of the paths it will write and of the port it will bind, shared with the
other ranks (one broadcast) so every rank refuses with the same one line before any loading; and,
under torchrun, the rank's exit code and message in the error file torchrun reads, so the launcher
(``launch/torchrun.py``) can report one line per failed rank and keep the project's exit codes.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from .errors import FluxDistError

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # set by torchrun for each rank


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None; bound (as the server binds it) and released at once."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does
            s.bind((host, port))
    except OSError as e:
        return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def on_rank0_then_all(info: Any, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 (the rank that writes files and binds the port); every rank raises its
    ``FluxDistError`` with the same message, before any rank loads the model."""
    err = None
    if info.is_main:
        try:
            check()
        except FluxDistError as e:
            err = str(e)
    if info.world_size > 1:
        import torch.distributed as dist

        box = [err]
        dist.broadcast_object_list(box, src=0, device=info.device if info.device.type == "cuda" else None)
        err = box[0]
    if err:
        raise FluxDistError(err)


def record_failure(code: int, message: str) -> None:
    """Under torchrun: the rank's exit code and one-line message where torchrun's agent reads a failure."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": message, "timestamp": int(time.time()), "flux_dist_exit_code": code}, f)
    except OSError:
        pass  # the launcher then reports the exit code alone
