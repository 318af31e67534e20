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

from .config import CheckpointFormat, RunConfig, choices, load_config, to_dict
from .errors import FluxDistError
from .images import checked_request
from .preflight import on_rank0_then_all, port_in_use, record_failure
from .validation import check_outputs, check_run, sized

log = logging.getLogger("flux_dist")

# flag -> dotted config key; each flag overrides the YAML file when given.
FLAGS: dict[str, tuple[str, type]] = {
    "--model": ("model.model", str),
    "--dtype": ("model.dtype", str),
    "--device": ("model.device", str),
    "--quant": ("model.quant", str),
    "--compile": ("model.compile", bool),
    "--compile-cache-dir": ("model.compile_cache_dir", str),
    "--cuda-graphs": ("model.cuda_graphs", bool),
    "--attention": ("model.attention", str),
    "--attention-fp8": ("model.attention_fp8", bool),
    "--text-encoder": ("model.text_encoder", str),
    "--text-encoder-placement": ("model.text_encoder_placement", str),
    "--text-encoder-quant": ("model.text_encoder_quant", str),
    "--prompt-cache-mb": ("model.prompt_cache_mb", float),
    "--prompt": ("request.prompt", str),
    "--negative-prompt": ("request.negative_prompt", str),
    "--height": ("request.height", int),
    "--width": ("request.width", int),
    "--steps": ("request.steps", int),
    "--guidance": ("request.guidance", float),
    "--seed": ("request.seed", int),
    "--max-sequence-length": ("request.max_sequence_length", int),
    "--image": ("request.images", list),  # repeatable: reference images (editing), in order
    "--max-pixels": ("limits.max_pixels", int),
    "--max-references": ("limits.max_references", int), "--max-reference-pixels": ("limits.max_reference_pixels", int),
    "--ulysses": ("parallel.ulysses", int),
    "--ring": ("parallel.ring", int),
    "--cfg-parallel": ("parallel.cfg_parallel", int),
    "--cache": ("cache.mode", str),
    "--cache-threshold": ("cache.threshold", float),
    "--cache-warmup-steps": ("cache.warmup_steps", int),
    "--cache-cutoff-steps": ("cache.cutoff_steps", int),
    "--cache-coefficients": ("cache.coefficients", str),
    "--output": ("output.output", str),
    "--metrics": ("output.metrics", str),
}


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (see configs/); flags override it")
    for flag, (key, typ) in FLAGS.items():
        dest = key.replace(".", "__")
        kind = {"action": argparse.BooleanOptionalAction} if typ is bool else \
            {"action": "append", "metavar": "PATH"} if typ is list else {"type": typ}
        p.add_argument(flag, **kind, default=None, dest=dest, help=f"overrides {key}")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = {key: getattr(args, key.replace(".", "__")) for key, _ in FLAGS.values()}
    return load_config(args.config, overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    check_run(cfg)
    req = cfg.request if args.prompts_file else checked_request(cfg.request, cfg.limits)  # before heavy imports
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

    cfg = config_from_args(args)
    check_run(cfg)
    cfg.request = sized(dataclasses.replace(cfg.request, images=[]))  # HTTP defaults: text-to-image, sized
    max_work = DEFAULT_MAX_WORK if args.max_work is None else (args.max_work or None)  # 0: no limit
    opts = dict(api_key=args.api_key or os.environ.get("FLUX_DIST_API_KEY"), max_queue=args.max_queue,
                max_images=args.max_images, request_timeout_s=args.request_timeout, max_work=max_work,
                read_timeout_s=args.read_timeout, max_connections=args.max_connections)
    ServeOptions(args.host, args.port, **opts).check()  # before loading: a bad flag costs nothing
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
    cfg.request = checked_request(dataclasses.replace(cfg.request, prompt=prompts[0]), cfg.limits)
    info = distributed.init(cfg.model.device, cfg.dist.startup_timeout_s, cfg.dist.watchdog_s)
    on_rank0_then_all(info, lambda: check_outputs(extra=args.calib_output))
    engine = Engine(cfg, info)
    calibrate(engine, prompts, args.calib_output, args.degree)
    engine.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-dist", description="Distributed FLUX.2 inference")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one image (one process, or every rank under torchrun)")
    _add_run_flags(g)
    g.add_argument("--prompts-file", help="batch mode: one request a line (.txt prompts, or .jsonl objects)")
    g.add_argument("--output-dir", default="out/batch", help="batch mode: images and manifest.json go here")
    g.set_defaults(func=cmd_generate)
    k = sub.add_parser("calibrate-cache", help="fit TeaCache coefficients for a model over a prompts file")
    _add_run_flags(k)
    k.add_argument("--prompts-file", required=True, help=".txt (one prompt a line) or .jsonl with 'prompt'")
    k.add_argument("--coefficients-file", dest="calib_output", required=True,
                   help="YAML to write (what --cache-coefficients reads)")
    k.add_argument("--degree", type=int, default=4)
    k.set_defaults(func=cmd_calibrate_cache)
    v = sub.add_parser("serve", help="serve HTTP (OpenAI images API) from rank 0, every rank computing")
    _add_run_flags(v)
    v.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or env FLUX_DIST_API_KEY)")
    v.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond this get 429")
    v.add_argument("--max-images", type=int, default=4, help="largest 'n' a request may ask for")
    v.add_argument("--request-timeout", type=float, default=600.0,
                   help="deadline in seconds from arrival: the request is stopped at the next step and answered 504")
    v.add_argument("--max-work", type=int, default=None,
                   help="largest width x height x steps x n a request may ask for, else 400 (0: no limit; "
                   "default 209715200 = 2048x2048 x 50 steps x 1)")
    v.add_argument("--read-timeout", type=float, default=10.0,
                   help="seconds for a request's head (and an idle connection), and again for its body")
    v.add_argument("--max-connections", type=int, default=64,
                   help="open connections over this get 503; over twice this are closed at once")
    v.set_defaults(func=cmd_serve)
    r = sub.add_parser("ray-generate", help="generate one image on a Ray cluster (one actor per rank)")
    _add_run_flags(r)
    r.add_argument("--address", default=None,
                   help="Ray cluster (HOST:PORT, ray://..., or auto: the one `ray start` began on this machine); "
                   "default RAY_ADDRESS, else a new local cluster")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster started here")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole request, loading included")
    r.set_defaults(func=cmd_ray_generate)
    qz = sub.add_parser("quantize", help="quantize a model's transformer once and save it (load with --model DIR)")
    qz.add_argument("model", help="a preset name or a local diffusers-format directory")
    qz.add_argument("path")
    qz.add_argument("--quant", default="auto")
    qz.add_argument("--dtype", default="bfloat16")
    qz.add_argument("--device", default="auto")
    qz.add_argument("--seed", type=int, default=0)
    qz.add_argument("--format", choices=choices(CheckpointFormat), default="flux-dist",
                    help="flux-dist's own checkpoint, or NVIDIA ModelOpt's Hugging Face export format "
                    "(config.json quantization_config + hf_quant_config.json); --model DIR loads either")
    qz.set_defaults(func=cmd_quantize)
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
