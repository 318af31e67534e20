"""Quantized checkpoints: flux-dist's own format and NVIDIA ModelOpt's Hugging Face export format.

Model-agnostic: the caller (a model adapter's loader) builds the model shell on the meta device and
passes a ``QuantPlan`` saying which linears the model runs quantized; this module only reads, maps
and writes tensors.

ModelOpt's format (nvidia-modelopt 0.47.0, modelopt/torch/export/): a diffusers transformer folder
whose config.json carries ``quantization_config`` with ``quant_method: "modelopt"``
(unified_export_hf.py::_export_diffusers_checkpoint, in the layout of
convert_hf_config.py::convert_hf_quant_config_format); the LLM path also writes hf_quant_config.json
(unified_export_hf.py::_write_hf_export_config). Per quantized linear ``<name>``:
  FP8 per tensor ("FP8"):    weight e4m3 [N, K], weight_scale fp32 0-d = amax / 448, input_scale fp32 0-d
  FP8 per channel ("FP8_PER_CHANNEL_PER_TOKEN"): weight_scale fp32 [N] (TensorQuantizer.export_amax
                             squeezes the axis-0 amax), activations per token at run time
  NVFP4 ("NVFP4"):           weight uint8 [N, K/2], two E2M1 codes a byte, element 2i in the low nibble
                             (NVFP4QTensor.quantize); weight_scale e4m3 [N, K/16]; weight_scale_2 fp32
                             0-d = amax / (6 * 448); input_scale fp32 0-d;
                             w = e2m1 * weight_scale * weight_scale_2 (NVFP4QTensor.dequantize)
(unified_export_hf.py::_export_quantized_weight, quant_utils.py::to_quantized_weight). Our buffers use
the same conventions, so conversion is renaming and reshaping only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import CheckpointFormat, choices
from ..errors import FluxDistError
from .linear import QuantLinear, cast_unquantized_, runnable_mode, set_mode
from .numerics import BLOCK, FP8

log = logging.getLogger("flux_dist")

QUANT_FILE = "flux_dist_quant.json"
WEIGHTS_FILE = "quantized.safetensors"
FORMATS = choices(CheckpointFormat)
MODELOPT_WEIGHTS = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained names it
MODELOPT_QUANT_FILE = "hf_quant_config.json"
MODELOPT_WRITE_ALGO = {"fp8": "FP8_PER_CHANNEL_PER_TOKEN", "nvfp4": "NVFP4"}  # our weights and activations
MODELOPT_READ_ALGO = {"FP8": "fp8", "FP8_PER_CHANNEL_PER_TOKEN": "fp8", "NVFP4": "nvfp4"}
# QuantLinear buffer -> ModelOpt tensor name, per format
MODELOPT_NAMES = {"fp8": {"weight_q": "weight", "weight_scale": "weight_scale"},
                  "nvfp4": {"weight_q": "weight", "weight_block_scale": "weight_scale",
                            "weight_global": "weight_scale_2"}}


@dataclass(frozen=True)
class QuantPlan:
    """A model's answer to "which linears run quantized", handed to the checkpoint readers."""

    quantize: Callable[[nn.Module, str], int]  # swap the planned linears of a (shell) model; returns the count
    quantizable: Callable[[nn.Module, str], bool]  # whether the linear at this name is one the plan quantizes
    summary: str  # for error messages: what the plan quantizes


