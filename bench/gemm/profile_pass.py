"""Issue 17: where one FLUX.2 [dev] pass on one H200 goes, next to diffusers eager bf16 and the torchao FP8 peer.

  python3 bench/gemm/profile_pass.py OUT.json [BUDGET_S]

One call, one GPU, random bf16 weights, the anchor inputs (bench/common.py::pass_inputs):
1. diffusers eager bf16 at 1024x1024 and 2048x2048 (the baseline of every ratio);
2. flux-dist's full stack (FP8 linears with fast accumulation + regional compile + FA3 FP8 attention +
   CUDA graphs) at both sizes, then one 1024x1024 pass under the profiler: every kernel's device time by
   class (FP8 GEMM, bf16 GEMM, attention, inductor's fused elementwise kernels, other elementwise, copies)
   and the idle time (the pass's span less the union of kernel intervals), with the GEMMs' FLOP rate;
3. the peer: diffusers + torchao FP8 row-wise dynamic quantization + regional compile (a fresh model),
   both sizes.
Each stage is skipped once BUDGET_S (default 520) would be passed; the rows are written after every stage.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bench.common import log, pass_inputs, time_ms, write_json  # noqa: E402
from bench.gemm.shapes import pass_flop, pass_linears  # noqa: E402
from bench.pass_bench import ours_fn  # noqa: E402
from flux_dist import quant  # noqa: E402
from flux_dist.compile import compile_blocks  # noqa: E402
from flux_dist.graphs import GraphedStack  # noqa: E402
from flux_dist.models import flux2  # noqa: E402
from flux_dist.models.presets import build_preset  # noqa: E402
from flux_dist.parallel import kernels  # noqa: E402
from flux_dist.parallel.attention import AttnContext  # noqa: E402
from flux_dist.parallel.mesh import Mesh, ParallelDims  # noqa: E402

T0 = time.monotonic()
CLASSES = (  # first match wins; kernel names as this torch / CUDA 13 runs them (bench/gemm/RESULTS.md).
    # Inductor's kernels first (their fused names mention the ops they hold, "_scaled_mm", "flash_attn"), then
    # FA3 (a CUTLASS kernel whose FP8 name holds "e4m3"), then the GEMMs.
    ("inductor_fused", ("triton_",)),
    ("attention", ("flash::", "flashattn", "fmha")),
    ("gemm_fp8", ("nvjet_sm90_qq", "_e4m3", "fp8_gemm")),
    ("gemm_bf16", ("nvjet", "gemm", "cutlass", "xmma")),
    ("copy", ("copy", "memcpy", "memset", "cat")),
    ("elementwise_other", ("",)),
)


def classify(name: str) -> str:
    low = name.lower()
    return next(c for c, keys in CLASSES if any(k.lower() in low for k in keys))


def account(fn, top_n: int = 12) -> dict:
    """One call of ``fn`` under the profiler: device time by kernel class, idle time, the ``top_n`` kernels (name:
    [ms, launches])."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    events = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel" and "dur" in e]
    if not events:
        return {"error": "the profiler recorded no kernels"}
    by: dict[str, float] = {}
    top: dict[str, list] = {}
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    for e in events:
        by[classify(e["name"])] = by.get(classify(e["name"]), 0.0) + e["dur"] / 1e3
        k = top.setdefault(e["name"][:90], [0.0, 0])
        k[0] += e["dur"] / 1e3
        k[1] += 1
    busy, end = 0.0, spans[0][0]
    for s, t in spans:  # the union of the kernel intervals
        if t > end:
            busy += t - max(s, end)
            end = t
    span_ms = (spans[-1][1] - spans[0][0]) / 1e3
    return {"span_ms": span_ms, "busy_ms": busy / 1e3, "idle_ms": span_ms - busy / 1e3, "kernels": len(events),
            "by_class_ms": {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k: [round(v[0], 3), v[1]]
                               for k, v in sorted(top.items(), key=lambda kv: -kv[1][0])[:top_n]}}


def left(budget: float, need: float) -> bool:
    return time.monotonic() - T0 + need < budget


