"""Model families: where weights come from (``source``, ``presets``, ``loading``) and one adapter per
family that tells the engine everything model-specific (``flux2``).

Adding a family means a new adapter package here and an entry in ``adapter_for``; the engine, the
quantizer, the cache and the parallel code stay as they are (docs/architecture.md).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config import ModelConfig
from .components import Components

FAMILIES = ("dev", "klein")  # FLUX.2 [dev] and [klein]; both served by the FLUX.2 adapter


def adapter_for(c: Components, device: torch.device) -> Any:
    """The adapter of a loaded model's family."""
    if c.family in FAMILIES:
        from .flux2 import Flux2Adapter

        return Flux2Adapter(c, device)
    raise ValueError(f"no adapter for model family {c.family!r}")


def check_text_encoder(m: ModelConfig, device: torch.device, world: int) -> str | None:
    """The text-encoder options checked before anything is loaded; the resolved placement (None when the
    model is neither a preset nor a directory: loading then says so)."""
    from .presets import PRESETS
    from .text_encoder import check_text_encoder_options, family_of

    if m.model not in PRESETS and not os.path.isdir(m.model):
        return None
    return check_text_encoder_options(m.model, family_of(m.model), mode=m.text_encoder,
                                      placement=m.text_encoder_placement, quant=m.text_encoder_quant,
                                      device=device, world=world, seed=m.seed)


def attach_text_encoder(adapter: Any, m: ModelConfig, device: torch.device, dtype: torch.dtype, rank: int,
                        world: int) -> None:
    """Replace a loaded whole encoder by the cut one at its placement (``text_encoder: auto``), or by
    seeded random embeddings (``none``). Collective under ``shard``: every rank calls it."""
    c = adapter.c
    whole, c.text_encoder = c.text_encoder, None
    if m.text_encoder == "none":
        return
    from .text_encoder import build_prompt_encoder

    adapter.prompt_encoder = build_prompt_encoder(
        m.model, c.family, placement=m.text_encoder_placement, device=device, dtype=dtype, rank=rank, world=world,
        seed=m.seed, cache_mb=m.prompt_cache_mb, quant=m.text_encoder_quant, whole=whole, tokenizer=c.tokenizer)


def attention_heads(model: str) -> int | None:
    """The transformer's attention heads, read before loading (a preset's config, or a directory's
    ``transformer/config.json``); None when unknown here (loading then checks)."""
    import json

    from .full import FULL_TRANSFORMER_CONFIGS
    from .tiny import TINY_HEADS

    if model in ("flux2-tiny", "flux2-klein-tiny"):
        return TINY_HEADS
    if model in FULL_TRANSFORMER_CONFIGS:
        return FULL_TRANSFORMER_CONFIGS[model]["num_attention_heads"]
    try:
        with open(os.path.join(model, "transformer", "config.json"), encoding="utf-8") as f:
            heads = json.load(f).get("num_attention_heads")
    except (OSError, ValueError, AttributeError):
        return None
    return heads if isinstance(heads, int) and heads > 0 else None
