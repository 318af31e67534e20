"""Tiny FLUX.2 presets: the [dev] / [klein] architectures shrunk until a 64x64 image runs end to end on
a CPU in well under a second, with real (tiny) text encoders and tokenizers, so that the diffusers
pipelines run unchanged and serve as the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from .components import (
    _TEXT_SEED,
    _TRANSFORMER_SEED,
    _VAE_SEED,
    DEV_TEXT_LAYERS,
    KLEIN_TEXT_LAYERS,
    Components,
    _seed,
    _set_bn_stats,
    flux2_scheduler,
)
from .tokenizers import MODEL_MAX_LENGTH, build_mistral_processor, build_qwen_tokenizer

# Tiny sizes. 4 heads so that Ulysses degrees 2 and 4 divide them; the RoPE axes sum to head_dim.
TINY_HEADS = 4
TINY_HEAD_DIM = 16
TINY_TEXT_HIDDEN = 32
TINY_LATENT_CHANNELS = 8
TINY_VAE_CHANNELS = (8, 16, 16, 32)  # four blocks -> VAE scale factor 8, as the real one: 128x128 px -> 64 tokens


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
