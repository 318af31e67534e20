"""Full-size FLUX.2 presets: the real transformer shapes with random weights, built block by block
(meta shell, each block materialized and quantized in turn), for memory and speed measurements.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

from .components import (
    _TRANSFORMER_SEED,
    _VAE_SEED,
    DEV_TEXT_LAYERS,
    KLEIN_TEXT_LAYERS,
    Components,
    _default_dtype,
    _seed,
    _set_bn_stats,
    flux2_scheduler,
)
from .flux2.quant_plan import quantize_block

FULL_TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    # Flux2Transformer2DModel's defaults are FLUX.2 [dev]; spelled out so a diffusers change shows.
    "flux2-dev": dict(
        patch_size=1,
        in_channels=128,
        num_layers=8,
        num_single_layers=48,
        attention_head_dim=128,
        num_attention_heads=48,
        joint_attention_dim=15360,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32),
        rope_theta=2000,
        guidance_embeds=True,
    ),
    "flux2-klein-4b": dict(
        patch_size=1,
        in_channels=128,
        num_layers=5,
        num_single_layers=20,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=7680,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32),
        rope_theta=2000,
        guidance_embeds=False,
    ),
    # FLUX.2 [klein] 9B (Qwen3-8B encoder: 3 x 4096 = 12288). Its diffusers transformer config as
    # quoted by several independent FLUX.2 ports (e.g. an embedded config.json with
    # "_diffusers_version": "0.37.0.dev0"; VincentGourbin/flux-2-swift-mlx Flux2Config.swift).
    "flux2-klein-9b": dict(
        patch_size=1,
        in_channels=128,
        num_layers=8,
        num_single_layers=24,
        attention_head_dim=128,
        num_attention_heads=32,
        joint_attention_dim=12288,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32),
        rope_theta=2000,
        guidance_embeds=False,
    ),
}


# The only parameters of a full-size transformer that are not matrices: RMSNorm gains (ones).
_NORMS: tuple[type[torch.nn.Module], ...] = (DiffusersRMSNorm, torch.nn.RMSNorm)


def _build_units(tr: torch.nn.Module) -> list[tuple[str, torch.nn.Module, bool]]:
    """``(name, module, is_block)`` for each top-level child in registration order, the block lists
    split into their blocks: the pieces the low-memory build materializes one at a time.

    Checked on the meta shell: their parameters, concatenated, are ``tr.parameters()`` in order (the
    seeded re-draw depends on it), and there are no buffers (``to_empty`` would leave them garbage).
    """
    units: list[tuple[str, torch.nn.Module, bool]] = []
    for name, child in tr.named_children():
        if name in ("transformer_blocks", "single_transformer_blocks"):
            units += [(f"{name}.{i}", block, True) for i, block in enumerate(child)]
        else:
            units.append((name, child, False))
    in_units = [f"{u}.{n}" for u, m, _ in units for n, _ in m.named_parameters()]
    if in_units != [n for n, _ in tr.named_parameters()]:
        raise RuntimeError(f"{type(tr).__name__}: its top-level children's parameters are not, in order, the "
                           "model's parameters(); the block-by-block build would draw different weights")
    buffers = [n for n, _ in tr.named_buffers()]
    if buffers:
        raise RuntimeError(f"{type(tr).__name__} has buffers {buffers[:4]}: the block-by-block build does not "
                           "know their values (to_empty leaves them uninitialised); give presets a rule for them")
    return units


def _fill_(unit: torch.nn.Module, unit_name: str, g: torch.Generator) -> None:
    """Set a unit ``to_empty`` left uninitialised: matrices ``N(0, 0.02)`` from ``g``, RMSNorm gains 1.

    Any other parameter is refused rather than left holding whatever memory it got.
    """
    with torch.no_grad():
        for name, p in unit.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.02, generator=g)
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = unit.get_submodule(owner_name)
            if not (isinstance(owner, _NORMS) and leaf == "weight"):
                raise RuntimeError(f"full-size preset build: no rule for {unit_name}.{name} "
                                   f"({type(owner).__name__}.{leaf}, shape {tuple(p.shape)}); only matrices and "
                                   "RMSNorm weights are initialised, anything else would keep garbage from to_empty")
            p.fill_(1.0)


def _full_transformer(name: str, dtype: torch.dtype, device: torch.device, seed: int,
                      quant: str) -> Flux2Transformer2DModel:
    """Build on ``meta``, then materialize each top-level child / block on ``device`` and quantize
    each block right after, so at most one block exists in ``dtype`` before quantization.

    The matrices are drawn ``normal_(0, 0.02)`` in ``parameters()`` order with one seeded generator
    on ``device``: bit-identical to building the whole model on ``device`` and re-drawing, on every
    rank, and the same tensors as quantizing after such a build. ``device="meta"`` stays shapes only.
    """
    with _default_dtype(dtype), torch.device("meta"):
        tr = Flux2Transformer2DModel(**FULL_TRANSFORMER_CONFIGS[name])
    g = None if device.type == "meta" else torch.Generator(device).manual_seed(_seed(seed, _TRANSFORMER_SEED))
    for unit_name, unit, is_block in _build_units(tr):
        if g is not None:
            unit.to_empty(device=device)
            _fill_(unit, unit_name, g)
        if is_block:
            quantize_block(unit, quant)
    return tr


def _build_full(name: str, dtype: torch.dtype, device: torch.device, seed: int, quant: str) -> Components:
    """The transformer block by block (``_full_transformer``: no 64 GB bf16 copy anywhere), the VAE
    straight on ``device`` from its own seed; ``normal_(0, 0.02)`` keeps bf16 activations finite."""
    transformer = _full_transformer(name, dtype, device, seed, quant)
    torch.manual_seed(_seed(seed, _VAE_SEED))
    with _default_dtype(dtype), device:
        vae = AutoencoderKLFlux2()
    _set_bn_stats(vae, seed)
    dev = name == "flux2-dev"
    return Components(
        family="dev" if dev else "klein",
        transformer=transformer,
        vae=vae,
        scheduler=flux2_scheduler(),
        text_encoder=None,
        tokenizer=None,
        is_distilled=dev,
        text_layers=DEV_TEXT_LAYERS if dev else KLEIN_TEXT_LAYERS,
        name=name,
    )
