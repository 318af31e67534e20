"""The prompt encoder one rank builds: spec, tokenizer, FLUX.2's embedding recipe, FP8, placement checks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ...errors import FluxDistError
from .cut import build_shell
from .shapes import (
    _TEXT_SEED,
    FULL_TEXT_ENCODERS,
    TEXT_ENCODER_MODES,
    TextShape,
    make_config,
    read_dir_config,
    text_config,
)
from .weights import ModuleWeights, RandomWeights, SafetensorsWeights, WeightSource, materialize_

# ------------------------------------------------------------------------------------------------
# FLUX.2's recipe: which encoder a model has and how a prompt becomes an embedding


@dataclass
class EncoderSpec:
    """Everything needed to build the (truncated) encoder of one model, before any weight is read."""

    kind: str  # "mistral3" | "qwen3"
    config: Any  # transformers config of the whole encoder
    hidden_layers: tuple[int, ...]
    identity: str  # keys the prompt cache: model name + encoder + seed / directory

    @property
    def shape(self) -> TextShape:
        return TextShape.of(self.config)


def spec_for_preset(name: str, seed: int) -> EncoderSpec:
    from ..components import DEV_TEXT_LAYERS, KLEIN_TEXT_LAYERS

    if name not in FULL_TEXT_ENCODERS:
        raise FluxDistError(f"no full-size text encoder for {name!r} (have: {', '.join(FULL_TEXT_ENCODERS)})")
    kind, cfg = FULL_TEXT_ENCODERS[name]
    layers = DEV_TEXT_LAYERS if kind == "mistral3" else KLEIN_TEXT_LAYERS
    return EncoderSpec(kind, make_config(kind, cfg), tuple(layers), f"{name}/text_encoder/seed={seed}")


def spec_for_dir(path: str, family: str) -> EncoderSpec:
    from ..components import DEV_TEXT_LAYERS, KLEIN_TEXT_LAYERS

    config = read_dir_config(path)
    kind = "mistral3" if family == "dev" else "qwen3"
    layers = DEV_TEXT_LAYERS if family == "dev" else KLEIN_TEXT_LAYERS
    return EncoderSpec(kind, config, tuple(layers), f"{os.path.abspath(path)}/text_encoder")


def spec_for_module(model: nn.Module, family: str, name: str) -> EncoderSpec:
    from ..components import DEV_TEXT_LAYERS, KLEIN_TEXT_LAYERS

    kind = "mistral3" if family == "dev" else "qwen3"
    layers = DEV_TEXT_LAYERS if family == "dev" else KLEIN_TEXT_LAYERS
    return EncoderSpec(kind, model.config, tuple(layers), f"{name}/text_encoder")


def build_tokenizer(kind: str, config: Any) -> Any:
    """A locally built tokenizer whose length is the encoder's vocabulary size (the tiny byte-level BPE,
    padded with never-produced entries): real prompts tokenize, and ids span the real table."""
    from ..tokenizers import build_mistral_processor, build_qwen_tokenizer

    vocab = text_config(config).vocab_size
    if kind == "mistral3":
        v = config.vision_config
        return build_mistral_processor(patch_size=v.patch_size, image_size=v.image_size,
                                       spatial_merge_size=config.spatial_merge_size, pad_vocab_to=vocab)
    return build_qwen_tokenizer(pad_vocab_to=vocab)


EncodeFn = Callable[[nn.Module, Any, str, torch.device, int], torch.Tensor]


def flux2_encode_fn(family: str, hidden_layers: tuple[int, ...]) -> EncodeFn:
    """FLUX.2's prompt-embedding recipe (diffusers' pipeline helpers) as ``fn(encoder, tokenizer, prompt,
    device, max_len) -> [1, T, 3 * hidden]``; runs on the whole encoder and on the truncated one alike."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    layers = list(hidden_layers)

    def encode(text_encoder, tokenizer, prompt, device, max_len):
        if family == "dev":
            return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
                text_encoder, tokenizer, prompt, device=device, max_sequence_length=max_len,
                hidden_states_layers=layers)
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder, tokenizer, prompt, device=device, max_sequence_length=max_len, hidden_states_layers=layers)

    return encode


