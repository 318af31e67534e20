"""Start-up and a 50-step request with the full stack (FP8 + compile + FA3 [+ FP8 attention] + CUDA graphs).

  python bench/start_bench.py OUT.json CACHE_DIR [fp8attn] [nocache]                       # 1 GPU
  torchrun --nproc-per-node 2 bench/start_bench.py OUT.json CACHE_DIR [fp8attn] [nocache]  # Ulysses 2

Run it twice with the same CACHE_DIR: the first run is the cold start (empty inductor cache), the second
the warm start. Start-up = building the model (random weights: no disk read) + quantizing, then the
first request (compile + CUDA graph capture). Then 50 steps without and with TeaCache (threshold picked
on this stack's own trajectory to skip about 16 steps, as in cache_bench.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from bench.cache_bench import DEVICE, DTYPE, MODEL, SIZE, denoise, pick_threshold, sync
from bench.common import log, write_json
from flux_dist import distributed
from flux_dist.config import load_config
from flux_dist.engine import Engine
from flux_dist.models.flux2 import FLUX2_DEV_TEACACHE


def main(out: str, cache_dir: str, fp8_attention: bool) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cold = not os.path.isdir(cache_dir) or not os.listdir(cache_dir)
    t0 = time.perf_counter()
    info = distributed.init(DEVICE)
    cuda = DEVICE == "cuda"  # a CPU smoke run: BENCH_MODEL=flux2-tiny BENCH_DEVICE=cpu BENCH_SIZE=128
    cfg = load_config(None, {"model.model": MODEL, "model.dtype": DTYPE, "model.device": DEVICE,
                             "model.quant": "fp8" if cuda else "fp8-emulate", "model.compile": True,
                             "model.compile_cache_dir": cache_dir, "model.cuda_graphs": cuda, "model.attention": "fa3",
                             "model.attention_fp8": fp8_attention, "parallel.ulysses": world})
    cfg.request = dataclasses.replace(cfg.request, prompt="a red fox in the snow", height=SIZE, width=SIZE,
                                      steps=50, guidance=4.0, seed=0, max_sequence_length=512)
    eng = Engine(cfg, info)
    sync()
    t_engine = time.perf_counter() - t0
    first = eng.generate(dataclasses.replace(cfg.request, steps=1), decode=False)
    sync()
    t_first = time.perf_counter() - t0
    rows: dict = {"cold": cold, "world": world, "attention": first.metrics["attention"],
                  "engine_s": t_engine, "start_to_first_result_s": t_first,
                  "peak_gib_after_start": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    log(f"{'cold' if cold else 'warm'} start: engine {t_engine:.1f} s, first 1-step result at {t_first:.1f} s")
    rows["full"], ref = denoise(eng)
    rows["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    if "nocache" in sys.argv[3:]:  # start-up and one 50-step request only (a short device call)
        if info.is_main:
            write_json(out, rows)
        log(f"50 steps: {rows['full']['denoise_s']:.2f} s; peak {rows['peak_gib']:.1f} GiB")
        return
    rec, _ = denoise(eng, {"mode": "calibrate"})
    th = pick_threshold(rec["rel"], FLUX2_DEV_TEACACHE)
    rows["threshold"] = th
    rows["teacache"], lat = denoise(eng, {"mode": "teacache", "threshold": th})
    rows["teacache"].pop("decisions", None)
    rows["teacache-latent-rel-err-vs-full"] = ((lat.float() - ref.float()).norm() / ref.float().norm()).item()
    rows["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    log(f"50 steps: {rows['full']['denoise_s']:.2f} s; TeaCache {rows['teacache']['denoise_s']:.2f} s "
        f"({rows['teacache']['skipped']} skipped, computed {rows['teacache']['computed_step_ms']:.1f} ms, "
        f"skipped {rows['teacache']['skipped_step_ms']} ms); peak {rows['peak_gib']:.1f} GiB")
    if info.is_main:
        write_json(out, rows)
    eng.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "fp8attn" in sys.argv[3:])
