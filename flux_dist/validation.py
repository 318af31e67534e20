"""Every check of a run config and of a request that needs no torch: the CLI, the Ray driver, the
server and batch mode call these before any model is loaded or any collective runs.

Checks that need the device (FP8 on this GPU, a kernel that runs here) or the loaded model
(true CFG, heads divisible by the Ulysses degree) stay where that knowledge is, and say so clearly.
"""

from __future__ import annotations

import math
from typing import Any

from .config import AttentionBackend, CacheMode, DeviceKind, Dtype, LimitsConfig, QuantMode, RequestConfig, RunConfig
from .config import choices as _choices
from .errors import FluxDistError, NotSupportedError


def _one_of(value: Any, kind: Any, what: str) -> None:
    allowed = _choices(kind)
    if value not in allowed:
        raise FluxDistError(f"unknown {what} '{value}' (choose from {', '.join(allowed)})")


def check_run(cfg: RunConfig) -> None:
    """The run config's choices and numbers (before the process group or the model)."""
    _one_of(cfg.model.dtype, Dtype, "dtype")
    _one_of(cfg.model.device, DeviceKind, "device")
    _one_of(cfg.model.quant, QuantMode, "quantization")
    _one_of(cfg.model.attention, AttentionBackend, "attention kernel")
    check_cache(cfg)
    check_lora_config(cfg)
    if cfg.model.cuda_graphs and cfg.cache.mode == "fbcache":
        raise NotSupportedError("--cuda-graphs with --cache fbcache is not built (teacache and none are)")


def check_device(cfg: RunConfig, device_type: str) -> None:
    """What the resolved device rules out, refused before a possibly long load."""
    if cfg.model.cuda_graphs and device_type != "cuda":
        raise NotSupportedError("--cuda-graphs needs a CUDA device")


def check_cache(cfg: RunConfig) -> None:
    c = cfg.cache
    _one_of(c.mode, CacheMode, "cache mode")
    if not isinstance(c.threshold, int | float) or c.threshold < 0:
        raise FluxDistError(f"cache threshold must be a number >= 0, got {c.threshold!r}")
    for name in ("warmup_steps", "cutoff_steps"):
        v = getattr(c, name)
        if not isinstance(v, int) or v < 0:
            raise FluxDistError(f"cache {name} must be an integer >= 0, got {v!r}")


def check_request(req: RequestConfig, lim: LimitsConfig, multiple: int = 16) -> None:
    """Same checks, same request, every rank: all ranks fail together, before any collective."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise FluxDistError("a prompt is required (--prompt or request.prompt)")
    for name in ("height", "width"):
        v = getattr(req, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % multiple:
            raise FluxDistError(f"{name} must be a positive multiple of {multiple}, got {v!r}")
    if req.height * req.width > lim.max_pixels:
        raise FluxDistError(
            f"{req.width}x{req.height} = {req.width * req.height} pixels exceeds the limit of {lim.max_pixels}")
    if not isinstance(req.steps, int) or not 1 <= req.steps <= lim.max_steps:
        raise FluxDistError(f"steps must be an integer in 1..{lim.max_steps}, got {req.steps!r}")
    if not isinstance(req.guidance, int | float) or not math.isfinite(req.guidance) or req.guidance < 0:
        raise FluxDistError(f"guidance must be a finite number >= 0, got {req.guidance!r}")
    if not isinstance(req.seed, int) or req.seed < 0:
        raise FluxDistError(f"seed must be a non-negative integer, got {req.seed!r}")
    if not isinstance(req.max_sequence_length, int) or not 1 <= req.max_sequence_length <= 4096:
        raise FluxDistError(f"max_sequence_length must be in 1..4096, got {req.max_sequence_length!r}")
    if not isinstance(req.negative_prompt, str):
        raise FluxDistError("negative_prompt must be a string")


MAX_LORA_SCALE = 10.0  # |scale| above this is a typo, not a style strength


def check_lora_config(cfg: RunConfig) -> None:
    """``model.lora`` (name -> path, loaded at start) and the default request's choice among them."""
    lora = cfg.model.lora
    if not isinstance(lora, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                             for k, v in lora.items()):
        raise FluxDistError(f"model.lora must map adapter names to LoRA file paths, got {lora!r}")
    check_lora(cfg.request.lora, tuple(lora))


def check_lora(chosen: Any, loaded: tuple[str, ...] | list[str]) -> None:
    """A request's ``lora: {name: scale}``: names of adapters loaded at start, finite scales."""
    if chosen is None:
        return
    if not isinstance(chosen, dict):
        raise FluxDistError(f"lora must be an object of adapter name -> scale, got {type(chosen).__name__}")
    for name, scale in chosen.items():
        if name not in loaded:
            have = f"loaded: {', '.join(loaded)}" if loaded else "none was loaded at start: --lora NAME=PATH"
            raise FluxDistError(f"unknown LoRA adapter {name!r} ({have})")
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale) \
                or abs(scale) > MAX_LORA_SCALE:
            raise FluxDistError(f"LoRA {name!r}: scale must be a finite number in "
                                f"-{MAX_LORA_SCALE:g}..{MAX_LORA_SCALE:g}, got {scale!r}")


def check_cfg_parallel(cfg_degree: int, true_cfg: bool, model: str) -> None:
    """CFG parallel splits two guidance branches: a guidance-distilled model has one."""
    if cfg_degree > 1 and not true_cfg:
        raise FluxDistError(
            f"--cfg-parallel 2 needs a model with true CFG (a [klein] base model); '{model}' is "
            "guidance-distilled and runs one branch per step"
        )
