"""Where weights come from: a built-in preset name or a local diffusers-format directory."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FluxDistError
from .flux2.quant_plan import quantize_transformer
from .presets import PRESETS, Components, build_preset


def load_model(
    model: str, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0, quant: str = "none",
    text_encoder: bool = True,
) -> Components:
    """A preset by name, else a local directory; anything else is a clear error (never a hub lookup).

    The transformer comes back quantized in ``quant`` (a mode from ``quant.resolve_mode``): full-size
    presets block by block as they are built (FLUX.2 [dev] in FP8 fits one 80 GB GPU), tiny presets
    and directories block by block as they are read (a directory saved quantized keeps its QuantLinear
    layers). ``text_encoder=False``: a directory's encoder is not read (``build_prompt_encoder`` does it).
    """
    if model in PRESETS:
        c = build_preset(model, dtype=dtype, device=device, seed=seed, quant=quant)
        c.quant = quant
        return c
    if Path(model).exists() or "/" in model or model.startswith("."):
        from .loading import load_pretrained

        try:
            c = load_pretrained(model, dtype=dtype, device=device, quant=quant, text_encoder=text_encoder)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise FluxDistError(f"cannot load model directory '{model}': {e}") from e
        if c.quant == "none":
            quantize_transformer(c.transformer, quant)
            c.quant = quant
        elif quant not in ("none", c.quant):  # saved quantized: the same format may switch kernel, never re-quantize
            if quant.removesuffix("-emulate") != c.quant.removesuffix("-emulate"):
                raise FluxDistError(f"model directory '{model}' is saved quantized as {c.quant}; --quant {quant} "
                                    "cannot re-quantize it (pass --quant none, or quantize the original model)")
            from ..quant.linear import set_mode

            set_mode(c.transformer, quant, dtype)
            c.quant = quant
        return c
    raise FluxDistError(f"unknown model '{model}': not a preset ({', '.join(PRESETS)}) and no such directory")


def quantize_model(model: str, path: str, *, quant: str, dtype: str, device: torch.device, seed: int = 0,
                   fmt: str = "flux-dist") -> tuple[int, str]:
    """``flux-dist quantize``: load ``model`` with its transformer quantized once, save the whole model
    directory in ``fmt`` (flux-dist's or ModelOpt's). Returns (quantized linears, mode)."""
    from ..devices import parse_dtype
    from ..quant import resolve_mode
    from .presets import save_components_quantized

    mode = resolve_mode(quant, device)
    if mode == "none":
        raise FluxDistError(f"--quant {quant} resolves to 'none' on {device}: nothing to save")
    c = load_model(model, dtype=parse_dtype(dtype), device=device, seed=seed, quant=mode)
    n = quantize_transformer(c.transformer, mode)  # already quantized: only counts
    try:
        save_components_quantized(c, path, mode, fmt=fmt)
    except ValueError as e:
        raise FluxDistError(str(e)) from e
    return n, mode
