"""What a loaded model is (``Components``) and the seeded-construction helpers every preset builder shares.

Every rank builds its own copy of a preset, so construction must be bit-identical across processes
for one seed: the order of construction is fixed and all randomness comes from seeded generators.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

# Text-encoder hidden-state layers each family's pipeline stacks into the prompt embedding.
DEV_TEXT_LAYERS: tuple[int, ...] = (10, 20, 30)
KLEIN_TEXT_LAYERS: tuple[int, ...] = (9, 18, 27)

# Offsets that give each component its own seed stream: changing one tiny config leaves the
# others' weights alone. seed * 1000 keeps different user seeds from colliding.
_SEED_STRIDE = 1000
_TEXT_SEED, _TRANSFORMER_SEED, _VAE_SEED, _BN_SEED = 1, 2, 3, 4


@dataclass
class Components:
    """Everything one rank needs to serve a model; modules are plain diffusers / transformers ones."""

    family: str  # "dev" (guidance-distilled, Mistral3 encoder) or "klein" (Qwen3 encoder)
    transformer: Flux2Transformer2DModel
    vae: AutoencoderKLFlux2
    scheduler: FlowMatchEulerDiscreteScheduler
    text_encoder: torch.nn.Module | None  # None when prompts are replaced by random embeddings
    tokenizer: Any | None  # PixtralProcessor for dev, Qwen2TokenizerFast for klein
    is_distilled: bool  # klein: False -> true CFG with "" as negative prompt
    text_layers: tuple[int, ...]  # (10, 20, 30) dev, (9, 18, 27) klein
    name: str  # preset name or model path
    quant: str = "none"  # the mode the transformer's quantized linears run (what the engine reports)


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler FLUX.2 ships (FLUX.1's config); the pipelines pass an empirical ``mu``."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def _seed(seed: int, component: int) -> int:
    return (seed * _SEED_STRIDE + component) % 2**64  # manual_seed's range; unchanged below it


@contextlib.contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    """Seed freely inside without disturbing the caller's global RNG streams."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _set_bn_stats(vae: AutoencoderKLFlux2, seed: int) -> None:
    """Give the latent BatchNorm non-trivial running stats so de-normalization is exercised.

    Drawn on the CPU with their own generator: identical on every device and process.
    """
    bn = vae.bn
    n = bn.num_features
    g = torch.Generator("cpu").manual_seed(_seed(seed, _BN_SEED))
    mean = torch.randn(n, generator=g) * 0.5
    var = torch.rand(n, generator=g) * 1.5 + 0.5
    if bn.running_mean.device.type == "meta":
        return
    with torch.no_grad():
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
