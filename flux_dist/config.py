"""Plain config dataclasses: a YAML file, then command-line flags that override it."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

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

# The one seed range (image seeds, preset weight seeds, HTTP and batch ``seed``): what torch's generators take as
# a signed 64-bit value. Derived seeds (weights, random prompt embeddings) are reduced modulo 2**64 before use.
MAX_SEED = 2**63 - 1


def choices(kind: Any) -> tuple[str, ...]:
    """The names a ``Literal`` type allows, in order (for messages and argparse)."""
    return tuple(get_args(kind))


@dataclass
class ModelConfig:
    """Which weights: a preset name (random weights) or a local diffusers-format directory."""

    model: str = "flux2-tiny"
    dtype: Dtype = "float32"
    device: DeviceKind = "auto"
    seed: int = 0  # seed of the preset's random weights (not of the image), 0..MAX_SEED
    quant: QuantMode = "none"  # the *-emulate modes validate numerics only
    compile: bool = False  # regional torch.compile of the blocks
    compile_backend: str = "inductor"
    compile_cache_dir: str | None = None  # persistent inductor cache (warm starts)
    cuda_graphs: bool = False  # capture the block stack per shape and replay it every step (CUDA only)
    attention: AttentionBackend = "auto"  # a missing kernel falls back with a notice
    fp8_fast_accum: bool = False  # FP8 GEMMs with cuBLAS' fast accumulation (BENCHMARKS.md, issue 17)
    attention_fp8: bool = False  # FP8 (E4M3, per-head scales) q/k/v into FA3 (Hopper); bf16 elsewhere
    text_encoder: TextEncoderMode = "auto"  # auto: the model's encoder, cut to the layers FLUX.2 reads
    text_encoder_placement: TextEncoderPlacement = "auto"  # where the encoder runs (parallel/text_encoder.py)
    text_encoder_quant: TextEncoderQuant = "none"  # the encoder's decoder linears (every / first)
    prompt_cache_mb: float = 0.0  # LRU of prompt embeddings, in MiB; 0 = off
    lora: dict[str, str] = field(default_factory=dict)  # LoRA adapters loaded at start: name -> safetensors path


@dataclass
class ParallelConfig:
    ulysses: int = 1
    ring: int = 1
    cfg_parallel: int = 1
    replicas: int = 1  # groups of cfg x ring x ulysses ranks, each serving its own request (serve, batch)
    layouts: str = ""  # serve: "RxD,..." (replicas x degree) kept at once, picked per request by the queue


@dataclass
class RequestConfig:
    """One image request; the HTTP server and batch mode build the same object."""

    prompt: str | None = None
    negative_prompt: str = ""
    height: int | None = None  # None: the first reference image's (processed) size, else 64
    width: int | None = None
    steps: int = 4
    guidance: float = 4.0
    seed: int = 0  # 0..MAX_SEED
    max_sequence_length: int = 512
    lora: dict[str, float] = field(default_factory=dict)  # adapters of model.lora this request applies: name -> scale
    # Reference images (editing / multi-reference), in order: paths in a config, CLI or batch file; the front end
    # replaces them by decoded images (images.read_images: PIL, or uint8 HxWxC arrays) before the engine runs.
    images: list[str] = field(default_factory=list)


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
    """Process-group timeouts: long while loading / compiling, short once serving; the rank watchdog."""

    startup_timeout_s: float = 1800.0
    timeout_s: float = 45.0  # every group, subgroups included, once the engine is built
    watchdog_s: float = 20.0  # a rank silent this long ends the job on every rank, naming it (0: off)


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


# What each Literal is called in messages ("unknown cache mode 'x' ...", as the checks downstream say it).
_KIND_NAMES = {Dtype: "dtype", DeviceKind: "device", QuantMode: "quantization", AttentionBackend: "attention kernel",
               CacheMode: "cache mode", CheckpointFormat: "checkpoint format"}
# Ranges checked when the config is built: (low, high), inclusive; None = unbounded; a float low is exclusive.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "model.seed": (0, MAX_SEED), "request.seed": (0, MAX_SEED),
    "parallel.ulysses": (1, None), "parallel.ring": (1, None), "parallel.cfg_parallel": (1, None),
    "parallel.replicas": (1, None),
    "limits.max_pixels": (1, None), "limits.max_steps": (1, None), "limits.max_references": (0, None),
    "limits.max_reference_pixels": (1, None),
    "dist.startup_timeout_s": (0.0, None), "dist.timeout_s": (0.0, None),
}


def _type_error(key: str, hint: Any, value: Any) -> str | None:
    """None if ``value`` fits the annotation ``hint``, else why not (the message names the key)."""
    origin = get_origin(hint)
    if origin is Literal:
        if value in get_args(hint):
            return None
        what = _KIND_NAMES.get(hint, "value")
        return f"unknown {what} {value!r} for config key '{key}' (choose from {', '.join(get_args(hint))})"
    if origin in (typing.Union, types.UnionType):
        errors = [_type_error(key, h, value) for h in get_args(hint)]
        if None not in errors:
            kinds = [e for e in errors if e.startswith("unknown")] or [
                f"config key '{key}' must be {' or '.join(_describe(h) for h in get_args(hint))}, got {value!r}"]
            return kinds[0]
        return None
    if hint is type(None):
        return None if value is None else f"config key '{key}' must be null, got {value!r}"
    if origin is list:
        (item,) = get_args(hint)
        if isinstance(value, list) and all(_type_error(key, item, v) is None for v in value):
            return None
    elif hint is bool and isinstance(value, bool):
        return None
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return None
    elif hint is float and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return None
    elif hint is str and isinstance(value, str):
        return None
    return f"config key '{key}' must be {_describe(hint)}, got {value!r}"


def _describe(hint: Any) -> str:
    if get_origin(hint) is list:
        return "a list of numbers" if get_args(hint)[0] is float else f"a list of {get_args(hint)[0].__name__}"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}
    return names.get(hint, "one of " + ", ".join(map(str, get_args(hint))))


def _check_value(key: str, hint: Any, value: Any) -> Any:
    err = _type_error(key, hint, value)
    if err:
        raise FluxDistError(err)
    lo, hi = RANGES.get(key, (None, None))
    if lo is not None and (value <= lo if isinstance(lo, float) else value < lo) or hi is not None and value > hi:
        if isinstance(lo, float):
            raise FluxDistError(f"config key '{key}' must be > {lo:g}, got {value!r}")
        want = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise FluxDistError(f"config key '{key}' must be {want}, got {value!r}")
    return float(value) if hint is float else value


def _fill(obj: Any, data: dict, where: str) -> None:
    if not isinstance(data, dict):
        raise FluxDistError(f"config section '{where}' must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in names:
            raise FluxDistError(f"unknown config key '{where}.{key}' (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        dotted = f"{where}.{k}" if where else k
        if dataclasses.is_dataclass(cur):
            _fill(cur, value, dotted)
        else:
            setattr(obj, k, _check_value(dotted, hints[k], value))


def parse_lora_spec(spec: str) -> tuple[str, str, float]:
    """``--lora [NAME=]PATH[:SCALE]`` -> ``(name, path, scale)``; name: the file's stem by default; scale: 1."""
    name, sep, rest = spec.partition("=")
    if not sep or "/" in name or not name:
        name, rest = "", spec
    path, scale = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and "/" not in tail:
        try:
            path, scale = head, float(tail)
        except ValueError:
            raise FluxDistError(f"--lora {spec!r}: scale {tail!r} is not a number ([NAME=]PATH[:SCALE])") from None
    if not path:
        raise FluxDistError(f"--lora {spec!r}: no path ([NAME=]PATH[:SCALE])")
    return name or Path(path.rstrip("/")).stem, path, scale


