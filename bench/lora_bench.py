"""LoRA cost on the full stack: one FLUX.2 [dev] pass at 1024x1024 (random weights, ``text_encoder: none``),
FP8 linears + regional compile + CUDA graphs, with no LoRA, one rank-64 adapter, and two, on every attention
and MLP linear of the blocks (the fused / split ones included); diffusers eager bf16 as the baseline; the bank
as it is (``inplace``: the delta added in place and inside the SwiGLUs) and the first bank (``v1``) to compare.

  python bench/lora_bench.py OUT.json [MODE] [VARIANTS]   # MODE full (default) | quick (no CUDA graphs, 3 timed
                                                           # passes) | smoke (CPU: flux2-tiny, no FP8, aot_eager)
  python bench/lora_bench.py --table A.json [B.json ...]   # the short table of what those files hold

VARIANTS (comma-separated, default ``baseline,none,one,two,one-v1,two-v1``): ``baseline`` diffusers eager bf16;
``none`` no bank; ``one`` / ``two`` a bank of one / two adapters; ``-v1`` the first bank's code. Each engine is
built one after another (the bank is fixed when the engine is built); ``two`` is also timed selecting one adapter
and none (a bank costs the same whatever a request selects), and every engine's requests switch adapters under
``error_on_recompile``: its row ``recompiles`` must be 0. Medians of CUDA-event timings after warm-up
(bench/common.py). The JSON is written after every variant.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch._dynamo
from safetensors.torch import save_file
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import log, pass_inputs, time_ms, write_json  # noqa: E402
from flux_dist.config import RequestConfig, load_config  # noqa: E402
from flux_dist.engine import Engine  # noqa: E402
from flux_dist.lora import LoraLinear  # noqa: E402

MODE = "full"
PROFILE = bool(os.environ.get("LORA_PROFILE"))  # also one pass of each engine under the profiler
RANK, H, W, TXT = 64, 1024, 1024, 512
BLOCK_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
                 "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out")
VARIANTS = "baseline,none,one,two,one-v1,two-v1"
REQUESTS = {"none": [{}], "one": [{"a": 1.0}], "two": [{"a": 1.0, "b": 0.5}, {"a": 0.8}, {}]}


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


def diffusers_shapes(model: str) -> dict[str, tuple[int, int]]:
    """``{diffusers linear name: (in, out)}`` of the model's transformer, built on ``meta`` (no weights)."""
    from diffusers import Flux2Transformer2DModel

    from flux_dist.models.full import FULL_TRANSFORMER_CONFIGS
    from flux_dist.models.presets import build_preset

    cfg = FULL_TRANSFORMER_CONFIGS.get(model) or dict(build_preset(model).transformer.config)
    with torch.device("meta"):
        tr = Flux2Transformer2DModel.from_config(cfg)
    return {n: (m.in_features, m.out_features) for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)}


def engine(lora: dict[str, str]) -> Engine:
    full = {"model.model": "flux2-dev", "model.dtype": "bfloat16", "model.device": "cuda", "model.quant": "fp8",
            "model.cuda_graphs": MODE == "full",
            "model.compile_cache_dir": os.path.expanduser("~/.cache/flux-dist-inductor")}
    smoke = {"model.model": "flux2-tiny", "model.device": "cpu", "model.compile_backend": "aot_eager"}
    cfg = load_config(None, {**(smoke if MODE == "smoke" else full), "model.compile": True,
                             "model.text_encoder": "none"})
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
    if MODE != "smoke":
        return time_ms(fn, warm=2, rep=rep)
    ts = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "n": rep}


def baseline(rows: dict, rep: int) -> None:
    """diffusers eager bf16: the transformer's own forward, one pass (512 text + 4096 image tokens)."""
    from flux_dist.models.presets import build_preset

    dev = torch.device("cpu" if MODE == "smoke" else "cuda")
    tr = build_preset("flux2-tiny" if MODE == "smoke" else "flux2-dev", dtype=torch.bfloat16, device=dev,
                      seed=0).transformer.eval()
    kw = pass_inputs(dev, H, W, TXT, dim=tr.config.joint_attention_dim)
    kw["hidden_states"] = kw["hidden_states"][..., :tr.config.in_channels].contiguous()  # 128 on [dev]
    rows["baseline/diffusers-eager"] = timed(lambda: tr(**kw, return_dict=False), rep)


def variant(rows: dict, name: str, files: dict[str, str], rep: int) -> None:
    kind, _, impl = name.partition("-")
    LoraLinear.impl = impl or "inplace"
    lora = {k: files[k] for k in ("a", "b")[:{"none": 0, "one": 1, "two": 2}[kind]]}
    requests = REQUESTS[kind]
    torch._dynamo.reset()
    eng = engine(lora)
    rows[f"{name}/bank"] = {"impl": LoraLinear.impl if lora else "-", "wrapped": eng.lora.wrapped}
    fns = [pass_fn(eng, chosen) for chosen in requests]
    fns[0]()  # compile and capture
    if MODE != "smoke":
        torch.cuda.synchronize()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for chosen, fn in zip(requests, fns, strict=True):
            key = f"{name}/" + (",".join(f"{k}={v}" for k, v in chosen.items()) or "no-lora")
            rows[key] = timed(fn, rep)
            log(f"{key:24s} {rows[key]['median_ms']:8.2f} ms")
    rows[f"{name}/recompiles"] = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    if PROFILE and MODE != "smoke":  # where the bank's time goes: every kernel of one pass, by name
        from bench.gemm.profile_pass import account

        rows[f"{name}/profile"] = account(fns[0], top_n=400)
    rows[f"{name}/peak_gib"] = 0.0 if MODE == "smoke" else torch.cuda.max_memory_allocated() / 2**30
    del eng, fns
    LoraLinear.impl = "inplace"
    torch._dynamo.reset()
    gc.collect()
    if MODE != "smoke":
        torch.cuda.empty_cache()
        rows[f"{name}/left_allocated_gib"] = torch.cuda.memory_allocated() / 2**30  # what the next engine starts on
        torch.cuda.reset_peak_memory_stats()


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


