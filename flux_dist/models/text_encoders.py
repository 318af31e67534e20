"""FLUX.2's text encoders at full size, cut to the layers FLUX.2 reads, with weights from anywhere.

FLUX.2 stacks three hidden states of a decoder LM into the prompt embedding: (10, 20, 30) of Mistral
Small 3.1 for [dev], (9, 18, 27) of Qwen3 for [klein]. Everything after the last of them (10 more
Mistral layers, the final norm, ``lm_head``) and the whole Pixtral vision tower never influence the
embedding, so the encoder this module builds is the decoder's base model (``MistralModel`` /
``Qwen3Model``) with only ``max(layers)`` layers and **no final norm**: transformers overwrites the
last entry of ``hidden_states`` with the normed ``last_hidden_state``, so a plain cut would return
``norm(layer 30)`` where the whole model returns layer 30 itself. With the norm an identity the cut
encoder's ``hidden_states[k]`` are the whole encoder's, bit for bit, and the diffusers helpers
(``Flux2Pipeline._get_mistral_3_small_prompt_embeds`` / ``Flux2KleinPipeline._get_qwen3_prompt_embeds``)
run on it unchanged.

Shapes (full size), and where they come from:

* [dev] text encoder, Mistral Small 3.1 24B (``Mistral3ForConditionalGeneration``): the
  ``config.json`` of mistralai/Mistral-Small-3.1-24B-Instruct-2503 as embedded in kohya-ss/musubi-tuner
  ``src/musubi_tuner/flux_2/flux2_utils.py`` (``M3_CONFIG_JSON``, FLUX.2's text encoder, transformers
  4.57.1), identical to vLLM's test config and to DESIGN.md / issue 11: text hidden 5120, 40 layers,
  32 heads / 8 KV heads, head 128, MLP 32768, vocab 131072, RoPE theta 1e9; Pixtral vision tower
  hidden 1024, 24 layers, 16 heads, head 64, MLP 4096, patch 14, image 1540; projector spatial merge 2.
* [klein] 4B: Qwen3-4B, [klein] 9B: Qwen3-8B (musubi-tuner ``load_text_embedder``: ``qwen_variant``
  "4B" / "8B"; its ``zimage/zimage_utils.py`` holds both ``config.json``\\ s): Qwen3-4B hidden 2560,
  36 layers, 32 / 8 heads, head 128, MLP 9728, vocab 151936, tied embeddings; Qwen3-8B hidden 4096,
  36 layers, 32 / 8 heads, head 128, MLP 12288, vocab 151936, untied. 3 x 2560 = 7680 and
  3 x 4096 = 12288 are the [klein] transformers' ``joint_attention_dim``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import FluxDistError

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
TEXT_ENCODER_MODES = ("auto", "none")
_TEXT_SEED, _VISION_SEED = 1, 5  # presets' seed streams (presets._TEXT_SEED is 1; 5 is unused there)


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


# ------------------------------------------------------------------------------------------------
# truncation


def layers_needed(hidden_layers: tuple[int, ...] | list[int], num_layers: int) -> int:
    """How many decoder layers feed ``hidden_states[k]`` for every requested k (index 0 = embeddings)."""
    idx = [k % (num_layers + 1) for k in hidden_layers]
    return max(idx) if idx else 0


def decoder_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The base decoder (``MistralModel`` / ``Qwen3Model``) inside an LM and its state-dict prefix."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):  # Mistral3ForConditionalGeneration
        return inner.language_model, "model.language_model."
    if hasattr(model, "language_model") and hasattr(model.language_model, "layers"):  # Mistral3Model
        return model.language_model, "language_model."
    if inner is not None and hasattr(inner, "layers"):  # *ForCausalLM
        return inner, "model."
    if hasattr(model, "layers") and hasattr(model, "embed_tokens"):  # already a base decoder
        return model, ""
    raise FluxDistError(f"cannot find the decoder layers of {type(model).__name__}: not a Mistral3 / Qwen3 LM")


def _cut_(decoder: nn.Module, n: int) -> nn.Module:
    """Keep ``n`` layers and make the final norm an identity when layers were dropped (in place)."""
    total = len(decoder.layers)
    cfg = copy.deepcopy(decoder.config)
    if n < total:
        decoder.layers = nn.ModuleList(list(decoder.layers)[:n])
        decoder.norm = nn.Identity()  # hidden_states[n] is then layer n's output, as in the whole model
        cfg.num_hidden_layers = n
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = list(cfg.layer_types)[:n]
        if hasattr(cfg, "max_window_layers") and cfg.max_window_layers and cfg.max_window_layers > n:
            cfg.max_window_layers = n
    # hidden_states[-1] stays layer n's output (not overwritten with the norm's): belt and braces
    cfg.tie_last_hidden_states = n >= total
    decoder.config = cfg
    for layer in decoder.layers:
        if hasattr(layer, "self_attn"):
            layer.self_attn.config = cfg
    return decoder


def truncate_text_encoder(model: nn.Module, hidden_layers: tuple[int, ...] | list[int]) -> nn.Module:
    """The decoder of ``model`` cut to the layers feeding ``hidden_states[k]`` for ``k in hidden_layers``,
    without ``lm_head``, the vision tower and projector, and with no final norm when layers were cut.

    Shares the parameters with ``model`` (in place: ``model`` itself is left without those layers). The
    diffusers prompt-embedding helpers run on the result unchanged and give bit-identical embeddings.
    """
    decoder, _ = decoder_of(model)
    n = layers_needed(hidden_layers, len(decoder.layers))
    return _cut_(decoder, n).eval().requires_grad_(False)


def build_shell(kind: str, config: Any, hidden_layers: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    """The truncated decoder on the meta device (shapes only)."""
    from transformers import MistralModel, Qwen3Model

    t = copy.deepcopy(text_config(config))
    n = layers_needed(hidden_layers, t.num_hidden_layers)
    total = t.num_hidden_layers
    t.num_hidden_layers = n
    if getattr(t, "layer_types", None):
        t.layer_types = list(t.layer_types)[:n]
    cls = MistralModel if kind == "mistral3" else Qwen3Model
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            dec = cls(t)
    finally:
        torch.set_default_dtype(prev)
    if n < total:
        dec.norm = nn.Identity()
    dec.config.tie_last_hidden_states = n >= total
    return dec.eval().requires_grad_(False)


def build_whole_shell(kind: str, config: Any, dtype: torch.dtype) -> nn.Module:
    """The whole encoder as FLUX.2 ships it (Mistral3ForConditionalGeneration / Qwen3ForCausalLM) on meta."""
    from transformers import Mistral3ForConditionalGeneration, Qwen3ForCausalLM

    cls = Mistral3ForConditionalGeneration if kind == "mistral3" else Qwen3ForCausalLM
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            m = cls(copy.deepcopy(config))
    finally:
        torch.set_default_dtype(prev)
    return m.eval().requires_grad_(False)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# weights: one protocol for random, in-memory and safetensors sources


class WeightSource:
    """Gives a parameter's values (or only rows / columns of it) by the decoder's parameter name.

    ``read`` is called once per parameter of the decoder, in ``named_parameters()`` order.
    """

    def read(self, name: str, shape: tuple[int, ...], index: tuple[Any, ...], device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class RandomWeights(WeightSource):
    """Seeded random weights drawn on the device: matrices ``N(0, 0.02)``, RMSNorm gains 1.

    The full tensor is drawn every time (then indexed), so a shard equals the same rows of the
    unsharded weight, and a truncated encoder's weights are the whole one's first layers: the draws
    follow the decoder's ``named_parameters()`` order, which is a prefix of the whole decoder's.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}

    def _gen(self, device: torch.device) -> torch.Generator:
        if device not in self._gens:
            self._gens[device] = torch.Generator(device).manual_seed(self.seed)
        return self._gens[device]

    def read(self, name, shape, index, device, dtype):
        if len(shape) >= 2:
            full = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=self._gen(device))
        elif name.endswith("norm.weight"):
            full = torch.ones(shape, device=device, dtype=dtype)
        else:
            raise FluxDistError(f"random text encoder: no rule for parameter {name} {tuple(shape)}")
        return full[index].contiguous() if index else full

    def describe(self) -> str:
        return f"random(seed={self.seed})"


