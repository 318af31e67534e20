"""The device side of a run: dtype names and the memory counter the metrics report."""

from __future__ import annotations

import torch

from .errors import FluxDistError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise FluxDistError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def peak_memory_gib(dev: torch.device) -> float:
    """Peak allocated memory on a GPU; the process' peak resident set on a CPU."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
