"""Command line: turn arguments into a config and a request, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from .cli_args import FLAGS, config_from_args  # noqa: F401 - FLAGS: the flag table, for tests and docs
from .cli_args import build_parser as _build_parser
from .config import RunConfig, to_dict
from .errors import FluxDistError
from .images import checked_request
from .layouts import check_layout_use, resolve_layouts
from .preflight import on_rank0_then_all, port_in_use, record_failure
from .validation import check_outputs, check_run, serving_config

log = logging.getLogger("flux_dist")


def _check_layouts(cfg: RunConfig, command: str) -> None:
    """``--replicas`` / ``--layouts`` against the command and the launch's world size, before anything loads."""
    from .distributed import env_layout

    check_layout_use(cfg.parallel, command)
    resolve_layouts(cfg.parallel, env_layout()[1])


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_run(cfg)
    req = cfg.request if args.prompts_file else checked_request(cfg.request, cfg.limits)  # before heavy imports
    _check_layouts(cfg, "batch" if args.prompts_file else "generate")
    from . import distributed
    from .engine import Engine

    info = distributed.init(cfg.model.device, cfg.dist.startup_timeout_s, cfg.dist.watchdog_s)
    on_rank0_then_all(info, lambda: check_outputs(None, output_dir=args.output_dir) if args.prompts_file
                      else check_outputs(cfg.output))  # before the (slow) model load, every rank told
    engine = Engine(cfg, info)
    distributed.set_timeout(cfg.dist.timeout_s)  # start-up is over: a dead peer now fails fast
    if args.prompts_file:
        from .batch import run_batch

        code = run_batch(cfg, engine, args.prompts_file, args.output_dir)
        if code == 0:
            engine.close()
        return code
    result = engine.generate(req)
    if engine.dist.is_main:
        _write_outputs(cfg, result.image.save, result.metrics)
    engine.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Load once on every rank, then serve HTTP from rank 0 until SIGTERM / SIGINT."""
    from . import distributed
    from .engine import Engine
    from .server import ServeOptions, serve
    from .server.protocol import DEFAULT_MAX_WORK

    cfg = serving_config(config_from_args(args))  # --lora preloads; each request selects ("lora": {NAME: scale})
    max_work = DEFAULT_MAX_WORK if args.max_work is None else (args.max_work or None)  # 0: no limit
    opts = dict(api_key=args.api_key or os.environ.get("FLUX_DIST_API_KEY"), max_queue=args.max_queue,
                max_images=args.max_images, request_timeout_s=args.request_timeout, max_work=max_work,
                read_timeout_s=args.read_timeout, max_connections=args.max_connections)
    ServeOptions(args.host, args.port, **opts).check()  # before loading: a bad flag costs nothing
    _check_layouts(cfg, "serve")
    info = distributed.init(cfg.model.device, cfg.dist.startup_timeout_s, cfg.dist.watchdog_s)

    def port_free() -> None:
        if err := port_in_use(args.host, args.port):
            raise FluxDistError(err)

    on_rank0_then_all(info, port_free)
    engine = Engine(cfg, info)
    code = serve(cfg, engine, args.host, args.port, **opts)
    if code:  # the ranks lost each other (already logged): exit now, no peer is left to wait for
        sys.stderr.flush()
        os._exit(code)
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
    from .launch_ray import ray_generate

    cfg = config_from_args(args)
    setup_logging(0)
    check_run(cfg)
    check_layout_use(cfg.parallel, "ray-generate")
    run = dataclasses.replace(cfg, request=checked_request(cfg.request, cfg.limits))  # before reserving any actor
    check_outputs(cfg.output)
    res = ray_generate(run, address=args.address, num_cpus=args.num_cpus, timeout_s=args.timeout)
    _write_outputs(cfg, lambda path: Path(path).write_bytes(res.png), res.metrics)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize a model's transformer once and save the whole model directory (loads with --model DIR)."""
    from .distributed import pick_device, setup_logging
    from .models.source import quantize_model

    setup_logging(0)
    if args.calibrate:  # ModelOpt's own calibration and Hugging Face export (always its format)
        from .models.source import calibrate_model
        from .quant.modelopt import import_modelopt

        import_modelopt()  # what to install, before reading anything
        shape = {k.removeprefix("calib_"): v for k, v in vars(args).items() if k.startswith("calib_") and v is not None}
        from .batch import read_prompts

        print(calibrate_model(args.model, args.path, read_prompts(args.calibrate), quant=args.quant, seed=args.seed,
                              activations=args.activations, dtype=args.dtype, device=pick_device(args.device, 0),
                              request=shape))
        return 0
    n, mode = quantize_model(args.model, args.path, quant=args.quant, dtype=args.dtype,
                             device=pick_device(args.device, 0), seed=args.seed, fmt=args.format)
    print(f"quantized {n} linears ({mode}) and saved {args.model} to {args.path} ({args.format} format)")
    return 0


def cmd_save_preset(args: argparse.Namespace) -> int:
    """Write a preset as a diffusers-format directory (for --model PATH and for diffusers itself)."""
    from .models.presets import save_preset

    save_preset(args.name, args.path, dtype=args.dtype, seed=args.seed)
    print(f"saved {args.name} to {args.path}")
    return 0


def cmd_calibrate_cache(args: argparse.Namespace) -> int:
    """Run every prompt at full compute, record (signal change, output change) per step, fit TeaCache's polynomial."""
    from . import distributed
    from .cache import calibrate
    from .engine import Engine

    cfg = config_from_args(args)
    cfg.cache.mode = "calibrate"
    from .batch import read_prompts

    prompts = read_prompts(args.prompts_file)
    check_run(cfg)
    check_layout_use(cfg.parallel, "calibrate-cache")
    cfg.request = checked_request(dataclasses.replace(cfg.request, prompt=prompts[0]), cfg.limits)
    info = distributed.init(cfg.model.device, cfg.dist.startup_timeout_s, cfg.dist.watchdog_s)
    on_rank0_then_all(info, lambda: check_outputs(extra=args.calib_output))
    engine = Engine(cfg, info)
    calibrate(engine, prompts, args.calib_output, args.degree)
    engine.close()
    return 0

def build_parser():
    """The parser, each subcommand bound to its function here."""
    return _build_parser({"generate": cmd_generate, "serve": cmd_serve, "ray_generate": cmd_ray_generate,
                          "quantize": cmd_quantize, "save_preset": cmd_save_preset,
                          "calibrate_cache": cmd_calibrate_cache})


def _rank() -> str:
    if "RANK" in os.environ:
        return os.environ["RANK"]
    from .distributed import env_layout  # also knows Slurm's per-task variables

    return str(env_layout()[0])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    message = ""
    try:
        from .faults import check_env

        check_env()  # a malformed FLUX_DIST_FAULT is bad input now, not at the first denoise step
        code = args.func(args)
    except FluxDistError as e:
        message = " ".join(str(e).split("\n"))
        print(f"[rank{_rank()}] flux-dist: error: {message}", file=sys.stderr, flush=True)
        code = 2
    except Exception as e:
        message = f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"[:500]
        print(f"[rank{_rank()}] flux-dist: internal error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        code = 1
    if code:
        record_failure(code, message or ("some batch lines failed (see the log and manifest.json)" if code == 3
                                         else f"exit code {code}"))
        from .distributed import fail_together

        fail_together()
        # Skip interpreter teardown: a peer may still sit in a collective and the launcher stops it.
        sys.stdout.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
