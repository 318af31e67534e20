"""Command line: turn arguments into a config and a request, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from .config import RunConfig, load_config, to_dict
from .errors import FluxDistError

log = logging.getLogger("flux_dist")

# flag -> dotted config key; each flag overrides the YAML file when given.
FLAGS: dict[str, tuple[str, type]] = {
    "--model": ("model.model", str),
    "--dtype": ("model.dtype", str),
    "--device": ("model.device", str),
    "--prompt": ("request.prompt", str),
    "--negative-prompt": ("request.negative_prompt", str),
    "--height": ("request.height", int),
    "--width": ("request.width", int),
    "--steps": ("request.steps", int),
    "--guidance": ("request.guidance", float),
    "--seed": ("request.seed", int),
    "--max-sequence-length": ("request.max_sequence_length", int),
    "--max-pixels": ("limits.max_pixels", int),
    "--ulysses": ("parallel.ulysses", int),
    "--ring": ("parallel.ring", int),
    "--cfg-parallel": ("parallel.cfg_parallel", int),
    "--output": ("output.output", str),
    "--metrics": ("output.metrics", str),
}


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/); flags override it")
    for flag, (key, typ) in FLAGS.items():
        p.add_argument(flag, type=typ, default=None, dest=key.replace(".", "__"), help=f"overrides {key}")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = {key: getattr(args, key.replace(".", "__")) for key, _ in FLAGS.values()}
    return load_config(args.config, overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    from . import distributed
    from .engine import Engine, check_request

    cfg = config_from_args(args)
    info = distributed.init(cfg.model.device, cfg.dist.startup_timeout_s)
    check_request(cfg.request, cfg.limits)  # before the (slow) model load
    engine = Engine(cfg, info)
    distributed.set_timeout(cfg.dist.timeout_s)  # start-up is over: a dead peer now fails fast
    result = engine.generate(cfg.request)
    if engine.dist.is_main:
        _write_outputs(cfg, result.image.save, result.metrics)
    engine.close()
    return 0


def _write_outputs(cfg: RunConfig, save_image: Callable[[Path], object], metrics: dict) -> None:
    """Rank 0 (or the Ray driver) writes the image and the metrics JSON."""
    out = Path(cfg.output.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(out)
    log.info("wrote %s", out)
    if cfg.output.metrics:
        m = Path(cfg.output.metrics)
        m.parent.mkdir(parents=True, exist_ok=True)
        m.write_text(json.dumps({**metrics, "config": to_dict(cfg)}, indent=2))
        log.info("wrote %s (denoise %.2f s, %s)", m, metrics["denoise_s"], metrics["layout"])


def cmd_ray_generate(args: argparse.Namespace) -> int:
    """The same request on a Ray cluster; this process is the driver and writes the outputs."""
    from .distributed import setup_logging
    from .engine import check_request
    from .launch_ray import ray_generate

    cfg = config_from_args(args)
    setup_logging(0)
    check_request(cfg.request, cfg.limits)  # before reserving any actor
    res = ray_generate(cfg, address=args.address, num_cpus=args.num_cpus, timeout_s=args.timeout)
    _write_outputs(cfg, lambda path: Path(path).write_bytes(res.png), res.metrics)
    return 0


def cmd_save_preset(args: argparse.Namespace) -> int:
    """Write a preset as a diffusers-format directory (for --model PATH and for diffusers itself)."""
    import torch

    from .engine import parse_dtype
    from .models.presets import build_preset, save_components

    c = build_preset(args.name, dtype=parse_dtype(args.dtype), device=torch.device("cpu"), seed=args.seed)
    save_components(c, args.path)
    print(f"saved {args.name} to {args.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-dist", description="Distributed FLUX.2 inference")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one image (one process, or every rank under torchrun)")
    _add_run_flags(g)
    g.set_defaults(func=cmd_generate)
    r = sub.add_parser("ray-generate", help="generate one image on a Ray cluster (one actor per rank)")
    _add_run_flags(r)
    r.add_argument("--address", default=None,
                   help="Ray cluster (HOST:PORT, ray://..., or auto: the one `ray start` began on this machine); "
                   "default RAY_ADDRESS, else a new local cluster")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster started here")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole request, loading included")
    r.set_defaults(func=cmd_ray_generate)
    s = sub.add_parser("save-preset", help="save a preset's random weights as a diffusers directory")
    s.add_argument("name")
    s.add_argument("path")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_save_preset)
    return parser


def _rank() -> str:
    if "RANK" in os.environ:
        return os.environ["RANK"]
    from .distributed import env_layout  # also knows Slurm's per-task variables

    return str(env_layout()[0])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except FluxDistError as e:
        print(f"[rank{_rank()}] flux-dist: error: {e}", file=sys.stderr, flush=True)
        code = 2
    except Exception:
        print(f"[rank{_rank()}] flux-dist: internal error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        code = 1
    if code:
        from .distributed import fail_together

        fail_together()
        # Skip interpreter teardown: a peer may still sit in a collective and the launcher stops it.
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
