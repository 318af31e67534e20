"""The whole request path: load -> parallelize -> encode -> noise -> shard -> denoise -> gather -> decode.

An ``Engine`` is built once per process (every rank builds one) and then serves request after
request; every rank must call ``generate`` with the same request.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from . import cache as step_cache
from . import compile as compile_mod
from . import distributed, faults, quant, sampling
from .config import LimitsConfig, RequestConfig, RunConfig
from .errors import FluxDistError, NotSupportedError
from .graphs import GraphedStack
from .models import flux2
from .models.source import load_model
from .parallel import kernels
from .parallel.attention import AttnContext
from .parallel.cfg import cfg_parallel_combine, guided
from .parallel.mesh import Mesh, ParallelDims
from .parallel.sharding import ShardPlan, gather_image

log = logging.getLogger("flux_dist")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Result:
    latents: torch.Tensor  # final packed latents [1, img_len, C], on every rank
    image: Any | None  # PIL image on rank 0, None elsewhere
    metrics: dict = field(default_factory=dict)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise FluxDistError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


class Engine:
    """One loaded, parallelized FLUX.2 model on this rank."""

    def __init__(self, cfg: RunConfig, dist_info: distributed.DistInfo | None = None) -> None:
        self.cfg = cfg
        self.dist = dist_info or distributed.init(cfg.model.device, cfg.dist.startup_timeout_s)
        p = cfg.parallel
        self.mesh = Mesh(ParallelDims(p.cfg_parallel, p.ring, p.ulysses), self.dist.rank, self.dist.world_size)
        self.dtype = parse_dtype(cfg.model.dtype)
        if cfg.model.cuda_graphs:  # refused before a possibly long load
            if self.dist.device.type != "cuda":
                raise NotSupportedError("--cuda-graphs needs a CUDA device")
            if cfg.cache.mode == "fbcache":
                raise NotSupportedError("--cuda-graphs with --cache fbcache is not built (teacache and none are)")
        t0 = time.perf_counter()
        if cfg.model.compile:
            compile_mod.enable_cache(cfg.model.compile_cache_dir)  # before anything asks inductor for its dir
        # Resolved before the load: full-size presets are quantized block by block while they are built.
        self.quant = quant.resolve_mode(cfg.model.quant, self.dist.device)
        self.c = load_model(cfg.model.model, dtype=self.dtype, device=self.dist.device, seed=cfg.model.seed,
                            quant=self.quant)
        self.true_cfg = self.c.family == "klein" and not self.c.is_distilled
        if self.mesh.dims.cfg > 1 and not self.true_cfg:
            raise FluxDistError(
                f"--cfg-parallel 2 needs a model with true CFG (a [klein] base model); '{self.c.name}' is "
                "guidance-distilled and runs one branch per step"
            )
        step_cache.validate(cfg.cache)
        step_cache.resolve_coefficients(cfg.cache, self.c.family)  # fail at start-up, not mid-request
        self.tr = self.c.transformer.eval()
        n_quant = quant.quantize_transformer(self.tr, self.quant)  # already quantized: only counts
        kernel = kernels.resolve(cfg.model.attention, cfg.model.attention_fp8, self.dist.device, self.dtype)
        self.ctx = AttnContext(self.mesh, kernel=kernel)
        flux2.parallelize(self.tr, self.ctx)
        if cfg.model.compile:
            compile_mod.compile_blocks(self.tr, cfg.model.compile_backend)
        # the work outside the blocks (all a skipped cache step runs): a few compiled regions too
        self.fns = compile_mod.compile_step(cfg.model.compile_backend) if cfg.model.compile else flux2.EAGER
        self.stack = flux2.image_stack
        if cfg.model.cuda_graphs:
            self.stack = GraphedStack()
        self._plans: dict[tuple[int, int], ShardPlan] = {}
        log.info("model %s: quant=%s (%d linears), attention=%s, compile=%s, layout %s", self.c.name, self.quant,
                 n_quant, kernel.label, cfg.model.compile, self.mesh.describe())
        vae_cfg = self.c.vae.config
        self.vae_scale = 2 ** (len(vae_cfg.block_out_channels) - 1)
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=self.vae_scale * 2)
        self.load_s = time.perf_counter() - t0
        if self.c.text_encoder is None:
            log.warning("model '%s' has no text encoder here: prompts become seeded random embeddings "
                        "(benchmark shapes, not images)", self.c.name)

    def validate(self, req: RequestConfig) -> None:
        check_request(req, self.cfg.limits, multiple=max(16, 2 * self.vae_scale))

    # -- pieces of the request path ----------------------------------------------------------
    def encode(self, prompt: str, req: RequestConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings ``[1, T, joint_dim]`` and text ids, identical on every rank."""
        dev, n = self.dist.device, req.max_sequence_length
        if self.c.text_encoder is None:
            g = torch.Generator("cpu").manual_seed(req.seed * 1_000_003 + zlib.crc32(prompt.encode()))
            dim = self.tr.config.joint_attention_dim
            emb = torch.randn(1, n, dim, generator=g).to(dev, self.dtype)
        elif self.c.family == "dev":
            emb = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
                self.c.text_encoder, self.c.tokenizer, prompt, device=dev, max_sequence_length=n,
                hidden_states_layers=self.c.text_layers)
        else:
            emb = Flux2KleinPipeline._get_qwen3_prompt_embeds(
                self.c.text_encoder, self.c.tokenizer, prompt, device=dev, max_sequence_length=n,
                hidden_states_layers=self.c.text_layers)
        return emb, Flux2Pipeline._prepare_text_ids(emb).to(dev)

    def noise(self, req: RequestConfig, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed initial latents drawn exactly as diffusers does with a CPU generator seeded ``req.seed``."""
        ch = self.tr.config.in_channels
        shape = (1, ch, req.height // (2 * self.vae_scale), req.width // (2 * self.vae_scale))
        gen = torch.Generator("cpu").manual_seed(req.seed)
        lat = randn_tensor(shape, generator=gen, device=self.dist.device, dtype=dtype)
        ids = Flux2Pipeline._prepare_latent_ids(lat).to(self.dist.device)
        return Flux2Pipeline._pack_latents(lat), ids

    def vae_latents(self, latents: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Packed tokens -> the VAE's ``[B, C, H, W]`` input (un-normalized, un-patchified)."""
        vae = self.c.vae
        lat = Flux2Pipeline._unpack_latents_with_ids(latents, ids)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(lat.device, lat.dtype)
        return Flux2Pipeline._unpatchify_latents(lat * std + mean)

    def decode(self, latents: torch.Tensor, ids: torch.Tensor):
        vae = self.c.vae
        img = vae.decode(self.vae_latents(latents, ids).to(vae.dtype), return_dict=False)[0]
        return self.image_processor.postprocess(img, output_type="pil")[0]

    # -- the request ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, req: RequestConfig, decode: bool = True, control: Callable[[int], None] | None = None) -> Result:
        """One image. ``control``, if given, is called as ``control(step)`` on every rank before every denoise
        step; it may raise (``lockstep.RequestStopped``) to stop the request there, every rank at the same step."""
        self.validate(req)
        mesh, dev, sync, fns = self.mesh, self.dist.device, self._sync, self.fns
        do_cfg = self.true_cfg and req.guidance > 1.0
        t_start = time.perf_counter()

        # 1. text: the cfg rank 1 branch is the negative prompt when CFG is split across ranks.
        prompts = [req.prompt]
        if do_cfg:
            prompts = [req.negative_prompt] if mesh.dims.cfg > 1 and mesh.cfg_rank == 1 else prompts
            prompts += [req.negative_prompt] if mesh.dims.cfg == 1 else []
        enc = [self.encode(p, req) for p in prompts]
        sync()
        t_text = time.perf_counter()

        # 2. noise, schedule and this rank's shards.
        latents, img_ids = self.noise(req, enc[0][0].dtype)
        timesteps, sigmas = sampling.schedule(self.c.scheduler, req.steps, latents.shape[1], dev)
        # Per-step scalars as tensors of their own, made before the loop: no value is baked into a compiled
        # region, and no input sits at an offset (which a compiled region would first copy to align).
        ts = [t.expand(1).to(latents.dtype) / 1000 for t in timesteps]
        sig = [s.clone() for s in sigmas]
        plan = self.plan(enc[0][0].shape[1], latents.shape[1])
        self.ctx.set_plan(plan, dev)
        s = mesh.sp_rank
        x = plan.shard(latents, "img", s)
        img_ids_loc = plan.shard(img_ids, "img", s)
        guidance = None
        if self.tr.config.guidance_embeds:
            guidance = torch.full([1], req.guidance, device=dev, dtype=torch.float32).expand(1)
        branches = [flux2.prepare(self.tr, plan.shard(e, "txt", s), plan.shard(i, "txt", s), img_ids_loc, guidance)
                    for e, i in enc]

        # 3. denoise.
        cache = step_cache.make_cache(self.cfg.cache, mesh, plan, req.steps, self.c.family, self.stack, fns)
        stacks = [cache.stack(b) if cache else self.stack for b in range(len(branches))]
        step_ms: list[float] = []
        bar = tqdm(total=req.steps, disable=not self.dist.is_main, desc="denoise", leave=False)
        for i, t in enumerate(ts):
            if control is not None:
                control(i)
            faults.maybe_inject(self.dist.rank, i)  # testing hook: no-op unless FLUX_DIST_FAULT is set
            t0 = time.perf_counter()
            xin = x.to(self.tr.dtype)
            if cache:
                cache.begin_step(i)
            v = flux2.forward(self.tr, xin, t, branches[0], stacks[0], fns)
            if do_cfg and mesh.dims.cfg > 1:
                v = cfg_parallel_combine(v, mesh, req.guidance)
            elif do_cfg:
                v = guided(v, flux2.forward(self.tr, xin, t, branches[1], stacks[1], fns), req.guidance)
            x = fns.update(x, v, sig[i], sig[i + 1])
            sync()
            step_ms.append((time.perf_counter() - t0) * 1e3)
            bar.update()
        bar.close()
        t_denoise = time.perf_counter()

        # 4. gather and decode (rank 0 decodes; the others only hold the latents).
        full = gather_image(x, plan, mesh.sp_group).contiguous()
        image = self.decode(full, img_ids) if decode and self.dist.is_main else None
        sync()
        t_end = time.perf_counter()
        metrics = {
            "model": self.c.name,
            "text_encoder": "random-embeddings" if self.c.text_encoder is None else type(self.c.text_encoder).__name__,
            "layout": mesh.describe(),
            "device": str(dev),
            "dtype": self.cfg.model.dtype,
            "quant": self.quant,
            "attention": self.ctx.kernel.label,
            "compile": self.cfg.model.compile,
            "cuda_graphs": self.cfg.model.cuda_graphs,
            "request": {"height": req.height, "width": req.width, "steps": req.steps, "guidance": req.guidance,
                        "seed": req.seed, "max_sequence_length": req.max_sequence_length, "true_cfg": do_cfg},
            "tokens": {"text": plan.txt_len, "image": plan.img_len, "per_rank": plan.local_len,
                       "padded": plan.padded},
            "load_s": round(self.load_s, 3),
            "text_encode_s": round(t_text - t_start, 4),
            "denoise_s": round(t_denoise - t_text, 4),
            "decode_s": round(t_end - t_denoise, 4),
            "total_s": round(t_end - t_start, 4),
            "step_ms": [round(v, 3) for v in step_ms],
            "peak_memory_gib": round(peak_memory_gib(dev), 3),
        }
        if cache:
            metrics["cache"] = cache.summary()
            if cache.pairs:
                metrics["cache"]["calibration_pairs"] = cache.pairs
        metrics["cache_skipped_steps"] = len(metrics["cache"]["skipped_steps"]) if cache else 0
        return Result(latents=full, image=image, metrics=metrics)

    def plan(self, txt_len: int, img_len: int) -> ShardPlan:
        """One plan object per shape, so compiled blocks see the same object and never recompile."""
        key = (txt_len, img_len)
        if key not in self._plans:
            self._plans[key] = ShardPlan(txt_len, img_len, self.mesh.dims.sp, self.mesh.dims.ulysses)
        return self._plans[key]

    def _sync(self) -> None:
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)

    def close(self) -> None:
        distributed.shutdown()


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


def peak_memory_gib(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
