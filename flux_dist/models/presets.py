"""Model presets: tiny random FLUX.2 models for CPU tests, full-size random ones for benchmarks.

No weights can be downloaded, so every preset is built from a config with seeded random weights.
Every rank builds its own copy, so construction must be bit-identical across processes for one
seed: the order of construction is fixed and all randomness comes from seeded generators.

* ``flux2-tiny`` / ``flux2-klein-tiny``: the [dev] / [klein] architectures shrunk until a 64x64
  image runs end to end on a CPU in well under a second, with real (tiny) text encoders and
  tokenizers so that the diffusers pipelines run unchanged and serve as a reference.
* ``flux2-dev`` / ``flux2-klein-4b``: the real transformer shapes with random weights and no text
  encoder (the engine feeds random prompt embeddings), for memory and speed measurements.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from ..quant import quantize_block, quantize_transformer
from .tokenizers import MODEL_MAX_LENGTH, build_mistral_processor, build_qwen_tokenizer

PRESETS: tuple[str, ...] = ("flux2-tiny", "flux2-klein-tiny", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b")

# Text-encoder hidden-state layers each family's pipeline stacks into the prompt embedding.
DEV_TEXT_LAYERS: tuple[int, ...] = (10, 20, 30)
KLEIN_TEXT_LAYERS: tuple[int, ...] = (9, 18, 27)

# Tiny sizes. 4 heads so that Ulysses degrees 2 and 4 divide them; the RoPE axes sum to head_dim.
TINY_HEADS = 4
TINY_HEAD_DIM = 16
TINY_TEXT_HIDDEN = 32
TINY_LATENT_CHANNELS = 8
TINY_VAE_CHANNELS = (8, 16, 16, 32)  # four blocks -> VAE scale factor 8, as the real one: 128x128 px -> 64 tokens

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
    return seed * _SEED_STRIDE + component


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


# ----------------------------------------------------------------------------------------------
# tiny presets


def _tiny_transformer(*, guidance_embeds: bool) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * TINY_LATENT_CHANNELS,  # the pipelines pack 2x2 latent patches into tokens
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=TINY_HEAD_DIM,
        num_attention_heads=TINY_HEADS,
        joint_attention_dim=3 * TINY_TEXT_HIDDEN,  # three stacked encoder layers
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=guidance_embeds,
    )


def _tiny_vae() -> AutoencoderKLFlux2:
    return AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(TINY_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(TINY_VAE_CHANNELS),
        block_out_channels=TINY_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
    )


def _tiny_mistral3(processor: Any) -> Mistral3ForConditionalGeneration:
    tok = processor.tokenizer
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tok),
            "hidden_size": TINY_TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": max(DEV_TEXT_LAYERS) + 1,  # hidden_states[30] must be a real layer
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": MODEL_MAX_LENGTH,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e9,
            "sliding_window": None,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "head_dim": 8,
            "image_size": 32,
            "patch_size": 4,
            "num_channels": 3,
        },
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Mistral3ForConditionalGeneration(config)


def _tiny_qwen3(tok: Any) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=max(KLEIN_TEXT_LAYERS) + 1,  # hidden_states[27] must be a real layer
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return Qwen3ForCausalLM(config)


def _unit_gain_(module: torch.nn.Module, seed: int, only: str = "") -> None:
    """Re-draw the matrices (names containing ``only``) as N(0, 1/fan_in): unit-gain layers.

    Default inits (kaiming-uniform with a=sqrt(5), HF's std 0.02) shrink every residual update,
    so a random model is nearly the identity on its input and ignores the prompt.
    """
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 2 and only in name:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)


def _make_text_encoder_informative(text_encoder: torch.nn.Module, pad_id: int, seed: int) -> None:
    """Make the prompt visible in the embeddings the pipeline stacks (not just in a few rows).

    Unit-variance token embeddings give O(1) hidden states like a trained encoder's; a zero pad
    embedding turns the ~500 pad rows into summaries of the real tokens they attend to; unit-gain
    decoder layers make those summaries large. With HF's init a prompt changed the transformer's
    output by ~0.05%; with this, by 5-25%, so CFG and prompt handling are actually exercised.
    """
    g = torch.Generator("cpu").manual_seed(seed)
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb.normal_(0.0, 1.0, generator=g)
        emb[pad_id].zero_()
    _unit_gain_(text_encoder, seed + 1, only="layers.")


def _build_tiny(name: str, seed: int) -> Components:
    """Build on the CPU in float32, each component from its own seed, in a fixed order."""
    dev = name == "flux2-tiny"
    if dev:
        tokenizer: Any = build_mistral_processor(patch_size=4, image_size=32, spatial_merge_size=2)
    else:
        tokenizer = build_qwen_tokenizer()
    torch.manual_seed(_seed(seed, _TEXT_SEED))
    text_encoder = _tiny_mistral3(tokenizer) if dev else _tiny_qwen3(tokenizer)
    pad_id = (tokenizer.tokenizer if dev else tokenizer).pad_token_id
    _make_text_encoder_informative(text_encoder, pad_id, _seed(seed, _TEXT_SEED))
    torch.manual_seed(_seed(seed, _TRANSFORMER_SEED))
    transformer = _tiny_transformer(guidance_embeds=dev)
    _unit_gain_(transformer, _seed(seed, _TRANSFORMER_SEED))
    torch.manual_seed(_seed(seed, _VAE_SEED))
    vae = _tiny_vae()
    _set_bn_stats(vae, seed)
    return Components(
        family="dev" if dev else "klein",
        transformer=transformer,
        vae=vae,
        scheduler=flux2_scheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        is_distilled=dev,
        text_layers=DEV_TEXT_LAYERS if dev else KLEIN_TEXT_LAYERS,
        name=name,
    )


# ----------------------------------------------------------------------------------------------
# full-size presets

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

    if c.text_encoder is None or c.tokenizer is None:
        raise ValueError(f"{c.name} has no text encoder here (random prompt embeddings): nothing to save it with")
    os.makedirs(path, exist_ok=True)
    pipe = to_diffusers_pipeline(c)
    pipe.save_config(path)  # model_index.json
    for name in ("vae", "scheduler", "text_encoder", "tokenizer"):
        getattr(c, name).save_pretrained(os.path.join(path, name))
    save_quantized(c.transformer, mode, os.path.join(path, "transformer"), fmt=fmt)


def save_components(c: Components, path: str) -> None:
    """Write a diffusers-format directory (model_index.json + one subfolder per component)."""
    os.makedirs(path, exist_ok=True)
    to_diffusers_pipeline(c).save_pretrained(path, safe_serialization=True)
