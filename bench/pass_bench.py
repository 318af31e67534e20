"""One FLUX.2 [dev] transformer pass (random bf16 weights), ours vs diffusers eager, side by side.

  python bench/pass_bench.py single OUT.json          # 1 GPU: diffusers eager, then ours, same weights
  torchrun --nproc-per-node 2 bench/pass_bench.py sp OUT.json   # ours: Ulysses 2, ring 2

Both phases use the anchor's inputs (1024x1024 and 2048x2048, 512 text tokens) and medians of
CUDA-event timings after warm-up.
"""

from __future__ import annotations

import sys

import torch

from bench.common import log, pass_inputs, time_ms, write_json
from flux_dist import distributed
from flux_dist.models import flux2
from flux_dist.models.presets import build_preset
from flux_dist.parallel.attention import AttnContext
from flux_dist.parallel.mesh import Mesh, ParallelDims
from flux_dist.parallel.sharding import ShardPlan

RES = [(1024, 1024), (2048, 2048)]


def ours_fn(tr, ctx: AttnContext, kw: dict, stack=flux2.image_stack):
    """A closure running our forward on this rank's shards."""
    mesh = ctx.mesh
    plan = ShardPlan(kw["txt_ids"].shape[1], kw["img_ids"].shape[1], mesh.dims.sp, mesh.dims.ulysses)
    ctx.set_plan(plan, kw['hidden_states'].device)
    s = mesh.sp_rank
    x = plan.shard(kw["hidden_states"], "img", s)
    inp = flux2.prepare(tr, plan.shard(kw["encoder_hidden_states"], "txt", s),
                        plan.shard(kw["txt_ids"][0], "txt", s, dim=0), plan.shard(kw["img_ids"][0], "img", s, dim=0),
                        kw["guidance"])
    return lambda: flux2.forward(tr, x, kw["timestep"], inp, stack)


@torch.inference_mode()
def single(out: str) -> None:
    dev = torch.device("cuda", 0)
    c = build_preset("flux2-dev", dtype=torch.bfloat16, device=dev, seed=0)
    tr = c.transformer.eval()
    rows = {}
    for h, w in RES:
        kw = pass_inputs(dev, h, w)
        rows[f"diffusers-eager-1gpu/{h}"] = time_ms(lambda kw=kw: tr(**kw, return_dict=False))
        log(f"diffusers eager 1 GPU {h}x{w}: {rows[f'diffusers-eager-1gpu/{h}']}")
    ref = tr(**pass_inputs(dev, 1024, 1024), return_dict=False)[0].float()
    ctx = AttnContext(Mesh(ParallelDims(), 0, 1))
    flux2.parallelize(tr, ctx)
    for h, w in RES:
        fn = ours_fn(tr, ctx, pass_inputs(dev, h, w))
        rows[f"ours-1gpu/{h}"] = time_ms(fn)
        log(f"ours 1 GPU {h}x{w}: {rows[f'ours-1gpu/{h}']}")
    mine = ours_fn(tr, ctx, pass_inputs(dev, 1024, 1024))().float()
    rows["ours-vs-diffusers-rel-err"] = ((mine - ref).norm() / ref.norm()).item()
    rows["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log("rel err ours vs diffusers (1024):", rows["ours-vs-diffusers-rel-err"])
    write_json(out, rows)


@torch.inference_mode()
def sp(out: str) -> None:
    info = distributed.init("cuda")
    c = build_preset("flux2-dev", dtype=torch.bfloat16, device=info.device, seed=0)
    tr = c.transformer.eval()
    rows = {}
    for name, dims in [("ulysses2", ParallelDims(1, 1, 2)), ("ring2", ParallelDims(1, 2, 1))]:
        ctx = AttnContext(Mesh(dims, info.rank, info.world_size))
        flux2.parallelize(tr, ctx)
        for h, w in RES:
            fn = ours_fn(tr, ctx, pass_inputs(info.device, h, w))
            rows[f"ours-{name}/{h}"] = time_ms(fn)
            log(f"ours {name} {h}x{w}: {rows[f'ours-{name}/{h}']}")
    if info.is_main:
        write_json(out, rows)
    distributed.shutdown()


if __name__ == "__main__":
    {"single": single, "sp": sp}[sys.argv[1]](sys.argv[2])
