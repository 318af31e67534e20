"""The command line's surface: the flag table (each flag overrides one config key) and the subcommands'
arguments. ``cli`` turns them into a config and calls library functions."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .config import CheckpointFormat, RunConfig, add_lora_specs, choices, load_config

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
    "--fp8-fast-accum": ("model.fp8_fast_accum", bool),
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
    "--max-references": ("limits.max_references", int),
    "--max-reference-pixels": ("limits.max_reference_pixels", int),
    "--ulysses": ("parallel.ulysses", int),
    "--ring": ("parallel.ring", int),
    "--cfg-parallel": ("parallel.cfg_parallel", int),
    "--replicas": ("parallel.replicas", int),  # serve and batch mode: groups, each its own request
    "--layouts": ("parallel.layouts", str),  # serve: e.g. 8x1,4x2,2x4 (replicas x degree), chosen by load
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
    p.add_argument("--lora", action="append", metavar="[NAME=]PATH[:SCALE]", help="load a LoRA at start (repeatable; "
                   "NAME: the file's stem) and apply it at SCALE (1.0); batch lines pick with 'lora': {NAME: scale}")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = {key: getattr(args, key.replace(".", "__")) for key, _ in FLAGS.values()}
    return add_lora_specs(load_config(args.config, overrides), args.lora)



def build_parser(commands: dict[str, Callable]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-dist", description="Distributed FLUX.2 inference")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate one image (one process, or every rank under torchrun)")
    _add_run_flags(g)
    g.add_argument("--prompts-file", help="batch mode: one request a line (.txt prompts, or .jsonl objects)")
    g.add_argument("--output-dir", default="out/batch", help="batch mode: images and manifest.json go here")
    g.set_defaults(func=commands["generate"])
    k = sub.add_parser("calibrate-cache", help="fit TeaCache coefficients for a model over a prompts file")
    _add_run_flags(k)
    k.add_argument("--prompts-file", required=True, help=".txt (one prompt a line) or .jsonl with 'prompt'")
    k.add_argument("--coefficients-file", dest="calib_output", required=True,
                   help="YAML to write (what --cache-coefficients reads)")
    k.add_argument("--degree", type=int, default=4)
    k.set_defaults(func=commands["calibrate_cache"])
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
    v.set_defaults(func=commands["serve"])
    r = sub.add_parser("ray-generate", help="generate one image on a Ray cluster (one actor per rank)")
    _add_run_flags(r)
    r.add_argument("--address", default=None,
                   help="Ray cluster (HOST:PORT, ray://..., or auto: the one `ray start` began on this machine); "
                   "default RAY_ADDRESS, else a new local cluster")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster started here")
    r.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole request, loading included")
    r.set_defaults(func=commands["ray_generate"])
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
    qz.add_argument("--calibrate", metavar="PROMPTS", help="calibrate and export with NVIDIA ModelOpt itself over "
                    "these prompts (.txt/.jsonl); needs pip install 'flux-dist[quant]' and --quant fp8|nvfp4")
    qz.add_argument("--activations", choices=("static", "dynamic"), default="static", help="with --calibrate")
    for flag, typ in (("height", int), ("width", int), ("steps", int), ("guidance", float), ("max-seq-len", int)):
        qz.add_argument(f"--calib-{flag}", type=typ, dest=f"calib_{flag.replace('-', '_')}", help="default 1024/28")
    qz.set_defaults(func=commands["quantize"])
    s = sub.add_parser("save-preset", help="save a preset's random weights as a diffusers directory")
    s.add_argument("name")
    s.add_argument("path")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=commands["save_preset"])
    return parser
