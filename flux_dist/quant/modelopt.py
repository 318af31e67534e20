"""NVIDIA ModelOpt in the loop: its own calibration (``mtq.quantize``) and its own Hugging Face exporter.

Model-agnostic: the caller hands the module, the names of the linears its plan quantizes and a forward
loop over calibration data; everything else keeps the model dtype. nvidia-modelopt is an optional
extra (``pip install 'flux-dist[quant]'``); nothing else in flux-dist imports it.

ModelOpt configs (modelopt 0.47.0, ``mtq.*_CFG``):
  fp8 static:    FP8_DEFAULT_CFG, E4M3 weights per tensor, activations per tensor from calibration
                 (``input_scale`` in the export)
  fp8 dynamic:   FP8_PER_CHANNEL_PER_TOKEN_CFG, weights per output channel, activations per token
  nvfp4 static:  NVFP4_DEFAULT_CFG, activations' global scale from calibration (``input_scale``),
                 their 16-element block scales at run time
  nvfp4 dynamic: the same calibration and export, then ``input_scale`` dropped from the files (and
                 ``input_activations.dynamic`` set): flux-dist takes the global scale per token
The default configs also quantize the inputs of every norm layer (fake quantization that no exported
weight carries): only the planned linears' weight and input quantizers are left on.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import FluxDistError

log = logging.getLogger("flux_dist")

INSTALL = "pip install 'flux-dist[quant]'  (nvidia-modelopt>=0.47)"
CONFIGS = {("fp8", "static"): "FP8_DEFAULT_CFG", ("fp8", "dynamic"): "FP8_PER_CHANNEL_PER_TOKEN_CFG",
           ("nvfp4", "static"): "NVFP4_DEFAULT_CFG", ("nvfp4", "dynamic"): "NVFP4_DEFAULT_CFG"}
ACTIVATIONS = ("static", "dynamic")


def import_modelopt():
    """``(modelopt.torch.quantization, export_hf_checkpoint)``, or a clear error saying what to install."""
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError as e:
        raise FluxDistError(f"--calibrate runs NVIDIA ModelOpt's own calibration and exporter, which is not "
                            f"installed here ({e}); install it: {INSTALL}") from e
    return mtq, export_hf_checkpoint


def quant_config(mtq, quant: str, activations: str, planned: Iterable[str]) -> dict:
    """ModelOpt's own config for ``quant`` / ``activations``, with every quantizer off except the weight
    and input quantizers of the ``planned`` linears (they keep the config's own settings)."""
    if (quant, activations) not in CONFIGS:
        raise FluxDistError(f"ModelOpt calibration: --quant {quant} --activations {activations} is not one of "
                            f"{', '.join(f'{q}/{a}' for q, a in CONFIGS)}")
    cfg = copy.deepcopy(getattr(mtq, CONFIGS[(quant, activations)]))
    base = {e["quantizer_name"]: e.get("cfg") for e in cfg["quant_cfg"] if "cfg" in e}
    entries = [{"quantizer_name": "*", "enable": False}]
    for name in sorted(planned):
        for q in ("weight_quantizer", "input_quantizer"):
            entries.append({"quantizer_name": f"{name}.{q}", "cfg": copy.deepcopy(base[f"*{q}"]), "enable": True})
    cfg["quant_cfg"] = cfg["quant_cfg"] + entries
    return cfg


def calibrate(module: nn.Module, planned: list[str], forward_loop: Callable[[nn.Module], None], quant: str,
              activations: str) -> nn.Module:
    """``mtq.quantize`` (fake quantization, calibrated by ``forward_loop``) in place; returns the module."""
    mtq, _ = import_modelopt()
    if not planned:
        raise FluxDistError("ModelOpt calibration: the model's plan quantizes no linear")
    with torch.no_grad():
        mtq.quantize(module, quant_config(mtq, quant, activations, planned), forward_loop=forward_loop)
    on = {n.rpartition(".")[0] for n, m in module.named_modules()
          if n.endswith("_quantizer") and getattr(m, "is_enabled", False)}
    if on != set(planned):
        extra, missing = sorted(on - set(planned)), sorted(set(planned) - on)
        raise FluxDistError(f"ModelOpt quantized other linears than the plan: extra {extra[:3]}, missing {missing[:3]}")
    return module


def export(module: nn.Module, folder: str, activations: str) -> None:
    """ModelOpt's own Hugging Face exporter (``export_hf_checkpoint``: config.json ``quantization_config``,
    diffusion_pytorch_model.safetensors). It converts ``module``'s weights in place: do not run it after."""
    _, export_hf_checkpoint = import_modelopt()
    dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())
    with torch.no_grad():
        export_hf_checkpoint(module, dtype=dtype, export_dir=folder)
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    algo = cfg.get("quantization_config", {}).get("quant_algo")
    if activations == "dynamic" and algo == "NVFP4":
        _drop_input_scales(folder, cfg, cfg_path)


def _drop_input_scales(folder: str, cfg: dict, cfg_path: str) -> None:
    from safetensors.torch import load_file, save_file

    n = 0
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            sd = load_file(os.path.join(folder, fn))
            keep = {k: v for k, v in sd.items() if not k.endswith(".input_scale")}
            n += len(sd) - len(keep)
            save_file(keep, os.path.join(folder, fn), metadata={"format": "pt"})
    for group in cfg["quantization_config"].get("config_groups", {}).values():
        if "input_activations" in group:
            group["input_activations"]["dynamic"] = True
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=4)
    log.info("--activations dynamic: dropped %d calibrated NVFP4 input_scale(s) (per-token global scales "
             "at run time)", n)
