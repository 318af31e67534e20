"""Fast ranks: one FLUX.2 [dev] pass (random bf16 weights) at 1024x1024 — eager, + regional compile,
+ FP8 linears — next to diffusers eager in the same call.

  python bench/fast_bench.py single OUT.json
  torchrun --nproc-per-node 2 bench/fast_bench.py sp OUT.json
"""

from __future__ import annotations

import sys
import time

import torch
import torch._dynamo

from bench.common import log, pass_inputs, time_ms, write_json
from bench.pass_bench import ours_fn
from flux_dist import distributed, quant
from flux_dist.compile import compile_blocks
from flux_dist.graphs import GraphedStack
from flux_dist.models import flux2
from flux_dist.models.presets import build_preset
from flux_dist.parallel import kernels
from flux_dist.parallel.attention import AttnContext
from flux_dist.parallel.mesh import Mesh, ParallelDims

H = W = 1024
QUICK = len(sys.argv) > 3 and sys.argv[3] == "quick"  # skip CUDA graphs and 2048x2048


def variants(tr, ctx, dev, rows: dict, tag: str) -> None:
    kw = pass_inputs(dev, H, W)
    fn = ours_fn(tr, ctx, kw)
    rows[f"ours-{tag}-eager"] = time_ms(fn)
    ref = fn().float()
    log(tag, "eager", rows[f"ours-{tag}-eager"])
    kernels.warmup(dev, torch.bfloat16)
    compile_blocks(tr)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    rows[f"ours-{tag}-compile-first-call-s"] = time.perf_counter() - t0
    rows[f"ours-{tag}-compile"] = time_ms(fn)
    rows[f"ours-{tag}-compile-rel-err-vs-eager"] = ((fn().float() - ref).norm() / ref.norm()).item()
    log(tag, "compile", rows[f"ours-{tag}-compile"], "first call s", rows[f"ours-{tag}-compile-first-call-s"],
        "rel err vs eager", rows[f"ours-{tag}-compile-rel-err-vs-eager"])
    t0 = time.perf_counter()
    n = quant.quantize_transformer(tr, "fp8")
    torch.cuda.synchronize()
    rows[f"ours-{tag}-fp8-quantize-s"] = time.perf_counter() - t0
    torch._dynamo.reset()
    compile_blocks(tr)
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    rows[f"ours-{tag}-fp8-compile-first-call-s"] = time.perf_counter() - t0
    rows[f"ours-{tag}-fp8-compile"] = time_ms(fn)
    rows[f"ours-{tag}-fp8-rel-err-vs-bf16"] = ((out.float() - ref).norm() / ref.norm()).item()
    log(tag, "fp8+compile", n, "linears", rows[f"ours-{tag}-fp8-compile"], "rel err",
        rows[f"ours-{tag}-fp8-rel-err-vs-bf16"], "first call s", rows[f"ours-{tag}-fp8-compile-first-call-s"])
    if QUICK:
        return
    gs = GraphedStack()
    gfn = ours_fn(tr, ctx, kw, gs)
    t0 = time.perf_counter()
    gout = gfn().float()
    torch.cuda.synchronize()
    rows[f"ours-{tag}-graph-capture-s"] = time.perf_counter() - t0
    rows[f"ours-{tag}-fp8-compile-graphs"] = time_ms(gfn)
    rows[f"ours-{tag}-graphs-rel-err-vs-nongraph"] = ((gout - out.float()).norm() / out.float().norm()).item()
    log(tag, "fp8+compile+graphs", rows[f"ours-{tag}-fp8-compile-graphs"], "vs non-graph rel err",
        rows[f"ours-{tag}-graphs-rel-err-vs-nongraph"])
    kw2 = pass_inputs(dev, 2048, 2048)
    g2 = ours_fn(tr, ctx, kw2, gs)
    g2()
    rows[f"ours-{tag}-fp8-compile-graphs-2048"] = time_ms(g2, warm=1, rep=3)
    log(tag, "fp8+compile+graphs 2048", rows[f"ours-{tag}-fp8-compile-graphs-2048"])
    rows[f"peak_gib-{tag}"] = torch.cuda.max_memory_allocated() / 2**30


def fp8_linear_check(dev) -> dict:
    """The real scaled_mm path against its emulation and bf16, one FLUX.2-sized linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6144, 18432, bias=False, device=dev, dtype=torch.bfloat16)
    x = torch.randn(4608, 6144, device=dev, dtype=torch.bfloat16)
    ref = (x.double() @ lin.weight.double().t())
    real = quant.QuantLinear(lin, "fp8")(x).double()
    emu = quant.QuantLinear(lin, "fp8-emulate")(x).double()
    r = {"fp8-real-vs-fp64": ((real - ref).norm() / ref.norm()).item(),
         "fp8-emulate-vs-fp64": ((emu - ref).norm() / ref.norm()).item(),
         "bf16-vs-fp64": ((lin(x).double() - ref).norm() / ref.norm()).item()}
    log("fp8 linear check", r)
    return r


@torch.inference_mode()
def single(out: str) -> None:
    dev = torch.device("cuda", 0)
    tr = build_preset("flux2-dev", dtype=torch.bfloat16, device=dev, seed=0).transformer.eval()
    rows = {"diffusers-eager-1gpu": time_ms(lambda: tr(**pass_inputs(dev, H, W), return_dict=False))}
    rows["fp8-linear-check"] = fp8_linear_check(dev)
    log("diffusers eager 1 GPU", rows["diffusers-eager-1gpu"])
    ctx = AttnContext(Mesh(ParallelDims(), 0, 1))
    flux2.parallelize(tr, ctx)
    variants(tr, ctx, dev, rows, "1gpu")
    write_json(out, rows)


@torch.inference_mode()
def sp(out: str) -> None:
    info = distributed.init("cuda")
    tr = build_preset("flux2-dev", dtype=torch.bfloat16, device=info.device, seed=0).transformer.eval()
    ctx = AttnContext(Mesh(ParallelDims(1, 1, 2), info.rank, info.world_size))
    flux2.parallelize(tr, ctx)
    rows: dict = {}
    variants(tr, ctx, info.device, rows, "ulysses2")
    if info.is_main:
        write_json(out, rows)
    distributed.shutdown()


if __name__ == "__main__":
    {"single": single, "sp": sp}[sys.argv[1]](sys.argv[2])
