"""Where weights come from: a built-in preset name or a local diffusers-format directory."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FluxDistError
from .presets import PRESETS, Components, build_preset


def load_model(model: str, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Components:
    """A preset by name, else a local directory; anything else is a clear error (never a hub lookup)."""
    if model in PRESETS:
        return build_preset(model, dtype=dtype, device=device, seed=seed)
    if Path(model).exists() or "/" in model or model.startswith("."):
        from .loading import load_pretrained

        try:
            return load_pretrained(model, dtype=dtype, device=device)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise FluxDistError(f"cannot load model directory '{model}': {e}") from e
    raise FluxDistError(f"unknown model '{model}': not a preset ({', '.join(PRESETS)}) and no such directory")
