"""Full-size shapes of FLUX.2's text encoders (sources in the package docstring) and config helpers."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

from ...config import TextEncoderMode, choices
from ...errors import FluxDistError

# preset -> (family, encoder kind, config). Kept as plain dicts so a transformers change shows.
MISTRAL_SMALL_31: dict[str, Any] = dict(
    image_token_index=10,
    multimodal_projector_bias=False,
    projector_hidden_act="gelu",
    spatial_merge_size=2,
    vision_feature_layer=-1,
    tie_word_embeddings=False,
    text_config=dict(
        model_type="mistral", head_dim=128, hidden_act="silu", hidden_size=5120, intermediate_size=32768,
        max_position_embeddings=131072, num_attention_heads=32, num_hidden_layers=40, num_key_value_heads=8,
        rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None, vocab_size=131072, attention_dropout=0.0,
    ),
    vision_config=dict(
        model_type="pixtral", head_dim=64, hidden_act="silu", hidden_size=1024, image_size=1540,
        intermediate_size=4096, num_attention_heads=16, num_channels=3, num_hidden_layers=24, patch_size=14,
        rope_theta=10000.0, attention_dropout=0.0,
    ),
)
QWEN3_4B: dict[str, Any] = dict(
    head_dim=128, hidden_act="silu", hidden_size=2560, intermediate_size=9728, max_position_embeddings=40960,
    num_attention_heads=32, num_hidden_layers=36, num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, vocab_size=151936, attention_bias=False, bos_token_id=151643, eos_token_id=151645,
)
QWEN3_8B: dict[str, Any] = dict(QWEN3_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)

# Full-size presets -> their encoder: (kind, config dict). kind "mistral3" | "qwen3".
FULL_TEXT_ENCODERS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux2-dev": ("mistral3", MISTRAL_SMALL_31),
    "flux2-klein-4b": ("qwen3", QWEN3_4B),
    "flux2-klein-9b": ("qwen3", QWEN3_8B),
}
TEXT_ENCODER_MODES = choices(TextEncoderMode)
_TEXT_SEED, _VISION_SEED = 1, 5  # presets' seed streams (components._TEXT_SEED is 1; 5 is unused there)


def make_config(kind: str, cfg: dict[str, Any]):
    """The transformers config object of a full-size encoder."""
    if kind == "mistral3":
        from transformers import Mistral3Config

        return Mistral3Config(**copy.deepcopy(cfg))
    if kind == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**copy.deepcopy(cfg))
    raise ValueError(f"unknown text encoder kind {kind!r}")


def text_config(config: Any) -> Any:
    """The decoder's config: ``text_config`` of a Mistral3 config, the config itself for Qwen3."""
    return getattr(config, "text_config", None) or config


@dataclass(frozen=True)
class TextShape:
    """What placement checks need, known before any weight is read."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_hidden_layers: int
    hidden_size: int

    @classmethod
    def of(cls, config: Any) -> TextShape:
        t = text_config(config)
        return cls(t.num_attention_heads, t.num_key_value_heads, t.intermediate_size, t.num_hidden_layers,
                   t.hidden_size)


def read_dir_config(path: str) -> Any:
    """The text encoder config of a diffusers-format directory, read from its ``config.json`` only."""
    from transformers import AutoConfig

    folder = os.path.join(path, "text_encoder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FluxDistError(f"{path!r} has no text_encoder/config.json")
    return AutoConfig.from_pretrained(folder, local_files_only=True)
