"""FLUX.2 reference images (editing, multi-reference composition), as ``Flux2Pipeline`` /
``Flux2KleinPipeline.__call__(image=[...])`` take them.

Each image is checked, resized to at most 1024x1024 in area and centre-cropped to multiples of the VAE
factor x 2 (the pipelines' step 4), VAE-encoded once per request (the distribution's mode, batch-norm
normalized, 2x2-patchified), packed into tokens and given position ids ``(T, H, W, 0)`` with ``T = 10, 20,
...`` per reference (``_prepare_image_ids``). The transformer sees these tokens after the noisy image
tokens, with the same weights; its prediction for them is dropped (the engine keeps only the target's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, retrieve_latents

from ...errors import FluxDistError
from ...validation import REFERENCE_AREA
from ..components import Components
from .pipeline import vae_scale


def to_pil(img: Any) -> PIL.Image.Image:
    """A decoded image as PIL (uint8 ``H x W x C`` arrays and tensors convert losslessly)."""
    if isinstance(img, PIL.Image.Image):
        return img
    a = img.cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    return PIL.Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def preprocess(c: Components, images: list[Any]) -> list[torch.Tensor]:
    """Each reference as the pipelines hand it to the VAE: ``[1, 3, H, W]`` float32 in [-1, 1]."""
    multiple = 2 * vae_scale(c)
    proc = Flux2ImageProcessor(vae_scale_factor=multiple)
    out = []
    for i, img in enumerate(map(to_pil, images), start=1):
        try:
            proc.check_image_input(img)
        except ValueError as e:  # validation.check_references says the same earlier; kept as a guard
            raise FluxDistError(f"reference image {i}: {e}") from e
        w, h = img.size
        if w * h > REFERENCE_AREA:
            img = proc._resize_to_target_area(img, REFERENCE_AREA)
            w, h = img.size
        out.append(proc.preprocess(img, height=h // multiple * multiple, width=w // multiple * multiple,
                                   resize_mode="crop"))
    return out


def encode(c: Components, images: list[Any], device: torch.device,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """``(tokens [1, R, C] in dtype, ids [1, R, 4], processed (width, height) per reference)``; ``R = 0``
    (empty tensors) without references, so the engine's request path is one path."""
    channels = c.transformer.config.in_channels
    if not images:
        return (torch.zeros(1, 0, channels, device=device, dtype=dtype),
                torch.zeros(1, 0, 4, device=device, dtype=torch.long), [])
    vae = c.vae
    latents, sizes = [], []
    for px in preprocess(c, images):
        sizes.append((px.shape[-1], px.shape[-2]))
        lat = retrieve_latents(vae.encode(px.to(vae.device, vae.dtype)), sample_mode="argmax")
        lat = Flux2Pipeline._patchify_latents(lat)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(lat.device, lat.dtype)
        latents.append((lat - mean) / std)
    ids = Flux2Pipeline._prepare_image_ids(latents).to(device)
    tokens = torch.cat([Flux2Pipeline._pack_latents(lat).squeeze(0) for lat in latents]).unsqueeze(0)
    return tokens.to(device, dtype), ids, sizes
