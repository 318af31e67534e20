"""The encoder cut to the layers FLUX.2 reads (no final norm, no lm_head, no vision tower), as shells."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from ...errors import FluxDistError
from .shapes import text_config

# ------------------------------------------------------------------------------------------------
# truncation


def layers_needed(hidden_layers: tuple[int, ...] | list[int], num_layers: int) -> int:
    """How many decoder layers feed ``hidden_states[k]`` for every requested k (index 0 = embeddings)."""
    idx = [k % (num_layers + 1) for k in hidden_layers]
    return max(idx) if idx else 0


def decoder_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The base decoder (``MistralModel`` / ``Qwen3Model``) inside an LM and its state-dict prefix."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):  # Mistral3ForConditionalGeneration
        return inner.language_model, "model.language_model."
    if hasattr(model, "language_model") and hasattr(model.language_model, "layers"):  # Mistral3Model
        return model.language_model, "language_model."
    if inner is not None and hasattr(inner, "layers"):  # *ForCausalLM
        return inner, "model."
    if hasattr(model, "layers") and hasattr(model, "embed_tokens"):  # already a base decoder
        return model, ""
    raise FluxDistError(f"cannot find the decoder layers of {type(model).__name__}: not a Mistral3 / Qwen3 LM")


def _cut_(decoder: nn.Module, n: int) -> nn.Module:
    """Keep ``n`` layers and make the final norm an identity when layers were dropped (in place)."""
    total = len(decoder.layers)
    cfg = copy.deepcopy(decoder.config)
    if n < total:
        decoder.layers = nn.ModuleList(list(decoder.layers)[:n])
        decoder.norm = nn.Identity()  # hidden_states[n] is then layer n's output, as in the whole model
        cfg.num_hidden_layers = n
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = list(cfg.layer_types)[:n]
        if hasattr(cfg, "max_window_layers") and cfg.max_window_layers and cfg.max_window_layers > n:
            cfg.max_window_layers = n
    # hidden_states[-1] stays layer n's output (not overwritten with the norm's): belt and braces
    cfg.tie_last_hidden_states = n >= total
    decoder.config = cfg
    for layer in decoder.layers:
        if hasattr(layer, "self_attn"):
            layer.self_attn.config = cfg
    return decoder


def truncate_text_encoder(model: nn.Module, hidden_layers: tuple[int, ...] | list[int]) -> nn.Module:
    """The decoder of ``model`` cut to the layers feeding ``hidden_states[k]`` for ``k in hidden_layers``,
    without ``lm_head``, the vision tower and projector, and with no final norm when layers were cut.

    Shares the parameters with ``model`` (in place: ``model`` itself is left without those layers). The
    diffusers prompt-embedding helpers run on the result unchanged and give bit-identical embeddings.
    """
    decoder, _ = decoder_of(model)
    n = layers_needed(hidden_layers, len(decoder.layers))
    return _cut_(decoder, n).eval().requires_grad_(False)


def build_shell(kind: str, config: Any, hidden_layers: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    """The truncated decoder on the meta device (shapes only)."""
    from transformers import MistralModel, Qwen3Model

    t = copy.deepcopy(text_config(config))
    n = layers_needed(hidden_layers, t.num_hidden_layers)
    total = t.num_hidden_layers
    t.num_hidden_layers = n
    if getattr(t, "layer_types", None):
        t.layer_types = list(t.layer_types)[:n]
    cls = MistralModel if kind == "mistral3" else Qwen3Model
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            dec = cls(t)
    finally:
        torch.set_default_dtype(prev)
    if n < total:
        dec.norm = nn.Identity()
    dec.config.tie_last_hidden_states = n >= total
    return dec.eval().requires_grad_(False)


def build_whole_shell(kind: str, config: Any, dtype: torch.dtype) -> nn.Module:
    """The whole encoder as FLUX.2 ships it (Mistral3ForConditionalGeneration / Qwen3ForCausalLM) on meta."""
    from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

    cls = Mistral3ForConditionalGeneration if kind == "mistral3" else Qwen3ForCausalLM
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            m = cls(copy.deepcopy(config))
    finally:
        torch.set_default_dtype(prev)
    return m.eval().requires_grad_(False)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
