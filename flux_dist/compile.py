"""Regional torch.compile: each diffusers block compiled whole (fullgraph), collectives included.

Compiling the repeated blocks rather than the whole model keeps compile time to one graph per
block type and lets the step cache, the CFG combine and the scheduler stay plain Python outside.
The step's small work outside the blocks (embeddings, the cache signal, the head, the scheduler
step) is compiled as a few more regions: on a skipped cache step it is all that runs, and eager it
is dozens of tiny launches.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from typing import Any, TypeVar

import torch

log = logging.getLogger("flux_dist")


def enable_cache(cache_dir: str | None) -> None:
    """Persistent inductor / autotune caches so a second start skips most of the compile."""
    if cache_dir:
        cache_dir = os.path.expanduser(cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        # Overwrite: inductor writes its default into this variable the first time anything asks for it.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(cache_dir)
        log.info("compile cache: %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def compile_blocks(blocks: Iterable[torch.nn.Module], backend: str = "inductor", mode: str | None = None) -> int:
    """Compile each repeated block in place (the adapter says which); returns the number compiled."""
    n = 0
    for block in blocks:
        block.compile(fullgraph=True, dynamic=False, backend=backend, mode=mode)
        n += 1
    log.info("compiled %d blocks (backend=%s, fullgraph)", n, backend)
    return n


F = TypeVar("F")


def compile_fns(fns: F, backend: str = "inductor", mode: str | None = None) -> F:
    """Each function of a frozen dataclass of regions (the adapter's ``StepFns``) compiled whole
    (fullgraph, static shapes).

    Every value that changes between steps or requests (timestep, sigmas, guidance, the cached
    residual) reaches a region as a tensor, so one graph per region serves every step of a shape.
    """
    opts: dict[str, Any] = dict(fullgraph=True, dynamic=False, backend=backend, mode=mode)
    fields = dataclasses.fields(fns)
    out = type(fns)(**{f.name: torch.compile(getattr(fns, f.name), **opts) for f in fields})
    log.info("compiled the step's %d regions outside the blocks (backend=%s, fullgraph)", len(fields), backend)
    return out


def allow_variants(n: int) -> None:
    """Let dynamo keep ``n`` compiled variants of each region (its default, 8, is one per shape; every layout
    a server switches between compiles its own)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))