class ModuleWeights(WeightSource):
    """The tensors of an already built encoder (a tiny preset, a model loaded with from_pretrained)."""

    def __init__(self, model: nn.Module) -> None:
        decoder, _ = decoder_of(model)
        self.sd = dict(decoder.named_parameters())

    def read(self, name, shape, index, device, dtype):
        t = self.sd[name].detach()
        return (t[index] if index else t).to(device=device, dtype=dtype).contiguous()


class SafetensorsWeights(WeightSource):
    """A text_encoder folder (one file or a sharded index); only the requested rows / columns are read."""

    PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")

    def __init__(self, folder: str) -> None:
        from safetensors import safe_open

        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
            files = {k: os.path.join(folder, v) for k, v in wm.items()}
        elif os.path.exists(os.path.join(folder, "model.safetensors")):
            path = os.path.join(folder, "model.safetensors")
            with safe_open(path, "pt") as f:
                files = dict.fromkeys(f.keys(), path)
        else:
            raise FluxDistError(f"{folder}: no model.safetensors (nor model.safetensors.index.json)")
        self.files = files
        self.folder = folder
        self._open: dict[str, Any] = {}

    def _key(self, name: str) -> str:
        for p in self.PREFIXES:
            if p + name in self.files:
                return p + name
        raise FluxDistError(f"{self.folder}: no tensor for text encoder parameter {name!r}")

    def read(self, name, shape, index, device, dtype):
        from safetensors import safe_open

        key = self._key(name)
        path = self.files[key]
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        sl = self._open[path].get_slice(key)
        t = sl[index] if index else sl[:]
        t = t.to(device=device, dtype=dtype).contiguous()
        # a fresh, aligned allocation like a built model's (CPU kernels round differently on unaligned data)
        return t.clone() if t.device.type == "cpu" and t.data_ptr() % 64 else t

    def describe(self) -> str:
        return f"safetensors({self.folder})"


