"""LoRA cost on the full stack: one FLUX.2 [dev] pass at 1024x1024 (random weights, ``text_encoder: none``),
FP8 linears + regional compile + CUDA graphs, with no LoRA, one rank-64 adapter, and two, on every attention
and MLP linear of the blocks (the fused / split ones included).

  python bench/lora_bench.py OUT.json [quick]      # quick: no CUDA graphs, 3 timed passes
  python bench/lora_bench.py OUT.json smoke        # CPU: flux2-tiny, no FP8, aot_eager (checks the script runs)

Three engines, one after another (the adapter bank is fixed when the engine is built): no bank; a bank of
one adapter; a bank of two. The two-adapter engine is also timed selecting one adapter and none (a bank costs
the same whatever a request selects), and its requests switch adapters under ``error_on_recompile``: the
row ``recompiles`` must be 0. Medians of CUDA-event timings after warm-up (bench/common.py).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time

import torch
import torch._dynamo
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from bench.common import log, time_ms, write_json
from flux_dist.config import RequestConfig, load_config
from flux_dist.engine import Engine
from flux_dist.models.flux2.lora import lora_targets

MODE = sys.argv[2] if len(sys.argv) > 2 else "full"
SMOKE, QUICK = MODE == "smoke", MODE in ("quick", "smoke")
RANK, H, W, TXT = (4, 64, 64, 16) if SMOKE else (64, 1024, 1024, 512)
BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                 "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out")


def make_adapter(shapes: dict[str, tuple[int, int]], path: str, seed: int, device) -> int:
    """A rank-64 LoRA in diffusers' key layout on every attention and MLP linear of the blocks (bf16)."""
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, (n_in, n_out) in shapes.items():
        if "blocks." in name and name.split(".", 2)[2] in BLOCK_LINEARS:
            sd[f"transformer.{name}.lora_A.weight"] = (torch.randn(RANK, n_in, generator=g, device=device) * 0.01
                                                       ).bfloat16().cpu()
            sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(n_out, RANK, generator=g, device=device) * 0.01
                                                       ).bfloat16().cpu()
    save_file(sd, path)
    return len(sd) // 2


def engine(lora: dict[str, str]) -> Engine:
    full = {"model.model": "flux2-dev", "model.dtype": "bfloat16", "model.device": "cuda", "model.quant": "fp8",
            "model.cuda_graphs": not QUICK,
            "model.compile_cache_dir": os.path.expanduser("~/.cache/flux-dist-inductor")}
    smoke = {"model.model": "flux2-tiny", "model.device": "cpu", "model.compile_backend": "aot_eager"}
    cfg = load_config(None, {**(smoke if SMOKE else full), "model.compile": True, "model.text_encoder": "none"})
    cfg.model.lora = dict(lora)
    return Engine(cfg)


def pass_fn(eng: Engine, chosen: dict[str, float]):
    """One transformer pass as ``Engine.generate`` runs it (1 rank: the shards are the whole)."""
    req = RequestConfig(prompt="a fox", height=H, width=W, steps=1, max_sequence_length=TXT, lora=chosen)
    eng.validate(req)
    eng.lora.select(chosen)
    m = eng.model
    (emb, ids), = m.encode([req.prompt], TXT, req.seed, eng.dtype)
    x, img_ids = m.noise(H, W, req.seed, emb.dtype)
    eng.ctx.set_plan(eng.plan(emb.shape[1], x.shape[1]), eng.dist.device)
    inp = m.prepare(emb, ids, img_ids, req.guidance)
    t = torch.full((1,), 0.5, device=eng.dist.device, dtype=emb.dtype)
    return lambda: m.forward(x, t, inp, eng.stack, eng.fns)


def timed(fn, rep: int) -> dict:
    if not SMOKE:
        return time_ms(fn, warm=2, rep=rep)
    ts = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "n": rep}


@torch.inference_mode()
def main(out: str) -> None:
    rows: dict = {"rank": RANK, "size": f"{W}x{H}", "cuda_graphs": not QUICK, "mode": MODE,
                  "device": "cpu" if SMOKE else torch.cuda.get_device_name()}
    rep = 3 if QUICK else 10
    tmp = tempfile.mkdtemp(prefix="lora_bench_")
    variants = [("none", {}, [{}]), ("one", {"a": f"{tmp}/a.safetensors"}, [{"a": 1.0}]),
                ("two", {"a": f"{tmp}/a.safetensors", "b": f"{tmp}/b.safetensors"},
                 [{"a": 1.0, "b": 0.5}, {"a": 0.8}, {}])]
    ref = None
    for name, lora, requests in variants:
        torch._dynamo.reset()
        eng = engine(lora)
        if ref is None:  # the adapter files, from the diffusers names and shapes of the model just built
            shapes = lora_targets(eng.model.tr)[1]
            rows["lora_modules"] = make_adapter(shapes, f"{tmp}/a.safetensors", 1, eng.dist.device)
            make_adapter(shapes, f"{tmp}/b.safetensors", 2, eng.dist.device)
        fns = [pass_fn(eng, chosen) for chosen in requests]
        fns[0]()  # compile and capture
        if not SMOKE:
            torch.cuda.synchronize()
        counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for chosen, fn in zip(requests, fns, strict=True):
                key = f"{name}/" + (",".join(f"{k}={v}" for k, v in chosen.items()) or "no-lora")
                rows[key] = timed(fn, rep)
                log(f"{key:24s} {rows[key]['median_ms']:8.2f} ms")
        rows[f"{name}/recompiles"] = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
        rows[f"{name}/peak_gib"] = 0.0 if SMOKE else torch.cuda.max_memory_allocated() / 2**30
        if ref is None:
            ref = rows[f"{name}/no-lora"]["median_ms"]
        else:
            first = next(k for k in rows if k.startswith(f"{name}/") and isinstance(rows[k], dict))
            rows[f"{name}/overhead_pct"] = 100 * (rows[first]["median_ms"] / ref - 1)
            log(f"{name}: +{rows[f'{name}/overhead_pct']:.2f}% vs no LoRA")
        write_json(out, rows)
        del eng, fns
        gc.collect()
        if not SMOKE:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main(sys.argv[1])
