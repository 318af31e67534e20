"""Every check of a run config and of a request that needs no torch: the CLI, the Ray driver, the
server and batch mode call these before any model is loaded or any collective runs.

Checks that need the device (FP8 on this GPU, a kernel that runs here) or the loaded model
(true CFG, heads divisible by the Ulysses degree) stay where that knowledge is, and say so clearly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from .config import (
    MAX_SEED,
    AttentionBackend,
    CacheMode,
    DeviceKind,
    Dtype,
    LimitsConfig,
    OutputConfig,
    QuantMode,
    RequestConfig,
    RunConfig,
)
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
    if not isinstance(cfg.model.seed, int) or not 0 <= cfg.model.seed <= MAX_SEED:
        raise FluxDistError(f"model seed must be an integer in 0..{MAX_SEED}, got {cfg.model.seed!r}")
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


# A request's height / width when it gives none and has no reference image.
DEFAULT_SIZE = 64
# Diffusers' Flux2ImageProcessor: a reference's smallest side and largest aspect ratio, and the area it is
# resized down to when larger.
MIN_REFERENCE_SIDE, MAX_REFERENCE_ASPECT, REFERENCE_AREA = 64, 8, 1024 * 1024


def image_size(img: Any) -> tuple[int, int]:
    """``(width, height)`` of a decoded image: a PIL image, or a uint8 array / tensor laid out ``H x W x C``."""
    size = getattr(img, "size", None)
    if isinstance(size, tuple) and len(size) == 2:  # PIL (an array's .size is an int, a tensor's a method)
        return int(size[0]), int(size[1])
    shape = getattr(img, "shape", None)
    if shape is not None and len(shape) == 3 and shape[2] in (1, 3, 4) and str(img.dtype) in ("uint8", "torch.uint8"):
        return int(shape[1]), int(shape[0])
    raise FluxDistError(f"a reference image must be a PIL image or a uint8 HxWxC array, got {type(img).__name__}"
                        + (f" of shape {tuple(shape)}" if shape is not None else ""))


def reference_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """The size diffusers' FLUX.2 pipelines turn a reference into: at most 1024x1024 in area (LANCZOS resize,
    aspect kept), then centre-cropped to multiples of ``multiple`` (the VAE factor x 2)."""
    if width * height > REFERENCE_AREA:
        scale = math.sqrt(REFERENCE_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width // multiple * multiple, height // multiple * multiple


def check_references(images: Any, lim: LimitsConfig) -> None:
    """Count, kind and size of a request's reference images (decoded: the engine never reads a path)."""
    if not isinstance(images, list | tuple):
        raise FluxDistError(f"request.images must be a list, got {type(images).__name__}")
    if len(images) > lim.max_references:
        raise FluxDistError(f"{len(images)} reference images: more than the limit of {lim.max_references} "
                            "(--max-references)")
    for i, img in enumerate(images, start=1):
        if isinstance(img, str | bytes) or hasattr(img, "__fspath__"):
            raise FluxDistError(f"reference image {i} is a path ({img!r}): the front end reads image files "
                                "(images.read_images); the engine takes decoded images")
        w, h = image_size(img)
        if min(w, h) < MIN_REFERENCE_SIDE:
            raise FluxDistError(f"reference image {i} is {w}x{h}: both sides must be at least {MIN_REFERENCE_SIDE} px")
        if max(w / h, h / w) > MAX_REFERENCE_ASPECT:
            raise FluxDistError(f"reference image {i} is {w}x{h}: aspect ratio over {MAX_REFERENCE_ASPECT}:1")
        if w * h > lim.max_reference_pixels:
            raise FluxDistError(f"reference image {i} is {w}x{h} = {w * h} pixels: over the limit of "
                                f"{lim.max_reference_pixels} (--max-reference-pixels)")


def output_size(req: RequestConfig, multiple: int = 16) -> tuple[int, int]:
    """``(height, width)``: the request's, each one it leaves unset taken from the first reference image's
    processed size (as diffusers does), else ``DEFAULT_SIZE``."""
    first = (DEFAULT_SIZE, DEFAULT_SIZE)
    if req.images:
        first = reference_size(*image_size(req.images[0]), multiple)
    return req.height or first[1], req.width or first[0]


def sized(req: RequestConfig, multiple: int = 16) -> RequestConfig:
    """``req`` with its output size resolved (``output_size``), as it runs."""
    height, width = output_size(req, multiple)
    return dataclasses.replace(req, height=height, width=width)