def iter_linears(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            yield name, m


def quantize_encoder_(decoder: nn.Module, mode: str) -> int:
    """The decoder layers' linears (attention q/k/v/o, MLP gate/up/down) through flux-dist's QuantLinear;
    embeddings and norms stay in the model dtype. Returns how many linears were swapped."""
    from ...quant import RESOLVED_MODES, QuantLinear

    if mode not in RESOLVED_MODES:
        raise FluxDistError(f"cannot quantize the text encoder to '{mode}' (choose from {', '.join(RESOLVED_MODES)})")
    if mode == "none":
        return 0
    n = 0
    for name, lin in list(iter_linears(decoder)):
        if not name.startswith("layers."):
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(decoder.get_submodule(parent), leaf, QuantLinear(lin, mode))
        n += 1
    return n


# ------------------------------------------------------------------------------------------------
# the factory the engine calls


def load_dir_tokenizer(path: str, family: str) -> Any:
    from transformers import PixtralProcessor, Qwen2TokenizerFast

    folder = os.path.join(path, "tokenizer")
    if family == "dev":
        return PixtralProcessor.from_pretrained(folder, local_files_only=True)
    return Qwen2TokenizerFast.from_pretrained(folder, local_files_only=True)


def encoder_spec(model: str, family: str, seed: int, whole: nn.Module | None = None) -> EncoderSpec:
    """The encoder of ``model`` (a preset name or a directory), before anything is loaded: for the
    placement checks (``spec.shape``) and the build."""
    if model in FULL_TEXT_ENCODERS:
        return spec_for_preset(model, seed)
    if whole is not None:
        return spec_for_module(whole, family, f"{model}/seed={seed}")
    if os.path.isdir(model):
        return spec_for_dir(model, family)
    raise FluxDistError(f"'{model}': no text encoder to build (not a full-size preset, no directory, no module)")


# The tiny presets' encoder shape (tiny._tiny_mistral3 / _tiny_qwen3), for checks before they are built.
TINY_TEXT_SHAPE = TextShape(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                            num_hidden_layers=31, hidden_size=32)


def family_of(model: str) -> str:
    """``dev`` or ``klein`` for a preset name or a diffusers-format directory, without loading weights."""
    if model in ("flux2-dev", "flux2-tiny"):
        return "dev"
    if model.startswith("flux2-klein"):
        return "klein"
    from ..loading import PIPELINE_FAMILIES, _read_model_index

    try:
        cls = _read_model_index(model).get("_class_name")
    except (FileNotFoundError, ValueError) as e:
        raise FluxDistError(f"cannot read model '{model}': {e}") from e
    if cls not in PIPELINE_FAMILIES:
        raise FluxDistError(f"'{model}': model_index.json _class_name {cls!r} is not a FLUX.2 pipeline")
    return PIPELINE_FAMILIES[cls]


def check_text_encoder_options(model: str, family: str, *, mode: str, placement: str, quant: str,
                               device: torch.device, world: int, seed: int = 0,
                               whole: nn.Module | None = None) -> str:
    """All text-encoder options checked before loading; returns the resolved placement."""
    from ...parallel.text_encoder import check_placement, resolve_placement
    from ...quant import MODES

    if mode not in TEXT_ENCODER_MODES:
        raise FluxDistError(f"unknown --text-encoder '{mode}' (choose from {', '.join(TEXT_ENCODER_MODES)})")
    resolved = resolve_placement(placement, device, world)
    if quant not in ("none", "fp8", "fp8-emulate") or quant not in MODES:
        raise FluxDistError(f"unknown --text-encoder-quant '{quant}' (choose from none, fp8, fp8-emulate)")
    if quant != "none" and resolved in ("shard", "offload"):
        raise FluxDistError(f"--text-encoder-quant {quant} runs with placements every and first, not {resolved}")
    if mode == "none":
        return resolved
    tiny = whole is None and model in ("flux2-tiny", "flux2-klein-tiny")
    check_placement(resolved, world, TINY_TEXT_SHAPE if tiny else encoder_spec(model, family, seed, whole).shape)
    return resolved


def build_prompt_encoder(model: str, family: str, *, placement: str, device: torch.device, dtype: torch.dtype,
                         rank: int, world: int, seed: int = 0, cache_mb: float = 0.0, quant: str = "none",
                         whole: nn.Module | None = None, tokenizer: Any = None):
    """The ``PromptEncoder`` of ``model`` on this rank (every rank calls it, collectively under ``shard``).

    Weights: a full-size preset draws them (``RandomWeights``, seed stream of the preset's text encoder),
    a directory reads ``text_encoder/*.safetensors`` (only this rank's slices under ``shard``), a tiny
    preset or an already loaded model takes ``whole``'s tensors. Only the layers FLUX.2 reads are built,
    straight on the device (meta shell, then tensor by tensor); ranks that do not run the encoder under
    ``first`` / ``offload`` build nothing. ``quant``: ``fp8`` / ``fp8-emulate`` (a resolved mode) puts the
    decoder layers' linears through QuantLinear.
    """
    from ...parallel.text_encoder import PromptEncoder, shard_decoder_, world_mesh
    from ...quant import resolve_mode

    placement = check_text_encoder_options(model, family, mode="auto", placement=placement, quant=quant,
                                           device=device, world=world, seed=seed, whole=whole)
    quant = resolve_mode(quant, device)
    spec = encoder_spec(model, family, seed, whole)
    builds = placement in ("every", "shard") or rank == 0
    decoder = None
    if builds:
        if whole is not None:
            source: WeightSource = ModuleWeights(whole)
        elif model in FULL_TEXT_ENCODERS:
            from ..components import _seed

            source = RandomWeights(_seed(seed, _TEXT_SEED))
        else:
            source = SafetensorsWeights(os.path.join(model, "text_encoder"))
        if tokenizer is None:
            tokenizer = (build_tokenizer(spec.kind, spec.config) if model in FULL_TEXT_ENCODERS
                         else load_dir_tokenizer(model, family))
        decoder = build_shell(spec.kind, spec.config, spec.hidden_layers, dtype)
        local_index = shard_decoder_(decoder, world_mesh(device)) if placement == "shard" and world > 1 else None
        target = torch.device("cpu") if placement == "offload" else device
        materialize_(decoder, source, target, dtype, local_index)
        quantize_encoder_(decoder, quant)
        if placement == "offload":
            from diffusers.hooks import apply_group_offloading

            apply_group_offloading(decoder, onload_device=device, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    return PromptEncoder(placement=placement, encoder=decoder, tokenizer=tokenizer,
                         encode_fn=flux2_encode_fn(family, spec.hidden_layers), identity=spec.identity,
                         device=device, rank=rank, world=world, cache_mb=cache_mb, quant=quant)