def checkpoint_format(folder: str) -> str | None:
    """``flux-dist`` or ``modelopt`` for a quantized transformer folder, None for a plain one."""
    if os.path.exists(os.path.join(folder, QUANT_FILE)):
        return "flux-dist"
    if os.path.exists(os.path.join(folder, MODELOPT_QUANT_FILE)):
        return "modelopt"
    cfg = os.path.join(folder, "config.json")
    if os.path.exists(cfg):
        try:
            with open(cfg, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FluxDistError(f"{cfg} is not a valid JSON file: {e}") from e
        if not isinstance(data, dict):
            raise FluxDistError(f"{cfg} must hold a JSON object, got {type(data).__name__}")
        qc = data.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == "modelopt":
            return "modelopt"
    return None  # (another quant_method is left to diffusers' from_pretrained, as before)


def _quant_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def _modelopt_configs(model: nn.Module, base: str) -> tuple[dict, dict]:
    """(config.json ``quantization_config``, hf_quant_config.json) as ModelOpt writes them for ``base``:
    quant_utils.py::get_quant_config / process_layer_quant_config, convert_hf_config.py."""
    from .. import __version__

    algo = MODELOPT_WRITE_ALGO[base]
    quantized = set(_quant_names(model))
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    producer = {"name": "flux-dist", "version": __version__}
    details: dict = {"quant_algo": algo, "kv_cache_quant_algo": None}
    hf_cfg: dict = {"quant_algo": algo, "producer": producer, "ignore": ignore, "quant_method": "modelopt"}
    if base == "nvfp4":
        details["group_size"] = BLOCK
        group = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": BLOCK}
        hf_cfg["config_groups"] = {"group_0": {"input_activations": dict(group), "weights": dict(group),
                                               "targets": ["Linear"]}}
    details["exclude_modules"] = ignore
    return hf_cfg, {"producer": producer, "quantization": details}


def save_quantized(model: nn.Module, mode: str, folder: str, fmt: str = "flux-dist") -> None:
    """Write a quantized model (a diffusers ``ModelMixin``) so a large model is quantized once.

    ``flux-dist``: config + our QuantLinear buffers + flux_dist_quant.json. ``modelopt``: NVIDIA
    ModelOpt's HF format (see above): config.json with ``quantization_config``, hf_quant_config.json,
    diffusion_pytorch_model.safetensors. No ``input_scale`` is written: activations are quantized per
    token at run time, there is no calibrated static scale to give.
    """
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise FluxDistError(f"unknown checkpoint format '{fmt}' (choose from {', '.join(FORMATS)})")
    base = mode.removesuffix("-emulate")
    if base not in MODELOPT_NAMES:
        raise FluxDistError(f"cannot save quantization '{mode}': pass an fp8 or nvfp4 mode")
    os.makedirs(folder, exist_ok=True)
    model.save_config(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = _quant_names(model)
    if fmt == "flux-dist":
        save_file(sd, os.path.join(folder, WEIGHTS_FILE))
        with open(os.path.join(folder, QUANT_FILE), "w") as f:
            json.dump({"format": "flux-dist-quant/1", "mode": mode, "modules": names}, f, indent=1)
        return
    split = [n for n in names if ".fd_" in n]
    if split:
        raise FluxDistError(f"cannot save {split[0]} in ModelOpt's format: a runtime split of a diffusers "
                            "linear; save the model before it is split for a layout")
    for n in names:
        for ours, theirs in MODELOPT_NAMES[base].items():
            t = sd.pop(f"{n}.{ours}")
            sd[f"{n}.{theirs}"] = t.reshape(-1).contiguous() if ours == "weight_scale" else t  # [1, N] -> [N]
    save_file(sd, os.path.join(folder, MODELOPT_WEIGHTS))
    hf_cfg, quant_cfg = _modelopt_configs(model, base)
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = hf_cfg
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(folder, MODELOPT_QUANT_FILE), "w", encoding="utf-8") as f:
        json.dump(quant_cfg, f, indent=4)


def _modelopt_algo(folder: str) -> tuple[str, str]:
    """(quant_algo, our base mode) of a ModelOpt folder; a clear error for what we cannot run."""
    path = os.path.join(folder, MODELOPT_QUANT_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            q = json.load(f).get("quantization", {})
        source = MODELOPT_QUANT_FILE
    else:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            q = json.load(f)["quantization_config"]
        source = "config.json quantization_config"
        if q.get("kv_cache_scheme"):
            q = {**q, "kv_cache_quant_algo": q["kv_cache_scheme"]}
    algo = q.get("quant_algo")
    if algo not in MODELOPT_READ_ALGO:
        raise FluxDistError(f"{folder}: ModelOpt quant_algo {algo!r} ({source}) is not supported; flux-dist loads "
                            f"{', '.join(MODELOPT_READ_ALGO)}")
    if q.get("kv_cache_quant_algo"):
        raise FluxDistError(f"{folder}: ModelOpt kv_cache_quant_algo {q['kv_cache_quant_algo']!r} ({source}) is not "
                            "supported: flux-dist quantizes linears only")
    gs = q.get("group_size")
    if algo == "NVFP4" and gs not in (None, BLOCK):
        raise FluxDistError(f"{folder}: NVFP4 group_size {gs} ({source}); flux-dist's NVFP4 uses {BLOCK}")
    return algo, MODELOPT_READ_ALGO[algo]


def read_safetensors(folder: str, names: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """One file, or the shards a ``<name>.index.json`` lists (diffusers shards above max_shard_size)."""
    from safetensors.torch import load_file

    for name in names:
        if os.path.exists(os.path.join(folder, name)):
            return load_file(os.path.join(folder, name), device=str(device))
        index = os.path.join(folder, name + ".index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for fn in files:
                sd.update(load_file(os.path.join(folder, fn), device=str(device)))
            return sd
    raise FluxDistError(f"{folder}: no {' or '.join(names)} (nor a sharded index)")


def _modelopt_tensor(folder: str, key: str, t: torch.Tensor, ours: str, base: str, n: int, kdim: int) -> torch.Tensor:
    """One ModelOpt tensor as our buffer ``ours`` of an ``[n, kdim]`` linear, or a clear error."""
    if base == "fp8" and ours == "weight_scale":
        if t.numel() not in (1, n):
            raise FluxDistError(f"{folder}: '{key}' has shape {tuple(t.shape)}: FP8 scales are per tensor "
                                f"or per output channel ({n})")
        t = t.float().reshape(-1).expand(n).reshape(1, n).contiguous()  # per tensor -> per channel
    if ours == "weight_global":
        if t.numel() != 1:
            raise FluxDistError(f"{folder}: '{key}' has shape {tuple(t.shape)}, NVFP4's global scale is "
                                "one value per tensor")
        t = t.float().reshape(())
    want = {"weight_q": ((n, kdim), FP8) if base == "fp8" else ((n, kdim // 2), torch.uint8),
            "weight_block_scale": ((n, kdim // BLOCK), FP8),
            "weight_global": ((), torch.float32), "weight_scale": ((1, n), torch.float32)}[ours]
    if tuple(t.shape) != want[0] or t.dtype != want[1]:
        raise FluxDistError(f"{folder}: '{key}' is {t.dtype} {tuple(t.shape)}, expected {want[1]} "
                            f"{want[0]} (padded or swizzled NVFP4 scales are not read)")
    return t


def _from_modelopt(shell: nn.Module, folder: str, device: torch.device, plan: QuantPlan) -> str:
    """Swap the shell's linears that the checkpoint holds quantized for QuantLinear shells, assign the
    renamed tensors; returns the base mode. ``shell`` lives on the meta device."""
    algo, base = _modelopt_algo(folder)
    sd = read_safetensors(folder, (MODELOPT_WEIGHTS, "model.safetensors"), device)
    quantized = sorted({k.removesuffix(".weight_scale") for k in sd if k.endswith(".weight_scale")})
    for name in quantized:
        if not plan.quantizable(shell, name):
            raise FluxDistError(f"{folder}: ModelOpt checkpoint quantizes '{name}', which flux-dist does not run "
                                f"quantized (it quantizes {plan.summary})")
        parent, _, leaf = name.rpartition(".")
        setattr(shell.get_submodule(parent), leaf, QuantLinear(shell.get_submodule(name), base))
    n_input = 0
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        prefix, _, leaf = k.rpartition(".")
        if prefix in quantized and leaf == "input_scale":
            n_input += 1
            continue
        out[k] = v
    for name in quantized:
        lin = shell.get_submodule(name)
        for ours, theirs in MODELOPT_NAMES[base].items():
            key = f"{name}.{theirs}"
            if key not in out:
                raise FluxDistError(f"{folder}: {algo} linear '{name}' has no '{key}'")
            out[f"{name}.{ours}"] = _modelopt_tensor(folder, key, out.pop(key), ours, base,
                                                     lin.out_features, lin.in_features)
    expected = set(shell.state_dict())
    unknown = sorted(set(out) - expected)
    if unknown:
        raise FluxDistError(f"{folder}: ModelOpt checkpoint tensor(s) flux-dist cannot map: {', '.join(unknown[:5])}")
    missing = sorted(expected - set(out))
    if missing:
        raise FluxDistError(f"{folder}: ModelOpt checkpoint lacks {', '.join(missing[:5])}")
    if n_input:
        log.info("ModelOpt checkpoint: %d static input_scale(s) ignored (flux-dist quantizes activations "
                 "per token at run time)", n_input)
    shell.load_state_dict(out, strict=True, assign=True)
    log.info("loaded ModelOpt %s checkpoint %s: %d quantized linears", algo, folder, len(quantized))
    return base


def load_quantized_into(shell: nn.Module, folder: str, device: torch.device, plan: QuantPlan,
                        dtype: torch.dtype | None = None) -> str:
    """Fill a meta-device ``shell`` from a quantized folder in either format; returns the mode it runs.

    A mode the device cannot run (FP8 on CPU, NVFP4 before Blackwell) is switched to its emulation,
    with the loud warning, rather than failing at the first GEMM. The layers outside the quantized linears, and
    the quantized linears' outputs, take ``dtype`` (the file's dtype when None).
    """
    from safetensors.torch import load_file

    fmt = checkpoint_format(folder)
    if fmt is None:
        raise FluxDistError(f"{folder}: not a quantized transformer (no {QUANT_FILE}, no ModelOpt quantization_config)")
    if fmt == "flux-dist":
        with open(os.path.join(folder, QUANT_FILE), encoding="utf-8") as f:
            mode = json.load(f)["mode"]
        with torch.device("meta"):
            plan.quantize(shell, mode)
        shell.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE), device=str(device)), strict=True,
                              assign=True)
    else:
        mode = _from_modelopt(shell, folder, device, plan)
    mode = runnable_mode(mode, device)
    out_dtype = dtype or next(p.dtype for p in shell.parameters() if p.is_floating_point())
    set_mode(shell, mode, out_dtype)
    cast_unquantized_(shell, out_dtype)
    return mode