def check_request(req: RequestConfig, lim: LimitsConfig, multiple: int = 16) -> None:
    """Same checks, same request, every rank: all ranks fail together, before any collective."""
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise FluxDistError("a prompt is required (--prompt or request.prompt)")
    for name in ("height", "width"):
        v = getattr(req, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % multiple):
            raise FluxDistError(f"{name} must be a positive multiple of {multiple}, got {v!r}")
    check_references(req.images, lim)
    height, width = output_size(req, multiple)
    if height * width > lim.max_pixels:
        raise FluxDistError(f"{width}x{height} = {width * height} pixels exceeds the limit of {lim.max_pixels}")
    if not isinstance(req.steps, int) or not 1 <= req.steps <= lim.max_steps:
        raise FluxDistError(f"steps must be an integer in 1..{lim.max_steps}, got {req.steps!r}")
    if not isinstance(req.guidance, int | float) or not math.isfinite(req.guidance) or req.guidance < 0:
        raise FluxDistError(f"guidance must be a finite number >= 0, got {req.guidance!r}")
    if not isinstance(req.seed, int) or isinstance(req.seed, bool) or not 0 <= req.seed <= MAX_SEED:
        raise FluxDistError(f"seed must be an integer in 0..{MAX_SEED} (2**63 - 1), got {req.seed!r}")
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


def check_negative_prompt(req: RequestConfig, true_cfg: bool) -> None:
    """A negative prompt is a true-CFG input: a guidance-distilled model would silently ignore it."""
    if req.negative_prompt and not true_cfg:
        raise FluxDistError("a negative prompt is only used by models with true CFG ([klein] base); this model is "
                            "guidance-distilled (drop --negative-prompt / request.negative_prompt)")


@dataclasses.dataclass(frozen=True)
class RequestRules:
    """What a loaded engine accepts, as plain data (picklable): ``Engine.validate`` applies it on every
    rank, and a front end in another process (a Ray Serve replica) applies the same checks before queuing."""

    limits: LimitsConfig
    multiple: int = 16  # the model's image size multiple
    true_cfg: bool = False
    lora: tuple[str, ...] = ()  # the adapters loaded at start

    def __call__(self, req: RequestConfig) -> None:
        check_request(req, self.limits, multiple=self.multiple)
        check_negative_prompt(req, self.true_cfg)
        check_lora(req.lora, self.lora)


def serving_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` for a server (torchrun's ``serve``, a Ray Serve replica): checked, its request the HTTP
    defaults (text-to-image, sized; no LoRA applied: ``model.lora`` preloads, each request selects)."""
    cfg = dataclasses.replace(cfg, request=dataclasses.replace(cfg.request, lora={}))
    check_run(cfg)
    return dataclasses.replace(cfg, request=sized(dataclasses.replace(cfg.request, images=[])))


# What rank 0 can write an image as (PIL picks the format from the suffix).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _writable(path: Path, what: str, *, directory: bool = False) -> None:
    """``path`` can be created or overwritten (as a file, or as a directory): checked, nothing written."""
    if path.exists():
        if directory and not path.is_dir():
            raise FluxDistError(f"{what} {path} is a file, not a directory")
        if not directory and path.is_dir():
            raise FluxDistError(f"{what} {path} is a directory, not a file")
        if not os.access(path, os.W_OK | (os.X_OK if directory else 0)):
            raise FluxDistError(f"{what} {path} is not writable")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FluxDistError(f"{what} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FluxDistError(f"{what} {path}: directory {parent} is not writable")


def check_outputs(out: OutputConfig | None = None, *, output_dir: str | None = None, extra: str | None = None) -> None:
    """Every path the run will write, checked before the model loads (rank 0's, where rank 0 writes them):
    the image (a known image suffix, not a directory), the metrics JSON, batch mode's output directory,
    ``extra`` (another file, e.g. calibrate-cache's coefficients). Parent directories may be missing."""
    if out is not None:
        if not out.output:
            raise FluxDistError("--output / output.output must name an image file")
        image = Path(out.output)
        _writable(image, "--output")
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise FluxDistError(f"--output {out.output}: the suffix names the image format; use one of "
                                f"{', '.join(IMAGE_SUFFIXES)}")
        if out.metrics:
            _writable(Path(out.metrics), "--metrics")
    if output_dir is not None:
        _writable(Path(output_dir), "--output-dir", directory=True)
    if extra:
        _writable(Path(extra), "output file")


def check_cfg_parallel(cfg_degree: int, true_cfg: bool, model: str) -> None:
    """CFG parallel splits two guidance branches: a guidance-distilled model has one."""
    if cfg_degree > 1 and not true_cfg:
        raise FluxDistError(
            f"--cfg-parallel 2 needs a model with true CFG (a [klein] base model); '{model}' is "
            "guidance-distilled and runs one branch per step"
        )
