"""Regional torch.compile: each diffusers block compiled whole (fullgraph), collectives included.

Compiling the repeated blocks rather than the whole model keeps compile time to one graph per
block type and lets the step cache, the CFG combine and the scheduler stay plain Python outside.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("flux_dist")


def enable_cache(cache_dir: str | None) -> None:
    """Persistent inductor / autotune caches so a second start skips most of the compile."""
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
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
