"""FLUX.2's ends of a request, as diffusers' ``Flux2Pipeline`` / ``Flux2KleinPipeline`` do them:
prompt embeddings, seeded noise and position ids, the timestep schedule, and the VAE decode.

Written against the pipelines' own helpers so that one process gives diffusers' image bit for bit;
the engine never imports ``diffusers.pipelines`` itself.
"""

from __future__ import annotations

import copy
import zlib
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline, compute_empirical_mu
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.utils.torch_utils import randn_tensor

from ...errors import NotSupportedError
from ..components import Components


def vae_scale(c: Components) -> int:
    """Pixels per latent pixel (8 for the real VAE); tokens are 2x2 latent patches on top."""
    return 2 ** (len(c.vae.config.block_out_channels) - 1)


def encode_prompt(c: Components, prompt: str, max_len: int, seed: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """Prompt embeddings ``[1, max_len, joint_dim]``; seeded random ones when the model has no encoder."""
    if c.text_encoder is None:
        # Reduced modulo 2**64 (what manual_seed takes): unchanged for every seed that fit before, and no
        # overflow for any seed up to MAX_SEED.
        g = torch.Generator("cpu").manual_seed((seed * 1_000_003 + zlib.crc32(prompt.encode())) % 2**64)
        return torch.randn(1, max_len, c.transformer.config.joint_attention_dim, generator=g).to(device, dtype)
    fn = Flux2Pipeline._get_mistral_3_small_prompt_embeds if c.family == "dev" else \
        Flux2KleinPipeline._get_qwen3_prompt_embeds
    return fn(c.text_encoder, c.tokenizer, prompt, device=device, max_sequence_length=max_len,
              hidden_states_layers=c.text_layers)


def text_ids(emb: torch.Tensor) -> torch.Tensor:
    return Flux2Pipeline._prepare_text_ids(emb).to(emb.device)


def noise(c: Components, height: int, width: int, seed: int, device: torch.device,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed initial latents drawn exactly as diffusers does with a CPU generator seeded ``seed``."""
    f = 2 * vae_scale(c)
    shape = (1, c.transformer.config.in_channels, height // f, width // f)
    gen = torch.Generator("cpu").manual_seed(seed)
    lat = randn_tensor(shape, generator=gen, device=device, dtype=dtype)
    ids = Flux2Pipeline._prepare_latent_ids(lat).to(device)
    return Flux2Pipeline._pack_latents(lat), ids


def schedule(scheduler: Any, steps: int, image_seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)``: ``steps`` timesteps and ``steps + 1`` sigmas ending at 0, with FLUX.2's
    resolution-dependent shift from the model's own scheduler config (a fine-tune's is honoured)."""
    if getattr(scheduler.config, "stochastic_sampling", False):
        raise NotSupportedError("stochastic_sampling schedulers are not supported (the step must be deterministic)")
    sched = copy.deepcopy(scheduler)  # set_timesteps mutates; the loaded scheduler stays pristine
    sigmas = np.linspace(1.0, 1 / steps, steps)
    if getattr(sched.config, "use_flow_sigmas", False):
        sigmas = None
    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)
    sched.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    return sched.timesteps, sched.sigmas.to(device)


def vae_latents(c: Components, latents: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Packed tokens -> the VAE's ``[B, C, H, W]`` input (batch-norm statistics undone, un-patchified)."""
    vae = c.vae
    lat = Flux2Pipeline._unpack_latents_with_ids(latents, ids)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(lat.device, lat.dtype)
    return Flux2Pipeline._unpatchify_latents(lat * std + mean)


def decode(c: Components, latents: torch.Tensor, ids: torch.Tensor) -> Any:
    """The PIL image, post-processed as the pipelines do."""
    img = c.vae.decode(vae_latents(c, latents, ids).to(c.vae.dtype), return_dict=False)[0]
    return Flux2ImageProcessor(vae_scale_factor=vae_scale(c) * 2).postprocess(img, output_type="pil")[0]
