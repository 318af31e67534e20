"""Where does a sequence-parallel pass spend its time? torchrun --nproc-per-node 2 bench/profile_sp.py MODE

Profiles one FLUX.2 [dev] pass at 1024x1024 on rank 0 (top CUDA kernels), and times the pieces the
cost model needs: the Ulysses all-to-all at its real size, and the biggest GEMMs at the full and the
half token count.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from bench.common import log, pass_inputs, time_ms
from bench.pass_bench import ours_fn
from flux_dist import distributed
from flux_dist.models import flux2
from flux_dist.models.presets import build_preset
from flux_dist.parallel.attention import AttnContext, _a2a
from flux_dist.parallel.mesh import Mesh, ParallelDims


@torch.inference_mode()
def main(mode: str) -> None:
    info = distributed.init("cuda")
    dims = ParallelDims(1, 1, 2) if mode == "ulysses" else ParallelDims(1, 2, 1)
    c = build_preset("flux2-dev", dtype=torch.bfloat16, device=info.device, seed=0)
    tr = c.transformer.eval()
    ctx = AttnContext(Mesh(dims, info.rank, info.world_size))
    flux2.parallelize(tr, ctx)
    fn = ours_fn(tr, ctx, pass_inputs(info.device, 1024, 1024))
    log(mode, "pass", time_ms(fn))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    if info.is_main:
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    if mode == "ulysses":
        buf = torch.randn(2, 3, 1, 2304, 24, 128, device=info.device, dtype=torch.bfloat16)

        def a2a() -> None:
            y = _a2a(buf, dist.group.WORLD)
            y.wait() if hasattr(y, "wait") else None

        log("a2a qkv 85MB", time_ms(a2a, warm=3, rep=20))
        for m in (4608, 2304):
            for k, n in ((6144, 55296), (24576, 6144), (6144, 6144)):
                a = torch.randn(m, k, device=info.device, dtype=torch.bfloat16)
                w = torch.randn(n, k, device=info.device, dtype=torch.bfloat16)
                t = time_ms(lambda a=a, w=w: torch.nn.functional.linear(a, w), warm=3, rep=20)["median_ms"]
                log(f"gemm M={m} K={k} N={n}: {t:.3f} ms {2 * m * k * n / t / 1e9:.0f} TFLOP/s")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
