"""Fast ranks: one FLUX.2 [dev] pass (random bf16 weights) — eager, + regional compile, + FP8 linears,
+ FA3 attention, + FP8 attention, + CUDA graphs — next to diffusers eager in the same call.

  python bench/fast_bench.py single OUT.json [quick]
  torchrun --nproc-per-node 2 bench/fast_bench.py sp OUT.json [quick]
  python bench/fast_bench.py baseline OUT.json      # diffusers eager only (e.g. before an H100 engine run)

Every stage keeps the previous ones (cumulative). Each row records the median ms per pass at 1024x1024,
the first-call seconds after a recompile, and the relative error of the pass output against our eager
bf16 output (same inputs). ``quick`` skips CUDA graphs and 2048x2048.
"""

from __future__ import annotations

import os
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
QUICK = len(sys.argv) > 3 and sys.argv[3] == "quick"
OUT: list[str] = []  # where rank 0 writes the rows after every stage (a late failure keeps the early rows)


def save(rows: dict) -> None:
    if OUT and int(os.environ.get("RANK", "0")) == 0:
        write_json(OUT[0], rows)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


def stage(rows: dict, key: str, fn, ref: torch.Tensor | None) -> torch.Tensor:
    """First call (compile) timed on the host, then the median of CUDA-event timings."""
    t0 = time.perf_counter()
    out = fn().float()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    rows[key] = {**time_ms(fn), "first_call_s": first, "rel_err_vs_eager_bf16": None if ref is None
                 else rel_err(out, ref)}
    log(f"{key:40s} {rows[key]['median_ms']:8.1f} ms  first call {first:6.1f} s  "
        f"rel err {rows[key]['rel_err_vs_eager_bf16']}")
    save(rows)
    return out


def recompile(tr) -> None:
    torch._dynamo.reset()
    compile_blocks([*tr.transformer_blocks, *tr.single_transformer_blocks])


def variants(tr, ctx: AttnContext, dev, rows: dict, tag: str) -> None:
    fn = ours_fn(tr, ctx, pass_inputs(dev, H, W))
    ctx.kernel = kernels.resolve("cudnn", False, dev, torch.bfloat16)  # issue-2 rows used cuDNN
    ref = stage(rows, f"ours-{tag}-eager", fn, None)
    recompile(tr)
    stage(rows, f"ours-{tag}-compile", fn, ref)
    t0 = time.perf_counter()
    n = flux2.quantize_transformer(tr, "fp8")
    torch.cuda.synchronize()
    rows[f"ours-{tag}-fp8-quantize-s"] = time.perf_counter() - t0
    rows[f"ours-{tag}-fp8-linears"] = n
    flux2.parallelize(tr, ctx)  # as the engine does after quantizing: to_out's column split (see split_out)
    recompile(tr)
    stage(rows, f"ours-{tag}-compile-fp8", fn, ref)
    ctx.kernel = kernels.resolve("fa3", False, dev, torch.bfloat16)
    rows[f"ours-{tag}-attention"] = ctx.kernel.name
    recompile(tr)
    stage(rows, f"ours-{tag}-compile-fp8-fa3", fn, ref)
    ctx.kernel = kernels.resolve("fa3", True, dev, torch.bfloat16)
    rows[f"ours-{tag}-attention-fp8"] = ctx.kernel.fp8
    recompile(tr)
    out = stage(rows, f"ours-{tag}-compile-fp8-fa3fp8", fn, ref)
    if QUICK:
        return
    gs = GraphedStack(flux2.image_stack)
    gfn = ours_fn(tr, ctx, pass_inputs(dev, H, W), gs)
    gout = stage(rows, f"ours-{tag}-compile-fp8-fa3fp8-graphs", gfn, ref)
    rows[f"ours-{tag}-graphs-rel-err-vs-nongraph"] = rel_err(gout, out)
    for key, kernel in (("fa3", kernels.Kernel("fa3", False)), ("fa3fp8", ctx.kernel)):
        ctx.kernel = kernel
        recompile(tr)
        g2 = ours_fn(tr, ctx, pass_inputs(dev, 2048, 2048), GraphedStack(flux2.image_stack))
        g2()
        rows[f"ours-{tag}-compile-fp8-{key}-graphs/2048"] = time_ms(g2, warm=1, rep=3)
        log(f"ours-{tag}-compile-fp8-{key}-graphs/2048", rows[f"ours-{tag}-compile-fp8-{key}-graphs/2048"])
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


def attention_check(dev) -> dict:
    """Each kernel at FLUX.2 [dev] shape (48 x 128, 4608 tokens) against float32 math attention."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4608, 48, 128, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    q, k = (F.rms_norm(t, (128,)) for t in (q, k))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q[:, :8].float(), k[:, :8].float(), v[:, :8].float())
    r: dict = {}
    for name, fp8 in (("cudnn", False), ("flash", False), ("fa3", False), ("fa3", True)):
        kern = kernels.resolve(name, fp8, dev, torch.bfloat16)
        key = kern.label.replace("+", "-")
        f = lambda kern=kern: kernels.attention(q, k, v, kern)  # noqa: E731
        o = f()
        r[key] = {**time_ms(f, warm=5, rep=20), "rel_err_vs_fp32": rel_err(o[:, :8], ref)}
        _, lse = kernels.attention_lse(q, k, v, kern)
        s = (q[:, :8].float() @ k[:, :8].float().transpose(-1, -2)) * 128 ** -0.5
        r[key]["lse_max_abs_err"] = (lse[:, :8] - torch.logsumexp(s, -1)).abs().max().item()
        log(f"attention {key:10s} {r[key]['median_ms']:.3f} ms  rel err {r[key]['rel_err_vs_fp32']:.2e}  "
            f"lse err {r[key]['lse_max_abs_err']:.1e}")
    return r


@torch.inference_mode()
def single(out: str) -> None:
    dev = torch.device("cuda", 0)
    tr = build_preset("flux2-dev", dtype=torch.bfloat16, device=dev, seed=0).transformer.eval()
    rows = {"diffusers-eager": time_ms(lambda: tr(**pass_inputs(dev, H, W), return_dict=False))}
    log("diffusers eager 1 GPU", rows["diffusers-eager"])
    rows["fp8-linear-check"] = fp8_linear_check(dev)
    rows["attention-check"] = attention_check(dev)
    ctx = AttnContext(Mesh(ParallelDims(), 0, 1))
    flux2.parallelize(tr, ctx)
    variants(tr, ctx, dev, rows, "1gpu")
    write_json(out, rows)


@torch.inference_mode()
def baseline(out: str) -> None:
    """Only diffusers eager on 1 GPU (the ratio's denominator for a call that runs the engine elsewhere)."""
    dev = torch.device("cuda", 0)
    tr = build_preset("flux2-dev", dtype=torch.bfloat16, device=dev, seed=0).transformer.eval()
    rows = {"diffusers-eager": time_ms(lambda: tr(**pass_inputs(dev, H, W), return_dict=False)),
            "device": torch.cuda.get_device_name(dev), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    log("diffusers eager 1 GPU", rows["diffusers-eager"], "peak GiB", rows["peak_gib"])
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
    OUT.append(sys.argv[2])
    {"single": single, "sp": sp, "baseline": baseline}[sys.argv[1]](sys.argv[2])
