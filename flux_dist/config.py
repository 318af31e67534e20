"""Plain config dataclasses: a YAML file, then command-line flags that override it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from .errors import FluxDistError

# The one list of each choice; the modules that implement them import these names.
Dtype = Literal["float32", "bfloat16", "float16"]
DeviceKind = Literal["auto", "cpu", "cuda"]
QuantMode = Literal["none", "fp8", "nvfp4", "nvfp4-emulate", "fp8-emulate", "auto"]
AttentionBackend = Literal["auto", "fa3", "cudnn", "flash", "sdpa"]
CacheMode = Literal["none", "teacache", "fbcache", "calibrate"]  # calibrate: compute every step, record pairs
CheckpointFormat = Literal["flux-dist", "modelopt"]
TextEncoderMode = Literal["auto", "none"]  # none: seeded random prompt embeddings (transformer-only benchmarks)
TextEncoderPlacement = Literal["auto", "every", "first", "shard", "offload"]
TextEncoderQuant = Literal["none", "fp8", "fp8-emulate"]


def choices(kind: Any) -> tuple[str, ...]:
    """The names a ``Literal`` type allows, in order (for messages and argparse)."""
    return tuple(get_args(kind))


@dataclass
class ModelConfig:
    """Which weights: a preset name (random weights) or a local diffusers-format directory."""

    model: str = "flux2-tiny"
    dtype: Dtype = "float32"
    device: DeviceKind = "auto"
    seed: int = 0  # seed of the preset's random weights (not of the image)
    quant: QuantMode = "none"  # the *-emulate modes validate numerics only
    compile: bool = False  # regional torch.compile of the blocks
    compile_backend: str = "inductor"
    compile_cache_dir: str | None = None  # persistent inductor cache (warm starts)
    cuda_graphs: bool = False  # capture the block stack per shape and replay it every step (CUDA only)
    attention: AttentionBackend = "auto"  # a missing kernel falls back with a notice
    attention_fp8: bool = False  # FP8 (E4M3, per-head scales) q/k/v into FA3 (Hopper); bf16 elsewhere
    text_encoder: TextEncoderMode = "auto"  # auto: the model's encoder, cut to the layers FLUX.2 reads
    text_encoder_placement: TextEncoderPlacement = "auto"  # where the encoder runs (parallel/text_encoder.py)
    text_encoder_quant: TextEncoderQuant = "none"  # the encoder's decoder linears (every / first)
    prompt_cache_mb: float = 0.0  # LRU of prompt embeddings, in MiB; 0 = off


@dataclass
class ParallelConfig:
    ulysses: int = 1
    ring: int = 1
    cfg_parallel: int = 1


@dataclass
class RequestConfig:
    """One image request; the HTTP server and batch mode build the same object."""

    prompt: str | None = None
    negative_prompt: str = ""
    height: int | None = None  # None: the first reference image's (processed) size, else 64
    width: int | None = None
    steps: int = 4
    guidance: float = 4.0
    seed: int = 0
    max_sequence_length: int = 512
    # Reference images (editing / multi-reference), in order: paths in a config, CLI or batch file (the front
    # end reads them, images.read_images); decoded images (PIL, or uint8 HxWxC arrays) when the engine runs.
    images: list[Any] = field(default_factory=list)


@dataclass
class LimitsConfig:
    max_pixels: int = 2048 * 2048
    max_steps: int = 1000
    max_references: int = 4  # reference images per request
    max_reference_pixels: int = 4096 * 4096  # of an input image as read (before the 1024x1024-area resize)


@dataclass
class OutputConfig:
    output: str = "out/flux.png"
    metrics: str | None = "out/metrics.json"


@dataclass
class DistConfig:
    """Process-group timeouts: long while loading / compiling, short once serving."""

    startup_timeout_s: float = 1800.0
    timeout_s: float = 300.0


@dataclass
class CacheConfig:
    """Step cache: skip whole transformer passes when the input barely changed (one decision for all ranks)."""

    mode: CacheMode = "none"
    threshold: float = 0.0  # teacache: accumulated rescaled change; fbcache: relative first-block change
    warmup_steps: int = 1  # always computed at the start
    cutoff_steps: int = 1  # always computed at the end
    coefficients: list[float] | str | None = None  # teacache polynomial (highest power first) or a YAML file


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    request: RequestConfig = field(default_factory=RequestConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def _fill(obj: Any, data: dict, where: str) -> None:
    if not isinstance(data, dict):
        raise FluxDistError(f"config section '{where}' must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in names:
            raise FluxDistError(f"unknown config key '{where}.{key}' (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _fill(cur, value, f"{where}.{k}" if where else k)
        else:
            setattr(obj, k, value)


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig from a YAML file and ``{"section.key": value}`` overrides (None = unset)."""
    cfg = RunConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise FluxDistError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise FluxDistError(f"config file {path} is not valid YAML: {e}") from e
        _fill(cfg, data, "")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".")
        _fill(getattr(cfg, section), {key: value}, section)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
