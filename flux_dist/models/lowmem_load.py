"""Read a high-precision FLUX.2 transformer checkpoint straight into low precision, block by block.

``Flux2Transformer2DModel.from_pretrained`` followed by quantization holds the whole bf16 transformer
(64 GB for [dev]) on the device first. Here the model is a meta shell; each top-level piece (embedders,
then every double / single block, then the head) is read from the safetensors files onto the device,
assigned, and — for a block — quantized at once, so at most one block exists in bf16 next to the
already quantized ones. Same tensors as loading whole and quantizing after (``quantize_block`` is the
same call), same order of construction as the full-size presets (``full._build_units``).

``phase_memory`` measures peak memory per phase (load, encode, denoise, decode) for the metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
from collections.abc import Iterator

import torch

from ..errors import FluxDistError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def _tensor_files(folder: str) -> dict[str, str]:
    """tensor name -> file, for one file or a sharded ``*.index.json``."""
    from safetensors import safe_open

    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with safe_open(path, "pt") as f:
                return dict.fromkeys(f.keys(), path)
        index = path + ".index.json"
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
            return {k: os.path.join(folder, v) for k, v in wm.items()}
    raise FluxDistError(f"{folder}: no {' or '.join(WEIGHT_NAMES)} (nor a sharded index)")


def load_transformer_streaming(folder: str, *, dtype: torch.dtype, device: torch.device | str, quant: str,
                               on_unit=None):
    """A diffusers ``transformer/`` folder (bf16 / fp32 safetensors) loaded and quantized block by block.

    ``quant``: a mode from ``quant.resolve_mode``. ``on_unit(name, model)`` is called after each piece is in place
    (tests and the memory probe use it).
    """
    from diffusers import Flux2Transformer2DModel
    from safetensors import safe_open

    from .components import _default_dtype
    from .flux2.quant_plan import quantize_block
    from .full import _build_units

    device = torch.device(device)
    cfg = dict(Flux2Transformer2DModel.load_config(folder))
    if cfg.get("quantization_config"):
        raise FluxDistError(f"{folder}: already quantized; load it with quant.load_quantized")
    with _default_dtype(dtype), torch.device("meta"):
        tr = Flux2Transformer2DModel.from_config(cfg)
    files = _tensor_files(folder)
    handles: dict[str, object] = {}
    dev = str(device) if device.type != "cpu" else "cpu"
    used: set[str] = set()
    for unit_name, unit, is_block in _build_units(tr):
        sd = {}
        for name, p in unit.named_parameters():
            key = f"{unit_name}.{name}"
            if key not in files:
                raise FluxDistError(f"{folder}: checkpoint lacks '{key}'")
            path = files[key]
            if path not in handles:
                handles[path] = safe_open(path, "pt", device=dev)
            t = handles[path].get_tensor(key).to(dtype=p.dtype)
            if t.shape != p.shape:
                raise FluxDistError(f"{folder}: '{key}' is {tuple(t.shape)}, the config says {tuple(p.shape)}")
            sd[name] = t.clone() if t.device.type == "cpu" and t.data_ptr() % 64 else t
            used.add(key)
        unit.load_state_dict(sd, strict=True, assign=True)
        if is_block:
            quantize_block(unit, quant)
        if on_unit is not None:
            on_unit(unit_name, tr)
    extra = sorted(set(files) - used)
    if extra:
        raise FluxDistError(f"{folder}: tensors the transformer does not have: {', '.join(extra[:5])}")
    return tr.eval().requires_grad_(False)


@contextlib.contextmanager
def phase_memory(record: dict, phase: str, device: torch.device) -> Iterator[None]:
    """``record[phase] = peak GiB`` during the block: CUDA's max_memory_allocated since the phase began
    (stats reset at entry); on CPU the process's max RSS so far (it cannot be reset: an upper bound)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            record[phase] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        else:
            record[phase] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
