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

import torch

from .models import flux2

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


def compile_blocks(tr: torch.nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every double- and single-stream block in place; returns the number compiled."""
    n = 0
    for blocks in (tr.transformer_blocks, tr.single_transformer_blocks):
        for block in blocks:
            block.compile(fullgraph=True, dynamic=False, backend=backend, mode=mode)
            n += 1
    log.info("compiled %d blocks (backend=%s, fullgraph)", n, backend)
    return n


def compile_step(backend: str = "inductor", mode: str | None = None) -> flux2.StepFns:
    """Each of the step's regions outside the blocks compiled whole (fullgraph, static shapes).

    Every value that changes between steps or requests (timestep, sigmas, guidance, the cached
    residual) reaches a region as a tensor, so one graph per region serves every step of a shape.
    """
    opts = dict(fullgraph=True, dynamic=False, backend=backend, mode=mode)
    fns = flux2.StepFns(**{f.name: torch.compile(getattr(flux2.EAGER, f.name), **opts)
                           for f in dataclasses.fields(flux2.StepFns)})
    log.info("compiled the step's %d regions outside the blocks (backend=%s, fullgraph)",
             len(dataclasses.fields(fns)), backend)
    return fns