@torch.inference_mode()
def main(out: str, variants: list[str]) -> None:
    rows: dict = {"rank": RANK, "size": f"{W}x{H}", "cuda_graphs": MODE == "full", "mode": MODE,
                  "device": "cpu" if MODE == "smoke" else torch.cuda.get_device_name(),
                  "commit": _commit()}
    rep = 3 if MODE != "full" else 10
    tmp = tempfile.mkdtemp(prefix="lora_bench_")
    files = {"a": f"{tmp}/a.safetensors", "b": f"{tmp}/b.safetensors"}
    for name in variants:
        t0 = time.perf_counter()
        try:
            if name == "baseline":
                baseline(rows, rep)
            else:
                if "lora_modules" not in rows:  # the adapter files, from the diffusers names and shapes of the model
                    shapes = diffusers_shapes("flux2-tiny" if MODE == "smoke" else "flux2-dev")
                    dev = torch.device("cpu" if MODE == "smoke" else "cuda")
                    rows["lora_modules"] = make_adapter(shapes, files["a"], 1, dev)
                    make_adapter(shapes, files["b"], 2, dev)
                variant(rows, name, files, rep)
        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others' rows
            rows[f"{name}/error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"{name} FAILED: {rows[f'{name}/error']}")
        rows[f"{name}/wall_s"] = time.perf_counter() - t0
        write_json(out, rows)
        LoraLinear.impl = "inplace"
        torch._dynamo.reset()  # a failed variant's engine goes too
        gc.collect()
        if MODE != "smoke":
            torch.cuda.empty_cache()


def _ms(rows: dict, key: str) -> float | None:
    v = rows.get(key)
    return v["median_ms"] if isinstance(v, dict) and "median_ms" in v else None


def table(paths: list[str]) -> str:
    rows: dict = {}
    for p in paths:
        with open(p) as f:
            rows.update(json.load(f))
    base, eager = _ms(rows, "none/no-lora"), _ms(rows, "baseline/diffusers-eager")
    out = [f"LoRA on the full stack, {rows.get('size')} one pass, rank {rows.get('rank')}, {rows.get('device')}, "
           f"commit {rows.get('commit')}", "| engine | bank | request | median ms | vs no LoRA | vs diffusers | "
           "recompiles |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in rows:
        ms = _ms(rows, key)
        if ms is None or key.count("/") != 1:
            continue
        name, req = key.split("/")
        over = f"{100 * (ms / base - 1):+.1f}%" if base and name not in ("none", "baseline") else "-"
        speed = f"{eager / ms:.2f}x" if eager else "-"
        bank = rows.get(f"{name}/bank", {}).get("impl", "-")
        out.append(f"| {name} | {bank} | {req} | {ms:.1f} | {over} | {speed} | {rows.get(f'{name}/recompiles', '-')} |")
    out += [f"{k}: {v}" for k, v in rows.items() if k.endswith("/error")]
    return "\n".join(out)


def diff(path: str, a: str = "none", b: str = "one", n: int | str = 25) -> str:
    """Kernels of one profiled pass of ``b`` against ``a`` (``LORA_PROFILE=1`` rows): class totals and the ``n``
    kernel names whose time grew most (ms, launches)."""
    with open(path) as f:
        rows = json.load(f)
    pa, pb = rows.get(f"{a}/profile", {}), rows.get(f"{b}/profile", {})
    if "by_class_ms" not in pa or "by_class_ms" not in pb:
        return f"no profiles of {a} and {b} in {path}"
    out = [f"| {b} vs {a} | {a} ms | {b} ms | delta |", "| --- | --- | --- | --- |"]
    for k in ("span_ms", "busy_ms", "idle_ms"):
        out.append(f"| {k} | {pa[k]:.2f} | {pb[k]:.2f} | {pb[k] - pa[k]:+.2f} |")
    for c in sorted(set(pa["by_class_ms"]) | set(pb["by_class_ms"])):
        x, y = pa["by_class_ms"].get(c, 0.0), pb["by_class_ms"].get(c, 0.0)
        out.append(f"| class {c} | {x:.2f} | {y:.2f} | {y - x:+.2f} |")
    ka, kb = pa["top_kernels_ms"], pb["top_kernels_ms"]
    grew = sorted(set(ka) | set(kb), key=lambda k: -(kb.get(k, [0, 0])[0] - ka.get(k, [0, 0])[0]))
    out += ["", "| kernel | " + a + " ms (n) | " + b + " ms (n) | delta |", "| --- | --- | --- | --- |"]
    for k in grew[:int(n)]:
        x, y = ka.get(k, [0.0, 0]), kb.get(k, [0.0, 0])
        out.append(f"| `{k}` | {x[0]:.2f} ({x[1]}) | {y[0]:.2f} ({y[1]}) | {y[0] - x[0]:+.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1] == "--diff":
        print(diff(*sys.argv[2:]))
        sys.exit(0)
    if sys.argv[1] == "--table":
        print(table([p for a in sys.argv[2:] for p in sorted(glob.glob(a))]))
        sys.exit(0)
    MODE = sys.argv[2] if len(sys.argv) > 2 else "full"
    if MODE == "smoke":
        RANK, H, W, TXT = 4, 64, 64, 16
    main(sys.argv[1], (sys.argv[3] if len(sys.argv) > 3 else VARIANTS).split(","))
