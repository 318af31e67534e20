"""Issue 16 on one GPU: flux-dist against NVIDIA ModelOpt itself, [dev] transformer width (random bf16 weights).

  python3 bench/modelopt_bench.py OUT.json QUANT ACTIVATIONS [DOUBLE SINGLE] [EXPORT_DIR]
      QUANT fp8 | nvfp4, ACTIVATIONS static | dynamic; DOUBLE / SINGLE blocks (default 8 / 48: the whole
      [dev] transformer, 64 GB bf16; fewer keep [dev]'s width and shapes, for a quick call)

Steps: ModelOpt's own ``mtq.quantize`` (its FP8 / NVFP4 config, flux-dist's plan: quant/modelopt.py)
calibrated by 2 random-embedding requests through flux-dist's denoise loop (models/flux2/calibrate.py,
1024x1024, 2 steps); ModelOpt's fake-quantized output of one pass (1024x1024, 512 text tokens) and of one
planned linear per block kind on captured inputs; ModelOpt's exporter writes the checkpoint; the model is
freed and flux-dist loads the export (NVFP4: ``nvfp4-emulate`` on Hopper; FP8: the real ``_scaled_mm``)
and runs the same pass and linears. Reports relative errors flux-dist vs ModelOpt, ModelOpt vs bf16, and
pass times. A layout mismatch (nibble order, scale order, per-tensor scale, input_scale) shows as an
error of the size of the quantization gap instead of far below it.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import log, pass_inputs, time_ms, write_json  # noqa: E402

DEV = torch.device("cuda", 0)
PROBES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.linear_out",
          "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out")


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _model(double: int, single: int):
    """[dev]'s full preset (8 / 48), else a transformer of [dev]'s width with fewer blocks and the real VAE
    config (its scale factor sets the token count); both without a text encoder (seeded random prompts)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    from flux_dist.models.components import DEV_TEXT_LAYERS, Components, _default_dtype, flux2_scheduler
    from flux_dist.models.full import FULL_TRANSFORMER_CONFIGS
    from flux_dist.models.presets import build_preset

    if (double, single) == (8, 48):
        return build_preset("flux2-dev", dtype=torch.bfloat16, device=DEV)
    cfg = dict(FULL_TRANSFORMER_CONFIGS["flux2-dev"], num_layers=double, num_single_layers=single)
    torch.manual_seed(0)
    with _default_dtype(torch.bfloat16), DEV:
        tr, vae = Flux2Transformer2DModel(**cfg), AutoencoderKLFlux2()
    for p in tr.parameters():
        p.data.normal_(0, 0.02)
    return Components(family="dev", transformer=tr.eval().requires_grad_(False), vae=vae.eval(),
                      scheduler=flux2_scheduler(), text_encoder=None, tokenizer=None, is_distilled=True,
                      text_layers=DEV_TEXT_LAYERS, name=f"flux2-dev-width-{double}x{single}")


def _capture(tr, kw) -> dict:
    got, hooks = {}, []

    def keep(n: str, i: tuple, o: torch.Tensor) -> None:  # returns None: a hook's return value replaces the output
        got.setdefault(n, (i[0].detach().clone(), o.detach().clone()))

    for n in PROBES:
        hooks.append(tr.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: keep(n, i, o)))
    with torch.no_grad():
        out = tr(**kw, return_dict=False)[0]
    for h in hooks:
        h.remove()
    return {"out": out, **got}


def main(out: str, quant: str, acts: str, double: int = 8, single: int = 48, folder: str = "/tmp/issue16") -> None:
    import modelopt.torch.quantization as mtq

    from flux_dist.models.flux2.calibrate import CalibRequest, calibration_loop
    from flux_dist.models.flux2.quant_plan import load_quantized, quantizable
    from flux_dist.quant import modelopt as mo

    res: dict = {"quant": quant, "activations": acts, "blocks": [double, single], "config": mo.CONFIGS[(quant, acts)],
                 "device": torch.cuda.get_device_name(DEV), "calibration": "2 requests, 1024x1024, 2 steps"}
    t0 = time.perf_counter()
    c = _model(double, single)
    tr = c.transformer
    kw = pass_inputs(DEV, 1024, 1024)
    res["build_s"] = round(time.perf_counter() - t0, 1)
    plain = _capture(tr, kw)
    planned = [n for n, _ in tr.named_modules() if quantizable(tr, n)]
    t0 = time.perf_counter()
    loop = calibration_loop(c, ["calibration one", "calibration two"],
                            CalibRequest(height=1024, width=1024, steps=2), DEV, torch.bfloat16)
    mo.calibrate(tr, planned, loop, quant, acts)
    res["calibrate_s"] = round(time.perf_counter() - t0, 1)
    ref = _capture(tr, kw)
    res["modelopt_fake_quant_pass_ms"] = time_ms(lambda t=tr: t(**kw, return_dict=False), warm=1, rep=3)
    res["modelopt_vs_bf16"] = {k: _rel(ref[k][1] if k != "out" else ref[k], plain[k][1] if k != "out" else plain[k])
                               for k in ref}
    log("modelopt vs bf16", res["modelopt_vs_bf16"])
    # ModelOpt's exporter first fuses each attention's q/k/v group (NVFP4: one amax for the group, so a
    # shared weight_scale_2 / input_scale, weights re-quantized), in place. Done here with its own functions
    # (the export repeats it, unchanged), so ``fused`` is what the export holds; ``ref`` is before.
    from modelopt.torch.export.unified_export_hf import _fuse_shared_input_modules, collect_shared_input_modules

    with torch.no_grad():
        shared, _ = collect_shared_input_modules(tr, lambda t=tr: t(**kw, return_dict=False))
        _fuse_shared_input_modules(tr, shared, qkv_only=True)
    fused = _capture(tr, kw)
    res["modelopt_qkv_fused_vs_fake_quant"] = {k: _rel(fused[k][1] if k != "out" else fused[k],
                                                       ref[k][1] if k != "out" else ref[k]) for k in ref}
    log("modelopt after the export's q/k/v fusion vs before", res["modelopt_qkv_fused_vs_fake_quant"])
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    mo.export(tr, folder, acts)
    res["export_s"] = round(time.perf_counter() - t0, 1)
    res["export_gb"] = round(sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 1e9, 2)
    del tr, c, loop
    gc.collect()
    torch.cuda.empty_cache()
    q, mode = load_quantized(folder, DEV)
    res["flux_dist_mode"] = mode
    mine = _capture(q, kw)
    res["flux_dist_pass_ms"] = time_ms(lambda: q(**kw, return_dict=False), warm=1, rep=3)
    res["flux_dist_vs_modelopt"] = {"out": _rel(mine["out"], ref["out"])}
    res["flux_dist_vs_modelopt_export"] = {"out": _rel(mine["out"], fused["out"])}
    for n in PROBES:  # each linear on ModelOpt's captured input: a layout error cannot hide in the pass
        with torch.no_grad():
            res["flux_dist_vs_modelopt"][n] = _rel(q.get_submodule(n)(ref[n][0]), ref[n][1])
            res["flux_dist_vs_modelopt_export"][n] = _rel(q.get_submodule(n)(fused[n][0]), fused[n][1])
    log("flux-dist vs modelopt after its export's fusion", res["flux_dist_vs_modelopt_export"])
    res["peak_gib"] = round(torch.cuda.max_memory_allocated(DEV) / 2**30, 1)
    log("flux-dist vs modelopt", res["flux_dist_vs_modelopt"])
    shutil.rmtree(folder, ignore_errors=True)
    del mtq
    write_json(out, res)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], *(int(x) for x in a[3:5]), *a[5:6])