def _rebuild_rotary_(decoder: nn.Module, device: torch.device) -> None:
    """RoPE tables are computed buffers: make them fresh (float32) on ``device`` rather than from_empty."""
    rot = decoder.rotary_emb
    with torch.device("cpu"):
        new = type(rot)(config=decoder.config)
    decoder.rotary_emb = new.to(device)


def materialize_(decoder: nn.Module, source: WeightSource, device: torch.device, dtype: torch.dtype,
                 local_index: Callable[[str, nn.Parameter], tuple[Any, ...]] | None = None) -> nn.Module:
    """Fill a meta decoder (possibly tensor-parallel: DTensor parameters) from ``source``, one tensor at a
    time, straight on ``device``: no copy of the whole encoder exists anywhere but in its final place.

    ``local_index(name, param)`` gives the slice of the unsharded tensor this rank holds (a sharded
    parameter), or ``()`` for the whole tensor.
    """
    from torch.distributed.tensor import DTensor

    for name, p in list(decoder.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = decoder.get_submodule(owner_name) if owner_name else decoder
        index = local_index(name, p) if local_index else ()
        orig_shape = getattr(owner, "_flux_dist_orig_shape", {}).get(leaf, tuple(p.shape))
        t = source.read(name, orig_shape, index, device, dtype)
        if isinstance(p, DTensor):
            t = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        setattr(owner, leaf, nn.Parameter(t, requires_grad=False))
    _rebuild_rotary_(decoder, device)
    return decoder


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
    from .presets import DEV_TEXT_LAYERS, KLEIN_TEXT_LAYERS

    if name not in FULL_TEXT_ENCODERS:
        raise FluxDistError(f"no full-size text encoder for {name!r} (have: {', '.join(FULL_TEXT_ENCODERS)})")
    kind, cfg = FULL_TEXT_ENCODERS[name]
    layers = DEV_TEXT_LAYERS if kind == "mistral3" else KLEIN_TEXT_LAYERS
    return EncoderSpec(kind, make_config(kind, cfg), tuple(layers), f"{name}/text_encoder/seed={seed}")


def spec_for_dir(path: str, family: str) -> EncoderSpec:
    from .presets import DEV_TEXT_LAYERS, KLEIN_TEXT_LAYERS

    config = read_dir_config(path)
    kind = "mistral3" if family == "dev" else "qwen3"
    layers = DEV_TEXT_LAYERS if family == "dev" else KLEIN_TEXT_LAYERS
    return EncoderSpec(kind, config, tuple(layers), f"{os.path.abspath(path)}/text_encoder")


def spec_for_module(model: nn.Module, family: str, name: str) -> EncoderSpec:
    from .presets import DEV_TEXT_LAYERS, KLEIN_TEXT_LAYERS

    kind = "mistral3" if family == "dev" else "qwen3"
    layers = DEV_TEXT_LAYERS if family == "dev" else KLEIN_TEXT_LAYERS
    return EncoderSpec(kind, model.config, tuple(layers), f"{name}/text_encoder")


def build_tokenizer(kind: str, config: Any) -> Any:
    """A locally built tokenizer whose length is the encoder's vocabulary size (the tiny byte-level BPE,
    padded with never-produced entries): real prompts tokenize, and ids span the real table."""
    from .tokenizers import build_mistral_processor, build_qwen_tokenizer

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
    from ..quant import RESOLVED_MODES, QuantLinear

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


# The tiny presets' encoder shape (presets._tiny_mistral3 / _tiny_qwen3), for checks before they are built.
TINY_TEXT_SHAPE = TextShape(num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                            num_hidden_layers=31, hidden_size=32)


def family_of(model: str) -> str:
    """``dev`` or ``klein`` for a preset name or a diffusers-format directory, without loading weights."""
    if model in ("flux2-dev", "flux2-tiny"):
        return "dev"
    if model.startswith("flux2-klein"):
        return "klein"
    from .loading import PIPELINE_FAMILIES, _read_model_index

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
    from ..parallel.text_encoder import check_placement, resolve_placement
    from ..quant import MODES

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
    from ..parallel.text_encoder import PromptEncoder, shard_decoder_, world_mesh
    from ..quant import resolve_mode

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
            from .presets import _seed

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
