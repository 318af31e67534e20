"""The whole request path, on every rank: encode -> noise -> shard -> denoise -> gather -> decode.

An ``Engine`` is built once per process (resolve -> load -> quantize -> parallelize -> compile ->
graphs) and then serves request after request; every rank must call ``generate`` with the same
request. Everything model-specific is the adapter's (``models/``); this file names no model.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from . import compile as compile_mod
from . import distributed, faults, quant
from .cache import make_cache, resolve_coefficients
from .config import RequestConfig, RunConfig
from .devices import parse_dtype, peak_memory_gib
from .errors import FluxDistError
from .graphs import GraphedStack
from .layouts import multi_group, resolve_layouts
from .models import adapter_for, attach_text_encoder, attention_heads, check_text_encoder
from .models.lowmem_load import phase_memory
from .models.source import load_model
from .parallel import kernels
from .parallel.attention import AttnContext, check_heads
from .parallel.cfg import cfg_parallel_combine, guided, my_branches
from .parallel.mesh import Mesh, build_meshes
from .parallel.sharding import ShardPlan, gather_image
from .validation import RequestRules, check_cfg_parallel, check_device, check_run, sized

log = logging.getLogger("flux_dist")

# Per-shape caches are bounded (least recently used shapes evicted), so a server seeing many image sizes stays flat:
PLAN_CACHE_SIZE = 32  # ShardPlans (one per (text, image) length; compiled blocks see the same object per shape)
ONEDNN_CACHE_CAPACITY = 256  # oneDNN primitives on CPU (per-shape conv kernels of the VAE; oneDNN's default is 1024)


@dataclass
class Result:
    latents: torch.Tensor  # final packed latents [1, img_len, C] (the target's, no references), on every rank
    image: Any | None  # PIL image on rank 0, None elsewhere
    metrics: dict = field(default_factory=dict)


class Engine:
    """One loaded, parallelized model on this rank.

    ``meshes``: one per layout (``--layouts``; else the one layout, ``--replicas`` groups of the
    configured degrees), every process group built at start; ``mesh`` is the layout in use, switched
    between requests with ``use_layout`` (the attention context, the shard plans and the graphed stack follow).
    """

    def __init__(self, cfg: RunConfig, dist_info: distributed.DistInfo | None = None) -> None:
        m = cfg.model
        check_run(cfg)  # resolve: every choice checked before the process group and the load
        self.cfg = cfg
        self.dist = dist_info or distributed.init(m.device, cfg.dist.startup_timeout_s, cfg.dist.watchdog_s)
        dev = self.dist.device
        check_device(cfg, dev.type)
        self.layouts = resolve_layouts(cfg.parallel, self.dist.world_size)
        groups = multi_group(cfg.parallel)  # more than one group: each encodes its own prompts (no collective)
        heads = attention_heads(m.model)
        for lay in self.layouts if heads else []:  # before the load: a layout the heads cannot take
            check_heads(heads, lay.ulysses, f" (layout {lay.name})" if groups else "")
        if groups and m.text_encoder_placement not in ("auto", "every"):
            raise FluxDistError(f"--text-encoder-placement {m.text_encoder_placement} shares the encoder across all "
                                "ranks; with --replicas / --layouts every rank encodes its group's prompts: use every")
        t_groups = time.perf_counter()
        self.meshes = build_meshes(self.layouts, self.dist.rank, self.dist.world_size)
        if groups:
            log.info("layouts %s: process groups built in %.2f s", ", ".join(self.meshes),
                     time.perf_counter() - t_groups)
        self.mesh: Mesh = self.meshes[self.layouts[0].name]  # the widest
        te_rank, te_world = (0, 1) if groups else (self.dist.rank, self.dist.world_size)
        if dev.type == "cpu":  # read by oneDNN at its first primitive; a user's own setting wins
            os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
        self.dtype = parse_dtype(m.dtype)
        self.quant = quant.resolve_mode(m.quant, dev)  # before the load: full presets quantize while built
        check_text_encoder(m, dev, te_world)
        if m.compile:
            compile_mod.enable_cache(m.compile_cache_dir)  # before anything asks inductor for its dir
        t0, self.memory = time.perf_counter(), {}
        with phase_memory(self.memory, "load", dev):  # a directory's whole encoder is never read
            self.c = load_model(m.model, dtype=self.dtype, device=dev, seed=m.seed, quant=self.quant,
                                text_encoder=False)
            self.quant = self.c.quant  # what the model runs (a directory saved quantized keeps its format)
            self.model = adapter_for(self.c, dev)
            attach_text_encoder(self.model, m, dev, self.dtype, te_rank, te_world)
        self.true_cfg = self.model.true_cfg
        check_cfg_parallel(self.mesh.dims.cfg, self.true_cfg, self.model.name)
        self.coefficients = resolve_coefficients(cfg.cache, self.model.teacache_coefficients, self.model.name)
        n_quant = self.model.quantize(self.quant)  # what the load did not (already quantized layers are counted)
        self.activations = quant.activation_scaling(self.model.blocks())  # static (calibrated input_scale) / dynamic
        if m.quant not in ("none", "auto") and n_quant == 0:
            log.warning("*** --quant %s asked for, but NO linear is quantized: running %s ***", m.quant, m.dtype)
        kernel = kernels.resolve(m.attention, m.attention_fp8, dev, self.dtype)
        # parallelize (the fused / split linears exist from here on; the widest Ulysses takes every layout's)
        self.ctx = AttnContext(max(self.meshes.values(), key=lambda mesh: mesh.dims.ulysses), kernel=kernel)
        self.model.parallelize(self.ctx)
        for block in self.model.blocks():
            quant.set_fast_accum(block, m.fp8_fast_accum)
        self.lora = self.model.load_lora(m.lora, self.dtype)  # LoRA bank: every adapter, unmerged (maybe none)
        self.fns = self.model.step_fns
        if m.compile:  # compile: each block, and the step's work outside them (all a skipped cache step runs)
            compile_mod.compile_blocks(self.model.blocks(), m.compile_backend)
            compile_mod.allow_variants(8 * len(self.layouts))  # each layout compiles its own, per shape
            self.fns = compile_mod.compile_fns(self.fns, m.compile_backend)
        self._stacks: dict[str, Any] = {}  # graphs: captured per layout (and per shape)
        self.use_layout(self.mesh.name)
        self._plans: OrderedDict[tuple[int, ...], ShardPlan] = OrderedDict()
        self.load_s = time.perf_counter() - t0
        log.info("model %s: quant=%s (%d linears, %s activations), attention=%s, compile=%s, layout %s",
                 self.model.name, self.quant, n_quant, self.activations, kernel.label, m.compile, self.mesh.describe())
        if self.model.text_encoder_label == "random-embeddings":
            log.warning("model '%s' has no text encoder here: prompts become seeded random embeddings "
                        "(benchmark shapes, not images)", self.model.name)

    def use_layout(self, name: str) -> Mesh:
        """Run the next requests on layout ``name`` (call between requests, every rank together)."""
        self.mesh = self.ctx.mesh = self.meshes[name]
        if name not in self._stacks:
            self._stacks[name] = GraphedStack(self.model.stack) if self.cfg.model.cuda_graphs else self.model.stack
        self.stack = self._stacks[name]
        return self.mesh

    def rules(self) -> RequestRules:
        """What this engine accepts (the loaded adapters' names, paths, ranks: ``self.lora.describe()``)."""
        return RequestRules(self.cfg.limits, self.model.image_multiple, self.true_cfg, tuple(self.lora.names))

    def validate(self, req: RequestConfig) -> None:
        self.rules()(req)

    def decode(self, latents: torch.Tensor, ids: torch.Tensor) -> Any:
        return self.model.decode(latents, ids)

    # -- the request ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, req: RequestConfig, decode: bool = True,
                 control: Callable[[int], None] | None = None) -> Result:
        """One request on every rank. ``control(step)``, if given, runs at each step boundary on every
        rank (a request's deadline or cancellation raises there, on every rank at the same step)."""
        self.validate(req)
        self.lora.select(req.lora)  # this request's adapters and scales: data in place, never a new graph
        mesh, model, t, mem, dev = self.mesh, self.model, {"start": time.perf_counter()}, {}, self.dist.device
        do_cfg = self.true_cfg and req.guidance > 1.0

        # 1. encode (the same prompts on every rank); cfg rank 1 keeps the negative branch under CFG parallel.
        with phase_memory(mem, "encode", dev):
            texts = [req.prompt, req.negative_prompt] if do_cfg else [req.prompt]
            enc = my_branches(model.encode(texts, req.max_sequence_length, req.seed, self.dtype), mesh)
        t["text"] = self._sync()

        # 2. noise, references (encoded once), schedule; 3. this rank's shards of [text], [target, references].
        req = sized(req, model.image_multiple)  # a size it leaves unset: the first reference's (as diffusers)
        latents, img_ids = model.noise(req.height, req.width, req.seed, enc[0][0].dtype)
        with phase_memory(mem, "references", dev):  # every rank encodes the same images (no collective)
            refs, ref_ids, ref_sizes = model.references(req.images, enc[0][0].dtype)
        t["refs"] = self._sync()
        timesteps, sigmas = model.schedule(req.steps, latents.shape[1])
        plan = self.plan(enc[0][0].shape[1], latents.shape[1], refs.shape[1])
        self.ctx.set_plan(plan, self.dist.device)
        s = mesh.sp_rank
        x = plan.shard(torch.cat([latents, refs], 1), "img", s)
        img_loc = plan.shard(torch.cat([img_ids, ref_ids], 1), "img", s)
        branches = [model.prepare(plan.shard(e, "txt", s), plan.shard(i, "txt", s), img_loc, req.guidance)
                    for e, i in enc]

        # 4. denoise.
        cache = make_cache(self.cfg.cache, mesh, plan, req.steps, self.coefficients,
                           model.cache_hooks(self.stack, self.fns))
        with phase_memory(mem, "denoise", dev):
            x, step_ms = self._denoise(x, timesteps, sigmas, branches, cache, req, do_cfg, control,
                                       plan.target_mask(s, dev))
        t["denoise"] = time.perf_counter()

        # 5. gather; 6. decode (the group's first rank decodes; the others only hold the latents).
        with phase_memory(mem, "decode", dev):
            full = gather_image(x, plan, mesh.sp_group).contiguous()
            image = self.decode(full, img_ids) if decode and mesh.is_leader else None
        t["end"] = self._sync()
        return Result(full, image, self._metrics(req, plan, t, step_ms, cache, do_cfg, mem, ref_sizes))

    def _denoise(self, x, timesteps, sigmas, branches, cache, req, do_cfg, control, target) -> tuple:
        mesh, model, fns = self.mesh, self.model, self.fns
        stacks = [cache.stack(b) if cache else self.stack for b in range(len(branches))]
        # Per-step scalars as tensors of their own, made before the loop: no value is baked into a compiled
        # region, and no input sits at an offset (which a compiled region would first copy to align).
        ts = [t.expand(1).to(x.dtype) / 1000 for t in timesteps]
        sig = [s.clone() for s in sigmas]
        step_ms: list[float] = []
        for i in tqdm(range(req.steps), disable=not self.dist.is_main, desc="denoise", leave=False):
            faults.maybe_inject(self.dist.rank, i)  # testing hook: no-op unless FLUX_DIST_FAULT is set
            if control is not None:
                control(i)
            t0 = time.perf_counter()
            if cache:
                cache.begin_step(i)
            v = model.forward(x, ts[i], branches[0], stacks[0], fns)
            if do_cfg and mesh.dims.cfg > 1:
                v = cfg_parallel_combine(v, mesh, req.guidance)
            elif do_cfg:
                v = guided(v, model.forward(x, ts[i], branches[1], stacks[1], fns), req.guidance)
            x = fns.update(x, v, sig[i], sig[i + 1]) if target is None else \
                torch.where(target, fns.update(x, v, sig[i], sig[i + 1]), x)  # reference tokens stay as encoded
            self._sync()
            step_ms.append((time.perf_counter() - t0) * 1e3)
        return x, step_ms

    def _metrics(self, req, plan, t, step_ms, cache, do_cfg, mem, ref_sizes) -> dict:
        m = self.cfg.model
        cache_summary = cache.summary() if cache else None
        out = {
            "model": self.model.name, "text_encoder": self.model.text_encoder_label, "layout": self.mesh.describe(),
            "device": str(self.dist.device), "dtype": m.dtype, "quant": self.quant,
            "quant_activations": self.activations,
            "attention": self.ctx.kernel.label, "compile": m.compile, "cuda_graphs": m.cuda_graphs,
            "fp8_fast_accum": m.fp8_fast_accum,
            "request": {"height": req.height, "width": req.width, "steps": req.steps, "guidance": req.guidance,
                        "seed": req.seed, "max_sequence_length": req.max_sequence_length, "true_cfg": do_cfg,
                        "lora": dict(req.lora or {}), "references": [list(wh) for wh in ref_sizes]},
            "tokens": {"text": plan.txt_len, "image": plan.img_len, "reference": plan.ref_len,
                       "per_rank": plan.local_len, "padded": plan.padded},
            "load_s": round(self.load_s, 3),
            "text_encode_s": round(t["text"] - t["start"], 4),
            "reference_encode_s": round(t["refs"] - t["text"], 4),
            "denoise_s": round(t["denoise"] - t["refs"], 4),
            "decode_s": round(t["end"] - t["denoise"], 4),
            "total_s": round(t["end"] - t["start"], 4),
            "step_ms": [round(v, 3) for v in step_ms],
            "peak_memory_gib": round(peak_memory_gib(self.dist.device), 3),
            "peak_memory_gib_by_phase": {**self.memory, **mem},
            "text": self.model.text_metrics(),
        }
        if cache_summary:
            out["cache"] = cache_summary
        out["cache_skipped_steps"] = len(cache_summary["skipped_steps"]) if cache_summary else 0
        return out

    def plan(self, txt_len: int, img_len: int, ref_len: int = 0) -> ShardPlan:
        """One plan object per shape, so compiled blocks see the same object and never recompile."""
        dims = self.mesh.dims
        key = (txt_len, img_len, ref_len, dims.sp, dims.ulysses)
        if key in self._plans:
            self._plans.move_to_end(key)
        else:
            self._plans[key] = ShardPlan(txt_len, img_len, dims.sp, dims.ulysses, ref_len)
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return self._plans[key]

    def _sync(self) -> float:
        """Wait for the device (so host timings mean something); returns the time after."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        return time.perf_counter()

    def close(self) -> None:
        distributed.shutdown()