def add_lora_specs(cfg: RunConfig, specs: list[str] | None) -> RunConfig:
    """Load each ``--lora`` adapter at start and apply it, at its scale, to the default request."""
    for spec in specs or []:
        name, path, scale = parse_lora_spec(spec)
        if name in cfg.model.lora:
            raise FluxDistError(f"--lora: adapter name {name!r} given twice (name them: --lora NAME=PATH[:SCALE])")
        cfg.model.lora = {**cfg.model.lora, name: path}
        cfg.request.lora = {**cfg.request.lora, name: scale}
    return cfg


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig from a YAML file and ``{"section.key": value}`` overrides (None = unset).

    Every value is checked against its field's annotation and range here (``config key 'request.steps' must be
    an integer, got True``), so a wrong type never reaches the model or the request."""
    cfg = RunConfig()
    if path:
        p = Path(path)
        if p.is_dir():
            raise FluxDistError(f"config file {path} is a directory, not a file")
        if not p.is_file():
            raise FluxDistError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise FluxDistError(f"config file {path} is not UTF-8 text: {e}") from e
        except OSError as e:
            raise FluxDistError(f"cannot read config file {path}: {e}") from e
        except yaml.YAMLError as e:
            raise FluxDistError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from e
        _fill(cfg, data, "")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".")
        _fill(getattr(cfg, section), {key: value}, section)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
