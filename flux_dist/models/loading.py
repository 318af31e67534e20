"""Load a local diffusers-format FLUX.2 directory into ``Components``, strictly offline.

Each component is loaded with its own class (not ``DiffusionPipeline.from_pretrained``) so that the
engine gets plain modules, each placed on its device and dtype directly, and so that a broken
directory fails with a message naming the missing piece instead of a hub lookup.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from transformers import (
    Mistral3ForConditionalGeneration,
    PixtralProcessor,
    Qwen2TokenizerFast,
    Qwen3ForCausalLM,
)

from ..errors import FluxDistError
from ..quant import checkpoint_format
from .components import DEV_TEXT_LAYERS, KLEIN_TEXT_LAYERS, Components
from .flux2.quant_plan import load_quantized

# model_index.json _class_name -> family
PIPELINE_FAMILIES: dict[str, str] = {"Flux2Pipeline": "dev", "Flux2KleinPipeline": "klein"}
COMPONENTS: tuple[str, ...] = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")


def _read_model_index(path: str) -> dict[str, Any]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path!r} (models load from local directories only)")
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(
            f"{path!r} has no model_index.json: not a diffusers-format pipeline directory "
            f"(expected model_index.json and subfolders {', '.join(COMPONENTS)})"
        )
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_file!r} is not valid JSON: {e}") from e
    if not isinstance(index, dict):
        raise ValueError(f"{index_file!r} must hold a JSON object")
    return index


def _listed(index: dict[str, Any], name: str) -> bool:
    """model_index.json lists a component as [library, class]; [null, null] means absent."""
    entry = index.get(name)
    return isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] is not None


def _check_subfolders(path: str, index: dict[str, Any]) -> None:
    missing = [n for n in COMPONENTS if not (_listed(index, n) and os.path.isdir(os.path.join(path, n)))]
    if missing:
        raise FileNotFoundError(
            f"{path!r} lacks component(s) {', '.join(missing)}: flux-dist needs all of "
            f"{', '.join(COMPONENTS)} (each a subfolder listed in model_index.json)"
        )


def _own_aligned_memory_(module: torch.nn.Module) -> None:
    """Copy tensors that still point into the memory-mapped safetensors file.

    Such tensors sit at arbitrary file offsets; CPU kernels take other code paths for unaligned
    data and round differently (~1e-6), so a loaded model would not reproduce the model it was
    saved from bit for bit. A fresh allocation is 64-byte aligned, like a freshly built model's.
    """
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu" and t.data_ptr() % 64:
                t.data = t.data.clone()


def _component(path: str, name: str, load: Any) -> Any:
    """``load()``, with any failure (a bad config.json, missing or mismatched weights) named by its folder:
    what a user's directory holds is input, and its errors are theirs to fix, not tracebacks."""
    try:
        return load()
    except FluxDistError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers / transformers raise many kinds for a bad folder
        folder = os.path.join(path, name)
        raise FluxDistError(f"cannot load the {name} from {folder} (check {os.path.join(folder, 'config.json')} "
                            f"and its weights): {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e


def load_pretrained(path: str, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                    text_encoder: bool = True, quant: str = "none") -> Components:
    """Load transformer, VAE, scheduler, text encoder and tokenizer from ``path`` (never the hub).

    On an accelerator the weights are read straight onto it (``device_map``), so a 64 GB
    transformer never takes a detour through host memory. ``text_encoder=False`` leaves the encoder
    unread (``Components.text_encoder`` None; ``models.text_encoder.build_prompt_encoder`` reads only
    the layers FLUX.2 uses, and only this rank's slices under ``shard``). ``quant`` (a resolved mode): a
    high-precision transformer is read and quantized block by block (``lowmem_load``), never whole.
    """
    path = os.fspath(path)
    index = _read_model_index(path)
    class_name = index.get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        raise ValueError(
            f"{path!r}: model_index.json _class_name is {class_name!r}; flux-dist loads "
            f"{' or '.join(PIPELINE_FAMILIES)} directories only"
        )
    _check_subfolders(path, index)
    family = PIPELINE_FAMILIES[class_name]
    device = torch.device(device)
    on_cpu = device.type == "cpu"
    placement: dict[str, Any] = {} if on_cpu else {"device_map": str(device)}

    def sub(name: str) -> str:
        return os.path.join(path, name)

    loaded = "none"  # the mode a directory saved quantized runs in
    if checkpoint_format(sub("transformer")):  # `flux-dist quantize` (either format) or ModelOpt's export
        transformer, loaded = _component(path, "transformer", lambda: load_quantized(sub("transformer"), device, dtype))
    elif quant != "none":  # read and quantized block by block, never the whole high-precision transformer
        from .lowmem_load import load_transformer_streaming

        transformer = _component(path, "transformer", lambda: load_transformer_streaming(
            sub("transformer"), dtype=dtype, device=device, quant=quant))
    else:
        transformer = _component(path, "transformer", lambda: Flux2Transformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=dtype, local_files_only=True, **placement))
    vae = _component(path, "vae", lambda: AutoencoderKLFlux2.from_pretrained(
        path, subfolder="vae", torch_dtype=dtype, local_files_only=True, **placement))
    scheduler = _component(path, "scheduler", lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(
        path, subfolder="scheduler", local_files_only=True))
    te_cls = Mistral3ForConditionalGeneration if family == "dev" else Qwen3ForCausalLM
    te = None
    if text_encoder:
        te = _component(path, "text_encoder", lambda: te_cls.from_pretrained(
            sub("text_encoder"), dtype=dtype, local_files_only=True, **placement))
    tok_cls: Any = PixtralProcessor if family == "dev" else Qwen2TokenizerFast
    tokenizer = _component(path, "tokenizer", lambda: tok_cls.from_pretrained(sub("tokenizer"), local_files_only=True))
    for m in (transformer, vae, te):
        if m is None:
            continue
        m.eval().requires_grad_(False)
        if on_cpu:
            _own_aligned_memory_(m)
    return Components(
        family=family,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder=te,
        tokenizer=tokenizer,
        # [dev] is guidance-distilled (embedded guidance, no true CFG); [klein] says so in its index.
        is_distilled=True if family == "dev" else bool(index.get("is_distilled", False)),
        text_layers=DEV_TEXT_LAYERS if family == "dev" else KLEIN_TEXT_LAYERS,
        name=path,
        quant=loaded,
    )
