"""Model families: where weights come from (``source``, ``presets``, ``loading``) and one adapter per
family that tells the engine everything model-specific (``flux2``).

Adding a family means a new adapter package here and an entry in ``adapter_for``; the engine, the
quantizer, the cache and the parallel code stay as they are (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import torch

from .components import Components

FAMILIES = ("dev", "klein")  # FLUX.2 [dev] and [klein]; both served by the FLUX.2 adapter


def adapter_for(c: Components, device: torch.device) -> Any:
    """The adapter of a loaded model's family."""
    if c.family in FAMILIES:
        from .flux2 import Flux2Adapter

        return Flux2Adapter(c, device)
    raise ValueError(f"no adapter for model family {c.family!r}")
