"""Issue 11 on one GPU: the FLUX.2 text encoders at full size (random bf16 weights).

  python3 bench/text_encoder_bench.py encoder OUT.json            # [dev] whole vs cut: memory, 512-token encode,
                                                                  # bit-identity; FP8 encoder error and time
  python3 bench/text_encoder_bench.py load OUT.json DIR           # full-size [klein] 4B transformer saved bf16 to
                                                                  # DIR, loaded back bf16 -> FP8 block by block
  python3 bench/text_encoder_bench.py pipeline OUT.json CAP_GIB STEPS,... [PLACEMENT]
                                                                  # the engine, [dev] + real encoder, --quant fp8,
                                                                  # 1024x1024, under a memory cap (0 = none);
                                                                  # needs the engine wiring of PromptEncoder
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import log, time_ms  # noqa: E402

DEV = torch.device("cuda", 0)
BF16 = torch.bfloat16
PROMPT = ("a photo of a lighthouse on a rocky coast under a stormy sky, waves crashing, golden hour light, "
          "35mm photograph, detailed, cinematic")


def gib(n: int) -> float:
    return round(n / 2**30, 3)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def encoder(out: str) -> None:
    from flux_dist.models import text_encoder as te
    from flux_dist.models.presets import _seed
    from flux_dist.parallel.text_encoder import module_bytes

    res: dict = {"device": torch.cuda.get_device_name(DEV), "max_len": 512}
    spec = te.spec_for_preset("flux2-dev", 0)
    tok = te.build_tokenizer(spec.kind, spec.config)
    fn = te.flux2_encode_fn("dev", spec.hidden_layers)
    seed = _seed(0, te._TEXT_SEED)

    # whole Mistral3ForConditionalGeneration (HF init on the GPU), its decoder redrawn as the cut one is
    torch.cuda.reset_peak_memory_stats(DEV)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(BF16)
    with DEV:
        from transformers import Mistral3ForConditionalGeneration

        whole = Mistral3ForConditionalGeneration(spec.config).eval().requires_grad_(False)
    torch.set_default_dtype(prev)
    te.materialize_(te.decoder_of(whole)[0], te.RandomWeights(seed), DEV, BF16)
    res["whole"] = {"params_b": round(te.param_count(whole) / 1e9, 3), "gib": gib(module_bytes(whole))}
    with torch.inference_mode():
        ref = fn(whole, tok, PROMPT, DEV, 512)
        res["whole"]["encode"] = time_ms(lambda m=whole: fn(m, tok, PROMPT, DEV, 512))
    res["whole"]["peak_gib"] = gib(torch.cuda.max_memory_allocated(DEV))
    log("whole", res["whole"])
    del whole
    torch.cuda.empty_cache()

    for quant in ("none", "fp8"):
        torch.cuda.reset_peak_memory_stats(DEV)
        t0 = time.perf_counter()
        pe = te.build_prompt_encoder("flux2-dev", "dev", placement="every", device=DEV, dtype=BF16, rank=0, world=1,
                                     tokenizer=tok, quant=quant)
        build_s = time.perf_counter() - t0
        with torch.inference_mode():
            enc = pe.encoder
            emb = fn(enc, tok, PROMPT, DEV, 512)
            per_layer = [rel(a, b) for a, b in zip(emb.chunk(3, -1), ref.chunk(3, -1), strict=True)]
            r = {"build_s": round(build_s, 2), "params_b": round(te.param_count(enc) / 1e9, 3),
                 "gib": gib(pe.text_encoder_bytes), "encode": time_ms(lambda m=enc: fn(m, tok, PROMPT, DEV, 512)),
                 "peak_gib": gib(torch.cuda.max_memory_allocated(DEV)),
                 "bit_identical_to_whole": bool(torch.equal(emb, ref)), "rel_err_vs_whole": rel(emb, ref),
                 "rel_err_per_layer_10_20_30": per_layer}
        res[f"cut_{quant}"] = r
        log(f"cut {quant}", r)
        del pe, enc
        torch.cuda.empty_cache()
    # shard at full size: per-rank bytes from the parameter split (embeddings + norms replicated)
    shell = te.build_shell(spec.kind, spec.config, spec.hidden_layers, BF16)
    repl = sum(p.numel() for n, p in shell.named_parameters() if "_proj." not in n) * 2
    split = sum(p.numel() for n, p in shell.named_parameters() if "_proj." in n) * 2
    res["shard_gib_per_rank_computed"] = {w: gib(repl + split // w) for w in (1, 2, 4, 8)}
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


def load(out: str, folder: str) -> None:
    from diffusers import Flux2Transformer2DModel

    from flux_dist.models.flux2 import quantize_transformer
    from flux_dist.models.lowmem_load import load_transformer_streaming
    from flux_dist.models.presets import build_preset

    res: dict = {"device": torch.cuda.get_device_name(DEV), "model": "flux2-klein-4b transformer"}
    c = build_preset("flux2-klein-4b", dtype=BF16, device=DEV, seed=0)
    t0 = time.perf_counter()
    c.transformer.save_pretrained(os.path.join(folder, "transformer"), safe_serialization=True)
    res["save_s"] = round(time.perf_counter() - t0, 2)
    del c
    torch.cuda.empty_cache()
    os.system("sync")
    for way in ("streaming_fp8", "from_pretrained_then_fp8"):
        torch.cuda.reset_peak_memory_stats(DEV)
        t0 = time.perf_counter()
        if way == "streaming_fp8":
            tr = load_transformer_streaming(os.path.join(folder, "transformer"), dtype=BF16, device=DEV, quant="fp8")
        else:
            tr = Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=BF16,
                                                         local_files_only=True, device_map=str(DEV))
            quantize_transformer(tr, "fp8")
        torch.cuda.synchronize(DEV)
        res[way] = {"load_s": round(time.perf_counter() - t0, 2), "peak_gib": gib(torch.cuda.max_memory_allocated(DEV)),
                    "resident_gib": gib(torch.cuda.memory_allocated(DEV))}
        log(way, res[way])
        del tr
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


def pipeline(out: str, cap_gib: float, steps_list: str, placement: str = "every") -> None:
    import dataclasses

    from flux_dist import Engine, load_config

    if cap_gib > 0:
        total = torch.cuda.get_device_properties(DEV).total_memory
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, DEV)
    cfg = load_config(None, {"model.model": "flux2-dev", "model.dtype": "bfloat16", "model.device": "cuda",
                             "model.quant": "fp8", "model.text_encoder": "auto",
                             "model.text_encoder_placement": placement})
    t0 = time.perf_counter()
    eng = Engine(cfg)
    load_s = time.perf_counter() - t0
    res: dict = {"device": torch.cuda.get_device_name(DEV), "cap_gib": cap_gib, "load_s": round(load_s, 2),
                 "after_load_gib": gib(torch.cuda.memory_allocated(DEV))}
    for steps in (int(s) for s in steps_list.split(",")):  # one engine, one request per step count
        req = dataclasses.replace(cfg.request, prompt=PROMPT, height=1024, width=1024, steps=steps, guidance=4.0,
                                  max_sequence_length=512)
        torch.cuda.reset_peak_memory_stats(DEV)
        r = eng.generate(req)
        res[f"steps_{steps}"] = r.metrics
        log(json.dumps({k: v for k, v in r.metrics.items() if k != "step_ms"}))
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "encoder":
        encoder(sys.argv[2])
    elif what == "load":
        load(sys.argv[2], sys.argv[3])
    elif what == "pipeline":
        pipeline(sys.argv[2], float(sys.argv[3]), sys.argv[4], *(sys.argv[5:6]))
    else:
        raise SystemExit(__doc__)
