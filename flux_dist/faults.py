"""Fault injection, a TESTING HOOK: make one rank fail mid-denoise to prove no launcher hangs.

Off unless the environment variable ``FLUX_DIST_FAULT`` is set, e.g.::

    FLUX_DIST_FAULT="rank=1,step=2,kind=raise"   # rank 1 raises before denoise step 2
    FLUX_DIST_FAULT="rank=1,step=0,kind=exit"    # rank 1's process dies (os._exit) before step 0
    FLUX_DIST_FAULT="rank=0,step=1,kind=stop"    # rank 0 stops itself (SIGSTOP), as `kill -STOP` does
    FLUX_DIST_FAULT="rank=1,step=1,kind=sleep,seconds=30"  # rank 1's main thread sleeps, then goes on

``kind=raise`` raises ``InjectedFault`` (the rank's error path runs, as for a real bug);
``kind=exit`` ends the process at once with exit code 43 and no clean-up, as a crash or an OOM kill
would; ``kind=stop`` freezes every thread of the process (SIGSTOP: a hung host, a debugger);
``kind=hang`` blocks the main thread for good while its other threads run (a deadlock);
``kind=sleep`` blocks it for ``seconds`` (a slow but live rank). Never set it in production; a
malformed value is an error, not silently ignored.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from .errors import FluxDistError

ENV = "FLUX_DIST_FAULT"
EXIT_CODE = 43
KINDS = ("raise", "exit", "stop", "hang", "sleep")


class InjectedFault(RuntimeError):
    """The failure FLUX_DIST_FAULT asked for (a test hook, never a real error)."""


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    kind: str
    seconds: float = 0.0  # kind=sleep only


def parse(spec: str) -> Fault:
    """``"rank=R,step=S,kind=K[,seconds=N]"`` -> Fault; anything else is a clear error."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise FluxDistError(f"{ENV}={spec!r}: expected rank=R,step=S,kind={'|'.join(KINDS)}")
        fields[key.strip()] = value.strip()
    wanted = {"rank", "step", "kind"} | ({"seconds"} if fields.get("kind") == "sleep" else set())
    if set(fields) != wanted:
        raise FluxDistError(f"{ENV}={spec!r}: expected exactly the keys {', '.join(sorted(wanted))}")
    if fields["kind"] not in KINDS:
        raise FluxDistError(f"{ENV}={spec!r}: kind must be one of {', '.join(KINDS)}")
    try:
        return Fault(int(fields["rank"]), int(fields["step"]), fields["kind"], float(fields.get("seconds", 0)))
    except ValueError as e:
        raise FluxDistError(f"{ENV}={spec!r}: rank and step must be integers, seconds a number") from e


def check_env() -> Fault | None:
    """Parse FLUX_DIST_FAULT now (at start-up): a malformed value fails before the model loads."""
    spec = os.environ.get(ENV)
    return parse(spec) if spec else None


def maybe_inject(rank: int, step: int) -> None:
    """Called by the engine before each denoise step; does nothing unless FLUX_DIST_FAULT is set."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    f = parse(spec)
    if f.rank != rank or f.step != step:
        return
    # The time lets tests measure how long the job takes to end after the fault.
    print(f"[rank{rank}] {ENV}: injecting kind={f.kind} at step {step} t={time.time():.3f}",
          file=sys.stderr, flush=True)
    if f.kind == "exit":
        os._exit(EXIT_CODE)
    if f.kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if f.kind in ("hang", "sleep"):
        end = time.monotonic() + (f.seconds if f.kind == "sleep" else float("inf"))
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        return
    raise InjectedFault(f"injected fault on rank {rank} at denoise step {step} ({ENV})")