def ratio(rows: dict, key: str, res: int) -> None:
    base = rows.get(f"diffusers-eager-{res}")
    if base and key in rows:
        rows[key]["speedup_vs_diffusers_eager"] = round(base["median_ms"] / rows[key]["median_ms"], 3)


@torch.inference_mode()
def main(out: str, budget: float = 520.0) -> None:
    dev = torch.device("cuda", 0)
    rows: dict = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                  "block_linear_flop_1024": pass_flop(pass_linears(1024)),
                  "block_linear_flop_1024_fp8": pass_flop(pass_linears(1024), True)}
    tr = build_preset("flux2-dev", dtype=torch.bfloat16, device=dev, seed=0).transformer.eval()
    kws = {r: pass_inputs(dev, r, r) for r in (1024, 2048)}
    for r in (1024, 2048):
        rows[f"diffusers-eager-{r}"] = time_ms(lambda r=r: tr(**kws[r], return_dict=False), rep=5 if r == 1024 else 3)
        log(f"diffusers eager {r}", rows[f"diffusers-eager-{r}"])
    write_json(out, rows)
    # flux-dist, full stack
    ctx = AttnContext(Mesh(ParallelDims(), 0, 1), kernel=kernels.resolve("auto", True, dev, torch.bfloat16))
    rows["attention"] = ctx.kernel.label
    rows["fp8_linears"] = flux2.quantize_transformer(tr, "fp8")
    flux2.parallelize(tr, ctx)
    quant.set_fast_accum(tr, True)
    compile_blocks([*tr.transformer_blocks, *tr.single_transformer_blocks])
    for r in (1024, 2048):
        if r == 2048 and not left(budget, 200):
            rows["skipped"] = rows.get("skipped", []) + [f"flux-dist-{r}"]
            continue
        fn = ours_fn(tr, ctx, kws[r], GraphedStack(flux2.image_stack))
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        key = f"flux-dist-fp8-fast-compile-fa3-graphs-{r}"
        rows[key] = time_ms(fn, rep=7 if r == 1024 else 3)
        rows[key]["first_call_s"] = round(time.perf_counter() - t, 1)
        ratio(rows, key, r)
        log(key, rows[key])
        if r == 1024:
            rows["profile-graphs-1024"] = account(fn)
            by = rows["profile-graphs-1024"].get("by_class_ms", {})
            if by.get("gemm_fp8"):
                rows["profile-graphs-1024"]["fp8_gemm_tflops"] = round(
                    pass_flop(pass_linears(1024), True) / (by["gemm_fp8"] * 1e-3) / 1e12, 1)
            log("profile", rows["profile-graphs-1024"])
        write_json(out, rows)
    del tr, ctx
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    # the peer: diffusers + torchao FP8 row-wise + regional compile, on a fresh model
    if not left(budget, 150):
        rows["skipped"] = rows.get("skipped", []) + ["torchao"]
        write_json(out, rows)
        return
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        rows["torchao"] = {"error": f"torchao not importable: {e}"}
        write_json(out, rows)
        return
    tr = build_preset("flux2-dev", dtype=torch.bfloat16, device=dev, seed=0).transformer.eval()
    quantize_(tr, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    tr.compile_repeated_blocks(fullgraph=True)
    for r in (1024, 2048):
        if not left(budget, 60 if r == 1024 else 120):
            rows["skipped"] = rows.get("skipped", []) + [f"torchao-{r}"]
            continue
        key = f"diffusers-torchao-fp8-compile-{r}"
        t = time.perf_counter()
        tr(**kws[r], return_dict=False)
        torch.cuda.synchronize()
        rows[key] = time_ms(lambda r=r: tr(**kws[r], return_dict=False), rep=7 if r == 1024 else 3)
        rows[key]["first_call_s"] = round(time.perf_counter() - t, 1)
        ratio(rows, key, r)
        log(key, rows[key])
        write_json(out, rows)
    rows["peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 1)
    write_json(out, rows)
    print("\n| row | ms | x diffusers eager |\n| --- | --- | --- |")
    for k, v in rows.items():
        if isinstance(v, dict) and "median_ms" in v:
            print(f"| {k} | {v['median_ms']:.1f} | {v.get('speedup_vs_diffusers_eager', 1.0):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1], *(float(x) for x in sys.argv[2:3]))
