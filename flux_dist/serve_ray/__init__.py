"""Ray Serve: `flux-dist serve` as a Ray Serve application whose every replica is one SP layout on its own ranks.

    serve run configs/ray-serve-tiny.yaml                      # a new local cluster, or RAY_ADDRESS's
    serve deploy configs/ray-serve-tiny.yaml -a http://HEAD:8265

The config file's application imports ``flux_dist.serve_ray:build`` with ``args`` (``ServeArgs``): a run
config (``config``, ``overrides``: the model, the layout = the ranks of one replica, the request defaults),
the replica range for Serve's autoscaler, and `flux-dist serve`'s own options. Each replica reserves one
bundle per rank (one GPU and one CPU each on ``cuda``, one CPU on ``cpu``); the replica actor itself
takes none. How a replica runs: ``replica.py``.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import RunConfig, add_lora_specs, load_config
from ..errors import FluxDistError
from ..launch_ray import plan, rank_bundle
from ..server.protocol import DEFAULT_MAX_WORK
from ..server.schema import ServeOptions
from ..validation import serving_config

__all__ = ["ServeArgs", "build", "run_config"]

MIN_RAY = (2, 60)  # the late-bound @serve.ingress() (an app built per replica) the replica uses
REPO = Path(__file__).resolve().parents[2]


class ServeArgs(BaseModel):
    """The application's ``args`` in a Serve config file (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="run config YAML (configs/...); relative: to the working "
                               "directory, else to the flux-dist checkout")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys, as the CLI flags: "
                                      "{'parallel.ulysses': 2, 'request.steps': 28}")
    lora: list[str] = Field(default_factory=list, description="adapters loaded at start: [NAME=]PATH[:SCALE]")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0, description="per replica (one computing, one waiting)")
    upscale_delay_s: float = Field(30.0, ge=0, description="Serve's: load above target this long adds replicas")
    downscale_delay_s: float = Field(600.0, ge=0, description="Serve's: load below target this long removes them")
    # Serve collects the load every 10 s (its metrics_interval_s): a shorter window draws a warning from Serve today
    # and an exception in a later release, so it is refused here.
    look_back_period_s: float = Field(30.0, gt=10, description="Serve's: the window the load is averaged over")
    max_ongoing_requests: int | None = Field(None, ge=1, description="per replica; default max_queue + 1")
    health_check_period_s: float = Field(5.0, gt=0)
    start_timeout_s: float = Field(1800.0, gt=0, description="loading and compiling, per replica")
    api_key: str | None = Field(None, description="else env FLUX_DIST_API_KEY where the app is built")
    max_queue: int = 16
    max_images: int = 4
    request_timeout_s: float = 600.0
    max_work: int = Field(DEFAULT_MAX_WORK, ge=0, description="0: no limit")
    read_timeout_s: float = 10.0
    max_connections: int = 64


def run_config(a: ServeArgs) -> RunConfig:
    """The replicas' run config: ``config`` (a relative path: to the working directory, else to the
    flux-dist checkout), then ``overrides`` and ``lora``, checked as `flux-dist serve` checks it."""
    return serving_config(add_lora_specs(load_config(_config_path(a.config), a.overrides), a.lora))


def _config_path(path: str | None) -> str | None:
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path
    in_repo = REPO / path
    return str(in_repo) if in_repo.exists() else path


def _rank_device(device: str, world: int) -> str:
    if device != "auto":
        return device
    import ray

    if not ray.is_initialized():
        raise FluxDistError("model.device 'auto' is decided by the cluster (cuda when it has a GPU per rank): deploy "
                            "with a config file (serve run / serve deploy FILE), or set model.device")
    return plan(ray, world, "auto")[2]


def _check_ray() -> None:
    import ray

    m = re.match(r"(\d+)\.(\d+)", ray.__version__)
    if m and (int(m[1]), int(m[2])) < MIN_RAY:
        raise FluxDistError(f"the Ray Serve deployment needs ray>={'.'.join(map(str, MIN_RAY))}, this is "
                            f"{ray.__version__}: pip install 'flux-dist[ray]'")


def build(args: dict | ServeArgs | None = None) -> Any:
    """The application (``import_path: flux_dist.serve_ray:build``): checks everything before any replica starts."""
    try:
        a = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args or {})
    except ValidationError as e:
        err = e.errors()[0]
        raise FluxDistError(f"Ray Serve args: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    _check_ray()
    cfg = run_config(a)
    opts = ServeOptions(api_key=a.api_key or os.environ.get("FLUX_DIST_API_KEY") or None, max_queue=a.max_queue,
                        max_images=a.max_images, request_timeout_s=a.request_timeout_s, max_work=a.max_work or None,
                        read_timeout_s=a.read_timeout_s, max_connections=a.max_connections)
    opts.check()
    p = cfg.parallel
    world = p.ulysses * p.ring * p.cfg_parallel
    device = _rank_device(cfg.model.device, world)
    cfg = replace(cfg, model=replace(cfg.model, device=device))
    bundle = rank_bundle(device)
    autoscaling = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                   "target_ongoing_requests": a.target_ongoing_requests, "upscale_delay_s": a.upscale_delay_s,
                   "downscale_delay_s": a.downscale_delay_s, "look_back_period_s": a.look_back_period_s}
    if a.initial_replicas is not None:
        autoscaling["initial_replicas"] = a.initial_replicas
    from .replica import FluxDist

    return FluxDist.options(
        autoscaling_config=autoscaling, max_ongoing_requests=a.max_ongoing_requests or a.max_queue + 1,
        placement_group_bundles=[dict(bundle) for _ in range(world)], placement_group_strategy="PACK",
        health_check_period_s=a.health_check_period_s,
    ).bind(cfg, opts, a.start_timeout_s)
