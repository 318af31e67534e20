"""Quantized checkpoints in layouts flux-dist does not read: found and refused, never run as bf16.

A folder that flux-dist would load as a plain high-precision model (no ``flux_dist_quant.json``, no
ModelOpt ``quantization_config``) is checked here first, from the safetensors headers only (no tensor
is read). Low-precision weights, scale tensors, ComfyUI's per-layer ``.comfy_quant`` markers or a
``quantization_config`` of another ``quant_method`` mean the files are quantized in a layout we do not
map; loading them plainly would cast packed / FP8 values to the model dtype without their scales (the
failure peers shipped: vLLM-Omni #4202, SGLang #23625). So it is an error naming what differs.

ComfyUI / comfy-kitchen layout (the one Black Forest Labs' FLUX.2 FP8 / NVFP4 single files use, see
docs/facts.md "Published quantized FLUX.2 checkpoints"): per layer ``<name>.comfy_quant`` (a uint8
tensor holding JSON, e.g. ``{"format": "nvfp4"}``); NVFP4 ``weight`` uint8 ``[N, K/2]`` with element
2i in the HIGH nibble (``pack_uint4(hi_first=True)``; ModelOpt: low), ``weight_scale`` E4M3 padded to
128 x 4 tiles and swizzled (cuBLAS ``to_blocked``; ModelOpt: plain ``[N, K/16]``), ``weight_scale_2``
fp32 0-d; FP8 ``weight`` E4M3 with ``weight_scale`` fp32 0-d and ``input_scale`` fp32 0-d.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable

from ..errors import FluxDistError

LOW_PRECISION = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "U8", "I8", "F4")
SCALE_LEAVES = ("weight_scale", "weight_scale_2", "input_scale", "scale_weight", "scale_input", "pre_quant_scale")
COMFY_DIFFERS = ("per-layer '.comfy_quant' markers instead of a config.json quantization_config",
                 "NVFP4 codes with element 2i in the high nibble (ModelOpt / flux-dist: the low nibble)",
                 "NVFP4 block scales padded to 128x4 tiles and cuBLAS-swizzled (ModelOpt / flux-dist: plain "
                 "[N, K/16])")


def safetensors_header(path: str) -> dict:
    """The JSON header of a .safetensors file: name -> {dtype, shape, data_offsets} (+ __metadata__)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def check_plain_folder(folder: str, foreign_names: Callable[[list[str]], str | None] | None = None) -> None:
    """Raise ``FluxDistError`` naming what differs if ``folder`` holds quantized tensors in a layout that
    flux-dist does not read. ``foreign_names(keys)``: the model adapter's word on checkpoint key names
    that are not its own (e.g. another project's naming), or None."""
    cfg_path = os.path.join(folder, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config")
        if isinstance(qc, dict):
            raise FluxDistError(f"{folder}: config.json has a quantization_config with quant_method "
                                f"{qc.get('quant_method')!r}; flux-dist reads its own format and ModelOpt's "
                                "('modelopt') only, and will not run it as a plain model")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    tensors: dict[str, str] = {}
    for fn in files:
        tensors.update({k: v["dtype"] for k, v in safetensors_header(os.path.join(folder, fn)).items()
                        if k != "__metadata__"})
    keys = sorted(tensors)
    comfy = [k for k in keys if k.endswith(".comfy_quant")]
    scales = [k for k in keys if k.rpartition(".")[2] in SCALE_LEAVES]
    low = [k for k in keys if k.endswith(".weight") and tensors[k] in LOW_PRECISION]
    if not (comfy or scales or low):
        return
    differs = []
    names = foreign_names(keys) if foreign_names else None
    if names:
        differs.append(names)
    if comfy:
        differs += [f"{len(comfy)} '.comfy_quant' marker(s) (ComfyUI / comfy-kitchen layout, e.g. '{comfy[0]}')",
                    *COMFY_DIFFERS[1:]]
    else:
        differs.append("no quantization_config (config.json) and no hf_quant_config.json saying how to read them")
    found = f"{len(low)} low-precision weight(s) (e.g. '{low[0]}' {tensors[low[0]]})" if low else "no FP8/FP4 weight"
    found += f", {len(scales)} scale tensor(s)" + (f" (e.g. '{scales[0]}')" if scales else "")
    raise FluxDistError(
        f"{folder}: quantized checkpoint in a layout flux-dist does not read ({found}; files: {', '.join(files)}). "
        f"It differs from the layouts flux-dist reads (its own; NVIDIA ModelOpt's Hugging Face export) in: "
        f"{'; '.join(differs)}. Loading it as a plain model would run without its scales, so it is refused: "
        "use the bf16 checkpoint, `flux-dist quantize` (--quant fp8|nvfp4) or `flux-dist quantize --calibrate` "
        "(ModelOpt's own export)")
