"""Model presets: tiny random FLUX.2 models for CPU tests, full-size random ones for benchmarks.

No weights can be downloaded, so every preset is built from a config with seeded random weights,
identically on every process for one seed (``components``' seeded helpers).

* ``flux2-tiny`` / ``flux2-klein-tiny`` (``tiny``): real (tiny) text encoders and tokenizers, so the
  diffusers pipelines run unchanged and serve as a reference.
* ``flux2-dev`` / ``flux2-klein-4b`` (``full``): the real transformer shapes with random weights and
  no text encoder (the engine feeds random prompt embeddings), for memory and speed measurements.
"""

from __future__ import annotations

import os

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from .components import (  # noqa: F401 - re-exported: the presets' public names
    _TRANSFORMER_SEED,
    DEV_TEXT_LAYERS,
    KLEIN_TEXT_LAYERS,
    Components,
    _isolated_rng,
    _seed,
    flux2_scheduler,
)
from .flux2.quant_plan import quantize_transformer
from .full import FULL_TRANSFORMER_CONFIGS, _build_full
from .tiny import _build_tiny

PRESETS: tuple[str, ...] = ("flux2-tiny", "flux2-klein-tiny", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b")


def _cast_like_from_pretrained_(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``, but non-persistent float buffers keep their dtype.

    Those are computed constants such as RoPE ``inv_freq``: ``from_pretrained(dtype=bf16)``
    leaves them in fp32, a plain ``.to(bf16)`` rounds them, and the text embeddings then differ
    by up to ~0.7. Keeping them makes a preset equal to its saved-and-loaded copy in any dtype.
    """
    persistent = set(module.state_dict())
    keep = [
        (name, buf)
        for name, buf in module.named_buffers()
        if name not in persistent and buf.is_floating_point() and buf.dtype != dtype
    ]
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(device=device, dtype=dtype)  # a real fp32-module list: keep diffusers' warning
    else:
        # diffusers' ModelMixin.to warns about "modules kept in float32: []" on every dtype cast.
        torch.nn.Module.to(module, device=device, dtype=dtype)
    for name, buf in keep:
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        owner.register_buffer(attr, buf.to(device), persistent=False)


def build_preset(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    quant: str = "none",
) -> Components:
    """Build a preset with seeded random weights, identical on every process for one seed.

    ``quant`` (a mode from ``quant.resolve_mode``): the transformer comes back quantized. Full-size
    presets quantize each block as it is built, so FLUX.2 [dev] in FP8 never exists in bf16 whole;
    the tiny ones are quantized after the build. Either way the same tensors as quantizing after.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _isolated_rng(device):
        if name in FULL_TRANSFORMER_CONFIGS:
            c = _build_full(name, dtype, device, seed, quant)
        else:
            c = _build_tiny(name, seed)
            for m in (c.transformer, c.vae, c.text_encoder):
                _cast_like_from_pretrained_(m, device, dtype)
            quantize_transformer(c.transformer, quant)
    for m in (c.transformer, c.vae, c.text_encoder):
        if m is not None:
            m.eval().requires_grad_(False)
    return c


def to_diffusers_pipeline(c: Components) -> Flux2Pipeline | Flux2KleinPipeline:
    """The stock diffusers pipeline over the same module objects: the reference implementation."""
    modules = dict(
        scheduler=c.scheduler,
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=c.tokenizer,
        transformer=c.transformer,
    )
    if c.family == "dev":
        pipe: Flux2Pipeline | Flux2KleinPipeline = Flux2Pipeline(**modules)
    elif c.family == "klein":
        pipe = Flux2KleinPipeline(**modules, is_distilled=c.is_distilled)
    else:
        raise ValueError(f"unknown model family {c.family!r} (expected 'dev' or 'klein')")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_components_quantized(c: Components, path: str, mode: str, fmt: str = "flux-dist") -> None:
    """Like ``save_components`` but the (already quantized) transformer goes in a quantized format:
    ``flux-dist`` (our own) or ``modelopt`` (NVIDIA ModelOpt's Hugging Face export format)."""
    from ..quant import save_quantized

    save_components_with(c, path, lambda folder: save_quantized(c.transformer, mode, folder, fmt=fmt))


def save_components_with(c: Components, path: str, save_transformer) -> None:
    """A whole model directory (``--model DIR``): model_index.json, the VAE, scheduler, text encoder and
    tokenizer as diffusers saves them, and the transformer folder written by ``save_transformer(folder)``."""
    if c.text_encoder is None or c.tokenizer is None:
        raise ValueError(f"{c.name} has no text encoder here (random prompt embeddings): nothing to save it with")
    os.makedirs(path, exist_ok=True)
    pipe = to_diffusers_pipeline(c)
    pipe.save_config(path)  # model_index.json
    for name in ("vae", "scheduler", "text_encoder", "tokenizer"):
        getattr(c, name).save_pretrained(os.path.join(path, name))
    save_transformer(os.path.join(path, "transformer"))


def save_components(c: Components, path: str) -> None:
    """Write a diffusers-format directory (model_index.json + one subfolder per component)."""
    os.makedirs(path, exist_ok=True)
    to_diffusers_pipeline(c).save_pretrained(path, safe_serialization=True)


def save_preset(name: str, path: str, *, dtype: str = "float32", seed: int = 0) -> None:
    """``flux-dist save-preset``: a preset written as a diffusers-format directory (built on the CPU)."""
    from ..devices import parse_dtype

    save_components(build_preset(name, dtype=parse_dtype(dtype), device=torch.device("cpu"), seed=seed), path)
