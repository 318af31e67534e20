"""Issue 17: one FLUX.2 [dev] pass at 1024x1024 on one GPU, full stack (FP8 + compile + FA3 FP8 attention +
CUDA graphs) with precise vs fast FP8 accumulation, next to diffusers eager bf16 in the same call.

  python3 bench/gemm/accum_bench.py OUT.json
"""

from __future__ import annotations

import os
import sys

import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench.common import log, pass_inputs, time_ms, write_json  # noqa: E402
from bench.pass_bench import ours_fn  # noqa: E402
from flux_dist import quant  # noqa: E402
from flux_dist.compile import compile_blocks  # noqa: E402
from flux_dist.graphs import GraphedStack  # noqa: E402
from flux_dist.models import flux2  # noqa: E402
from flux_dist.models.presets import build_preset  # noqa: E402
from flux_dist.parallel import kernels  # noqa: E402
from flux_dist.parallel.attention import AttnContext  # noqa: E402
from flux_dist.parallel.mesh import Mesh, ParallelDims  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.inference_mode()
def main(out: str) -> None:
    dev = torch.device("cuda", 0)
    tr = build_preset("flux2-dev", dtype=torch.bfloat16, device=dev, seed=0).transformer.eval()
    kw = pass_inputs(dev, 1024, 1024)
    rows: dict = {"device": torch.cuda.get_device_name(dev)}
    rows["diffusers-eager"] = time_ms(lambda: tr(**kw, return_dict=False))
    ref = tr(**kw, return_dict=False)[0].float()
    log("diffusers eager", rows["diffusers-eager"])
    ctx = AttnContext(Mesh(ParallelDims(), 0, 1), kernel=kernels.resolve("auto", True, dev, torch.bfloat16))
    rows["attention"] = ctx.kernel.label
    rows["fp8_linears"] = flux2.quantize_transformer(tr, "fp8")
    flux2.parallelize(tr, ctx)
    outs = {}
    for fast in (False, True):
        quant.set_fast_accum(tr, fast)
        torch._dynamo.reset()
        compile_blocks([*tr.transformer_blocks, *tr.single_transformer_blocks])
        fn = ours_fn(tr, ctx, kw, GraphedStack(flux2.image_stack))
        outs[fast] = fn().float()
        key = f"ours-fp8-compile-graphs-{'fast' if fast else 'precise'}-accum"
        rows[key] = time_ms(fn)
        rows[key]["speedup_vs_diffusers_eager"] = rows["diffusers-eager"]["median_ms"] / rows[key]["median_ms"]
        rows[key]["rel_err_vs_diffusers_bf16"] = rel(outs[fast], ref)
        log(key, rows[key])
        write_json(out, rows)
    rows["fast_vs_precise_rel_err"] = rel(outs[True], outs[False])
    rows["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    log("fast vs precise accumulation, whole pass:", rows["fast_vs_precise_rel_err"])
    write_json(out, rows)


if __name__ == "__main__":
    main(sys.argv[1])
