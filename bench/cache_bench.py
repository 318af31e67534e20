"""TeaCache on FLUX.2 [dev] shapes (random bf16 weights), 1024x1024, 50 steps, next to diffusers eager.

  python bench/cache_bench.py single OUT_DIR           # 1 GPU: diffusers pipeline (baseline), ours, ours+TeaCache
  torchrun --nproc-per-node 2 bench/cache_bench.py sp OUT_DIR   # 2 GPUs: ours Ulysses 2, + TeaCache

The threshold is picked to skip about 16 of 50 steps: a full-compute run records the signal change per
step, the TeaCache rule is replayed on it, and the smallest threshold giving 16 skips is used (the
cached run's own trajectory differs a little, so the skip count it reports is the measured one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from bench.common import log, write_json
from flux_dist.cache import SharedDecision, StepCache
from flux_dist.config import load_config
from flux_dist.engine import Engine
from flux_dist.models import flux2
from flux_dist.models.flux2 import FLUX2_DEV_TEACACHE

STEPS, TARGET_SKIPS = 50, 16
# A CPU smoke test of this script: BENCH_MODEL=flux2-tiny BENCH_DEVICE=cpu BENCH_SIZE=128
MODEL = os.environ.get("BENCH_MODEL", "flux2-dev")
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")
SIZE = int(os.environ.get("BENCH_SIZE", "1024"))
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
QUANT = os.environ.get("BENCH_QUANT", "none")  # e.g. fp8: the full stack under the cache
COMPILE = os.environ.get("BENCH_COMPILE", "0") == "1"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cfg(ulysses: int = 1, **cache):
    c = load_config(None, {"model.model": MODEL, "model.dtype": DTYPE, "model.device": DEVICE,
                           "model.quant": QUANT, "model.compile": COMPILE,
                           "parallel.ulysses": ulysses, **{f"cache.{k}": v for k, v in cache.items()}})
    c.request = dataclasses.replace(c.request, prompt="a red fox in the snow", height=SIZE, width=SIZE,
                                    steps=STEPS, guidance=4.0, seed=0, max_sequence_length=512)
    return c


def denoise(eng: Engine, cache: dict | None = None, steps: int = STEPS) -> tuple[dict, torch.Tensor]:
    eng.cfg.cache = dataclasses.replace(eng.cfg.cache, **(cache or {"mode": "none"}))
    res = eng.generate(dataclasses.replace(eng.cfg.request, steps=steps), decode=False)
    m = res.metrics
    out = {"denoise_s": m["denoise_s"], "skipped": m["cache_skipped_steps"], "step_ms": m["step_ms"]}
    if "cache" in m:
        skips = [d["skip"] for d in m["cache"]["decisions"]]
        comp = [t for t, s in zip(m["step_ms"], skips, strict=True) if not s]
        sk = [t for t, s in zip(m["step_ms"], skips, strict=True) if s]
        out.update(computed_step_ms=statistics.median(comp), skipped_step_ms=statistics.median(sk) if sk else None,
                   decisions=m["cache"]["decisions"])
        if "calibration_pairs" in m["cache"]:
            out["rel"] = [d["rel"] for d in m["cache"]["decisions"]]
    return out, res.latents


def pick_threshold(rel: list[float], coeffs: list[float], warm: int = 1, cut: int = 1) -> float:
    """Smallest threshold whose replay of TeaCache's rule on ``rel`` skips TARGET_SKIPS steps."""
    poly = np.poly1d(coeffs)

    def skips(th: float) -> int:
        acc, n = 0.0, 0
        for i, r in enumerate(rel):
            if i < warm or i >= len(rel) - cut or not np.isfinite(r):
                acc = 0.0
                continue
            acc += max(float(poly(r)), 0.0)
            if acc < th:
                n += 1
            else:
                acc = 0.0
        return n

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if skips(mid) >= TARGET_SKIPS else (mid, hi)
    return hi


@torch.inference_mode()
def decision_cost_ms(eng: Engine) -> float:
    """Signal + shared decision alone (includes the host sync the boolean needs), median of 50.

    Through the engine's step regions, so under compile it times the compiled signal and sums."""
    dev = eng.dist.device
    tr = eng.model.tr
    n = eng.ctx.plan.img_loc
    img = torch.randn(1, n, tr.inner_dim, device=dev, dtype=tr.dtype)
    mods = flux2.modulations(tr, img, torch.full((1,), 0.5, device=dev), torch.full((1,), 4.0, device=dev))
    sc = StepCache(eng.cfg.cache, eng.mesh, eng.ctx.plan, STEPS, FLUX2_DEV_TEACACHE,
                   eng.model.cache_hooks(eng.stack, eng.fns), SharedDecision(eng.mesh))
    sc.prev = eng.fns.signal(tr, img * 1.01, mods)
    ts = []
    for _ in range(60):
        sync()
        t0 = time.perf_counter()
        sc.begin_step(5)
        sc._decide(eng.fns.signal(tr, img, mods))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts[10:])


@torch.inference_mode()
def baseline_pipeline(eng: Engine) -> float:
    """diffusers' own Flux2Pipeline, eager, default processors, same weights and prompt embeddings."""
    from diffusers import Flux2Pipeline
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2AttnProcessor,
        Flux2ParallelSelfAttnProcessor,
    )

    tr = eng.model.tr
    for b in tr.transformer_blocks:
        b.attn.set_processor(Flux2AttnProcessor())
    for b in tr.single_transformer_blocks:
        b.attn.set_processor(Flux2ParallelSelfAttnProcessor())
    pipe = Flux2Pipeline(scheduler=eng.c.scheduler, vae=eng.c.vae, text_encoder=None, tokenizer=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    emb, _ = eng.encode("a red fox in the snow", eng.cfg.request)
    kw = dict(prompt_embeds=emb, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=4.0,
              output_type="latent")
    pipe(**{**kw, "num_inference_steps": 2}, generator=torch.Generator("cpu").manual_seed(0))  # warm-up
    sync()
    t0 = time.perf_counter()
    pipe(**kw, generator=torch.Generator("cpu").manual_seed(0))
    sync()
    return time.perf_counter() - t0


def single(out_dir: str) -> None:
    eng = Engine(cfg())
    rows = {}
    denoise(eng, steps=3)  # warm-up (first-call costs)
    rows["ours-1gpu"], ref = denoise(eng)
    log("ours 1 GPU denoise", rows["ours-1gpu"]["denoise_s"])
    rec, _ = denoise(eng, {"mode": "calibrate"})
    th = pick_threshold(rec["rel"], FLUX2_DEV_TEACACHE)
    rows["threshold"] = th
    rows["ours-1gpu-teacache"], lat = denoise(eng, {"mode": "teacache", "threshold": th})
    rows["teacache-latent-rel-err-vs-full"] = ((lat.float() - ref.float()).norm() / ref.float().norm()).item()
    rows["decision_ms"] = decision_cost_ms(eng)
    log("teacache 1 GPU", {k: v for k, v in rows["ours-1gpu-teacache"].items() if k not in ("decisions", "step_ms")})
    log("decision cost ms", rows["decision_ms"])
    rows["diffusers-eager-1gpu_denoise_s"] = baseline_pipeline(eng)
    log("diffusers eager 1 GPU denoise", rows["diffusers-eager-1gpu_denoise_s"])
    write_json(f"{out_dir}/cache_single.json", rows)
    with open(f"{out_dir}/threshold.json", "w") as f:
        json.dump({"threshold": th}, f)


def baseline(out_dir: str) -> None:
    """Only the diffusers eager 1-GPU baseline (same weights and embeddings as the other modes)."""
    eng = Engine(cfg())
    write_json(f"{out_dir}/baseline.json", {"diffusers-eager-1gpu_denoise_s": baseline_pipeline(eng)})
    log("diffusers eager 1 GPU denoise", json.load(open(f"{out_dir}/baseline.json")))


def sp(out_dir: str) -> None:
    eng = Engine(cfg(ulysses=2))
    rows = {"quant": QUANT, "compile": COMPILE}
    denoise(eng, steps=3)
    rows["ours-ulysses2"], _ = denoise(eng)
    if os.path.exists(f"{out_dir}/threshold.json"):
        th = json.load(open(f"{out_dir}/threshold.json"))["threshold"]
    else:  # pick it on this stack's own full-compute trajectory
        rec, _ = denoise(eng, {"mode": "calibrate"})
        th = pick_threshold(rec["rel"], FLUX2_DEV_TEACACHE)
    rows["threshold"] = th
    rows["ours-ulysses2-teacache"], _ = denoise(eng, {"mode": "teacache", "threshold": th})
    rows["decision_ms"] = decision_cost_ms(eng)
    log("ours u2", rows["ours-ulysses2"]["denoise_s"], "teacache", rows["ours-ulysses2-teacache"]["denoise_s"],
        "skipped", rows["ours-ulysses2-teacache"]["skipped"], "decision ms", rows["decision_ms"])
    if eng.dist.is_main:
        write_json(f"{out_dir}/cache_sp.json", rows)
    eng.close()


if __name__ == "__main__":
    {"single": single, "sp": sp, "baseline": baseline}[sys.argv[1]](sys.argv[2])
