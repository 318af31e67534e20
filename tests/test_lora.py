"""LoRA adapters made with peft on the tiny FLUX.2 transformers and saved by diffusers: flux-dist's image equals
diffusers' (``load_lora_weights`` + ``set_adapters``) in 1 process and every layout, switching adapters between
requests changes data only (no recompile), and bad files / names / scales are clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from diffusers import Flux2Pipeline, Flux2Transformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from flux_dist.config import RequestConfig, RunConfig, add_lora_specs, load_config, parse_lora_spec
from flux_dist.engine import Engine
from flux_dist.errors import FluxDistError, NotSupportedError
from flux_dist.lora import LoraLinear
from flux_dist.models.flux2 import pipeline as flux2_pipeline
from flux_dist.models.presets import build_preset, to_diffusers_pipeline
from flux_dist.validation import check_lora

from dist_utils import run_distributed

REL = 1e-5
EVEN = dict(height=128, width=128, max_sequence_length=16)
UNEVEN = dict(height=80, width=48, max_sequence_length=13)
# one adapter; two at different scales (one negative); none after them; the first again
REQS = [{"a": 1.0}, {"a": 0.7, "b": -0.4}, {}, {"a": 1.0}]
MODELS = ("flux2-tiny", "flux2-klein-tiny")


def make_lora(model: str, path: Path, rank: int, alpha: float, seed: int, rank_pattern=None, alpha_pattern=None,
              extra: tuple[str, ...] = ()) -> Path:
    """A peft LoRA on every attention and MLP linear of the blocks (``extra``: more modules), seeded weights,
    saved by diffusers' ``save_lora_weights`` with its LoraConfig as metadata."""
    cfg = build_preset(model).transformer.config
    tr = Flux2Transformer2DModel.from_config(cfg)
    targets = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in n] + list(extra)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, rank_pattern=rank_pattern or {},
                        alpha_pattern=alpha_pattern or {}, init_lora_weights=False)
    tr.add_adapter(config, adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    for name, p in tr.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    layers = get_peft_model_state_dict(tr, adapter_name="x")
    Flux2Pipeline.save_lora_weights(path.parent, transformer_lora_layers=layers,
                                    transformer_lora_adapter_metadata=config.to_dict(), weight_name=path.name)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per model: adapter ``a`` (rank 4, alpha 8, rank 6 on one linear: padding) and ``b`` (rank 3, an alpha
    pattern, also on the embedders and the head: linears outside the blocks)."""
    d = tmp_path_factory.mktemp("loras")
    out = {}
    for model in MODELS:
        a = make_lora(model, d / f"{model}-a.safetensors", 4, 8, 1, rank_pattern={"transformer_blocks.0.attn.to_k": 6})
        b = make_lora(model, d / f"{model}-b.safetensors", 3, 3, 2, alpha_pattern={"ff.linear_in": 5},
                      extra=("x_embedder", "proj_out"))
        out[model] = {"a": str(a), "b": str(b)}
    return out


def make_cfg(model: str, lora: dict[str, str], ulysses=1, ring=1, cfg=1, quant="none", **req) -> RunConfig:
    c = load_config(None, {"model.model": model, "model.quant": quant, "parallel.ulysses": ulysses,
                           "parallel.ring": ring, "parallel.cfg_parallel": cfg})
    c.model.lora = dict(lora)
    c.request = dataclasses.replace(c.request, prompt="a red fox in the snow", steps=3, guidance=4.0, seed=7, **req)
    return c


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_requests(eng: Engine, reqs=REQS, decode=False):
    return [eng.generate(dataclasses.replace(eng.cfg.request, lora=r), decode=decode) for r in reqs]


_REFS: dict = {}


def reference(model: str, lora: dict, shape: dict, quant: str = "none") -> list[torch.Tensor]:
    key = (model, quant, tuple(shape.items()))
    if key not in _REFS:
        _REFS[key] = [r.latents for r in run_requests(Engine(make_cfg(model, lora, quant=quant, **shape)))]
    return _REFS[key]


@pytest.mark.parametrize("model", MODELS)
def test_one_process_equals_diffusers(model, loras):
    """One adapter, two at different scales, none, the first again: each equals diffusers' pipeline with the
    same adapters set (latents 1e-5, pixels 1/255); none equals the model without adapters, bit for bit."""
    eng = Engine(make_cfg(model, loras[model], **EVEN))
    ours = run_requests(eng, decode=True)
    # the double block's 8 (q/k/v fused per stream), 2 per single block, x_embedder and proj_out
    assert eng.lora.wrapped == 8 + 2 * len(eng.model.tr.single_transformer_blocks) + 2
    req = eng.cfg.request
    pipe = to_diffusers_pipeline(build_preset(model))
    for name, path in loras[model].items():
        pipe.load_lora_weights(path, adapter_name=name)
    kw = dict(prompt=req.prompt, height=req.height, width=req.width, num_inference_steps=req.steps,
              guidance_scale=req.guidance, max_sequence_length=req.max_sequence_length)
    base = Engine(make_cfg(model, {}, **EVEN)).generate(req, decode=False).latents
    for chosen, res in zip(REQS, ours, strict=True):
        if not chosen:
            assert torch.equal(res.latents, base)  # no adapter: exactly the base model's image
            continue
        pipe.set_adapters(list(chosen), list(chosen.values()))
        lat = pipe(**kw, generator=torch.Generator("cpu").manual_seed(req.seed), output_type="latent").images
        mine = res.latents
        if lat.ndim == 4:  # Flux2KleinPipeline returns the VAE's input for output_type="latent"
            mine = flux2_pipeline.vae_latents(eng.c, res.latents, eng.model.noise(req.height, req.width, req.seed,
                                                                                  torch.float32)[1])
        assert rel(mine, lat) < REL, chosen
        img = pipe(**kw, generator=torch.Generator("cpu").manual_seed(req.seed), output_type="np").images[0]
        assert np.abs(np.asarray(res.image, dtype=np.float64) / 255.0 - img).max() <= 1 / 255 + 1e-6, chosen
        assert rel(res.latents, base) > 1e-2  # the adapter does change the image
    assert torch.equal(ours[0].latents, ours[3].latents)  # switching away and back: the same image
    assert ours[1].metrics["request"]["lora"] == REQS[1]


def _layouts(rank: int, world: int, jobs, loras):
    out = []
    for model, u, r, c, quant, shape in jobs:
        eng = Engine(make_cfg(model, loras[model], ulysses=u, ring=r, cfg=c, quant=quant, **shape))
        out.append([res.latents for res in run_requests(eng)])
    return out


def _check(results, jobs, loras):
    for rank_out in results:
        for lats, (model, u, r, c, quant, shape) in zip(rank_out, jobs, strict=True):
            for got, want, chosen in zip(lats, reference(model, loras[model], shape, quant), REQS, strict=True):
                assert rel(got, want) < REL, (model, u, r, c, quant, chosen, rel(got, want))
    for rank_out in results[1:]:  # every rank ends with the same latents
        for a, b in zip(rank_out, results[0], strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# Ulysses splits the single blocks' fused projection (rows) and to_out (columns); FP8 fuses q/k/v and splits
# to_out in every layout: each takes its slices of the adapter (the base weights stay quantized).
JOBS_2 = [("flux2-tiny", 2, 1, 1, "none", EVEN), ("flux2-tiny", 1, 2, 1, "none", UNEVEN),
          ("flux2-klein-tiny", 1, 1, 2, "none", EVEN), ("flux2-tiny", 2, 1, 1, "fp8-emulate", EVEN),
          ("flux2-tiny", 2, 1, 1, "nvfp4-emulate", EVEN)]  # NVFP4: q/k/v stay apart (no fusion)
JOBS_4 = [("flux2-tiny", 2, 2, 1, "none", EVEN), ("flux2-klein-tiny", 2, 1, 2, "none", EVEN)]


@pytest.mark.parametrize("world,jobs", [(2, JOBS_2), (4, JOBS_4)], ids=["world2", "world4"])
def test_layouts_equal_one_process(world, jobs, loras):
    _check(run_distributed(_layouts, world, jobs, loras, timeout=600), jobs, loras)


def test_compiled_switching_never_recompiles(loras):
    """Compiled blocks and step regions: the first request compiles, then switching adapters, scales and none
    recompiles nothing (data, not code) and each request gives the eager image."""
    lora = loras["flux2-tiny"]
    reqs = [{"a": 1.0}, {}, {"b": 0.5}, {"a": 0.7, "b": -0.4}, {"a": 1.0}]
    shape = dict(height=64, width=64, max_sequence_length=16)
    want = run_requests(Engine(make_cfg("flux2-tiny", lora, **shape)), reqs)
    cfg = make_cfg("flux2-tiny", lora, **shape)
    cfg.model = dataclasses.replace(cfg.model, compile=True, compile_backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    eng = Engine(cfg)
    got = run_requests(eng, reqs[:1])
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got += run_requests(eng, reqs[1:])
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]
    assert any(isinstance(m, LoraLinear) for m in eng.model.tr.modules())
    for g, w, chosen in zip(got, want, reqs, strict=True):
        assert rel(g.latents, w.latents) < REL, chosen
    assert torch.equal(got[0].latents, got[4].latents)


def test_bad_adapter_files(tmp_path, loras):
    """Each refused before anything is swapped, with a message naming the adapter and what is wrong."""
    eng = Engine(make_cfg("flux2-tiny", {}, **EVEN))
    good = load_file(loras["flux2-tiny"]["a"])

    def refused(sd: dict | str, match: str, kind=FluxDistError):
        path = tmp_path / "bad.safetensors"
        if isinstance(sd, str):
            path.write_text(sd)
        else:
            save_file(sd, str(path))
        with pytest.raises(kind, match=match):
            eng.model.load_lora({"bad": str(path)}, torch.float32)

    with pytest.raises(FluxDistError, match="'gone': file not found"):
        eng.model.load_lora({"gone": str(tmp_path / "nope.safetensors")}, torch.float32)
    refused("not a safetensors file", "cannot read .* as a FLUX.2 LoRA")
    moved = {k.replace("transformer.transformer_blocks.0.", "transformer.transformer_blocks.7."): v
             for k, v in good.items()}
    refused(moved, "targets module 'transformer_blocks.7.attn.[a-z_]+', which this model does not have")
    key = "transformer.transformer_blocks.0.ff.linear_in.lora_A.weight"
    refused({**good, key: good[key][:, :-8].contiguous()}, "does not fit module 'transformer_blocks.0.ff.linear_in'")
    refused({"transformer.blocks.0.lokr_w1": torch.zeros(2, 2)}, "LoKr adapter", NotSupportedError)
    refused({"text_encoder.layers.0.q.lora_A.weight": torch.zeros(2, 4)}, "outside the FLUX.2 transformer")
    bias = "transformer.transformer_blocks.0.ff.linear_in.lora_B.bias"
    refused({**good, bias: torch.zeros(good[key.replace("lora_A", "lora_B")].shape[0])}, "LoRA biases",
            NotSupportedError)
    assert not any(isinstance(m, LoraLinear) for m in eng.model.tr.modules())


def test_other_layouts_read_by_diffusers_converters(tmp_path, loras):
    """ai-toolkit (``diffusion_model.``) and peft (``base_model.model.``) key layouts, no metadata (alpha = r):
    diffusers' ``lora_state_dict`` converts them, and the same A / B come out at scaling 1."""
    from flux_dist.models.flux2.lora import read_adapter

    want, _ = read_adapter("a", loras["flux2-tiny"]["a"])
    sd = load_file(loras["flux2-tiny"]["a"])
    for prefix in ("diffusion_model.", "base_model.model."):
        path = tmp_path / f"{prefix.split('.')[0]}.safetensors"
        save_file({prefix + k.removeprefix("transformer."): v for k, v in sd.items()}, str(path))
        got, info = read_adapter("x", str(path))
        assert got.keys() == want.keys() and info["modules"] == len(want)
        for k, w in want.items():
            assert torch.equal(got[k].a, w.a) and torch.equal(got[k].b, w.b) and got[k].scaling == 1.0, (prefix, k)


def test_bad_request_names_and_scales(loras):
    eng = Engine(make_cfg("flux2-tiny", {"a": loras["flux2-tiny"]["a"]}, **EVEN))
    for chosen, match in [({"zzz": 1.0}, "unknown LoRA adapter 'zzz' \\(loaded: a\\)"), ({"a": math.nan}, "scale"),
                          ({"a": "1"}, "scale"), ({"a": True}, "scale"), ({"a": 11.0}, "scale"),
                          ([1.0], "must be an object")]:
        with pytest.raises(FluxDistError, match=match):
            eng.generate(dataclasses.replace(eng.cfg.request, lora=chosen))
    with pytest.raises(FluxDistError, match="none was loaded at start"):
        check_lora({"a": 1.0}, ())
    check_lora({"a": -2.5}, ("a",))
    with pytest.raises(FluxDistError, match="unknown LoRA adapter 'b'"):  # the default request names an adapter
        Engine(dataclasses.replace(make_cfg("flux2-tiny", {}), request=RequestConfig(lora={"b": 1.0})))


def test_lora_specs():
    assert parse_lora_spec("/x/style.safetensors") == ("style", "/x/style.safetensors", 1.0)
    assert parse_lora_spec("/x/style.safetensors:0.8") == ("style", "/x/style.safetensors", 0.8)
    assert parse_lora_spec("ink=/x/a.safetensors:-0.5") == ("ink", "/x/a.safetensors", -0.5)
    assert parse_lora_spec("/x/dir/") == ("dir", "/x/dir/", 1.0)
    with pytest.raises(FluxDistError, match="is not a number"):
        parse_lora_spec("/x/a.safetensors:strong")
    cfg = RunConfig()
    add_lora_specs(cfg, ["/x/a.safetensors", "b=/y/a.safetensors:0.25"])
    assert cfg.model.lora == {"a": "/x/a.safetensors", "b": "/y/a.safetensors"}
    assert cfg.request.lora == {"a": 1.0, "b": 0.25}
    with pytest.raises(FluxDistError, match="given twice"):
        add_lora_specs(cfg, ["/z/a.safetensors"])


def test_cli_flags_and_batch_lines(tmp_path, loras):
    """``generate --lora NAME=PATH[:SCALE] --prompts-file x.jsonl``: lines pick adapters by name (or take the
    flags' default), an unknown name skips its line; each image is the engine's for that choice."""
    from flux_dist.batch import run_batch
    from flux_dist.cli import build_parser, config_from_args

    lora = loras["flux2-tiny"]
    lines = [{"prompt": "a red fox in the snow", "seed": 7},  # the flags' default: a at 0.5
             {"prompt": "a red fox in the snow", "seed": 7, "lora": {"b": 0.3}},
             {"prompt": "a red fox in the snow", "seed": 7, "lora": {}},
             {"prompt": "a red fox in the snow", "seed": 7, "lora": {"c": 1}},
             {"prompt": "a red fox in the snow", "seed": 7, "lora": "a"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in lines))
    args = build_parser().parse_args(["generate", "--model", "flux2-tiny", "--height", "64", "--width", "64",
                                      "--steps", "2", "--max-sequence-length", "16", "--lora", f"a={lora['a']}:0.5",
                                      "--lora", f"b={lora['b']}:0"])
    cfg = config_from_args(args)
    assert cfg.model.lora == lora and cfg.request.lora == {"a": 0.5, "b": 0.0}
    eng = Engine(cfg)
    assert run_batch(cfg, eng, str(prompts), str(tmp_path / "out")) == 3  # two lines skipped
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [i["lora"] for i in m["images"]] == [{"a": 0.5, "b": 0.0}, {"b": 0.3}, {}]
    assert "unknown LoRA adapter 'c'" in m["errors"][0]["error"] and "must be an object" in m["errors"][1]["error"]
    for item in m["images"]:
        want = eng.generate(dataclasses.replace(cfg.request, prompt=lines[0]["prompt"], seed=7, lora=item["lora"]))
        got = np.asarray(Image.open(tmp_path / "out" / item["file"]))
        assert np.array_equal(got, np.asarray(want.image))


def test_server_switches_adapters_per_request(tmp_path, loras):
    """A torchrun server (2 ranks, Ulysses 2) with two adapters preloaded: each request (a, a+b, none) gets the
    image a fresh one-process engine gives; unknown names and bad scales are 400s; /v1/models lists them."""
    import base64
    import io

    from server_utils import SMALL, Server, call

    paths = loras["flux2-tiny"]
    s = Server(["--config", "configs/tiny.yaml", *SMALL, "--lora", f"a={paths['a']}", "--lora", f"b={paths['b']}"],
               log_path=tmp_path / "server.log")
    try:
        s.wait_ready()
        status, _, body = call(s.port, "GET", "/v1/models")
        adapters = json.loads(body)["data"][0]["lora"]
        assert status == 200 and [a["name"] for a in adapters] == ["a", "b"]
        assert all("path" not in a for a in adapters)
        got = []
        for sel in ({"a": 1.0}, {"a": 0.7, "b": -0.4}, {}):
            status, _, body = call(s.port, "POST", "/v1/images/generations",
                                   {"prompt": "a red fox", "seed": 5, "size": "64x64", "lora": sel},
                                   headers={"Content-Type": "application/json"})
            assert status == 200, body
            png = base64.b64decode(json.loads(body)["data"][0]["b64_json"])
            got.append(np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16))
        for sel, bad in (({"zzz": 1.0}, "zzz"), ({"a": "x"}, "a"), ({"a": 1e9}, "a")):
            status, _, body = call(s.port, "POST", "/v1/images/generations",
                                   {"prompt": "a red fox", "size": "64x64", "lora": sel},
                                   headers={"Content-Type": "application/json"})
            assert status == 400 and bad in body.decode(), (sel, status, body)
    finally:
        s.stop()
    cfg = make_cfg("flux2-tiny", paths, height=64, width=64, max_sequence_length=16)
    cfg.request = dataclasses.replace(cfg.request, prompt="a red fox", seed=5, steps=2)
    eng = Engine(cfg)
    for img, sel in zip(got, ({"a": 1.0}, {"a": 0.7, "b": -0.4}, {}), strict=True):
        fresh = np.asarray(eng.generate(dataclasses.replace(cfg.request, lora=sel)).image, dtype=np.int16)
        assert np.abs(img - fresh).max() <= 1, sel
    assert np.abs(got[0] - got[2]).max() > 1  # the adapter changed the image


def _fused_bank(impl: str):
    """A q|k|v linear fused from three 16 -> 8 sources, two adapters of ranks 4 and 3 on different pieces (``B``
    block diagonal over the pieces), and a 16 -> 2x8 linear feeding a SwiGLU."""
    from flux_dist.lora import LoraWeights, Piece, attach

    g = torch.Generator().manual_seed(3)
    root = torch.nn.Module()
    root.qkv, root.mlp = torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(16, 16, bias=False)
    for lin in (root.qkv, root.mlp):
        lin.weight.data = torch.randn(lin.weight.shape, generator=g)

    def w(r, n_in, n_out, s):
        return LoraWeights(torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g), s)

    adapters = {"a": {"q": w(4, 16, 8, 0.5), "v": w(4, 16, 8, 0.5), "mlp": w(4, 16, 16, 0.5)},
                "b": {"k": w(3, 16, 8, 2.0), "q": w(3, 16, 8, 2.0)}}
    targets = {"qkv": [Piece("q", 8), Piece("k", 8), Piece("v", 8)], "mlp": [Piece("mlp", 16)]}
    shapes = {"q": (16, 8), "k": (16, 8), "v": (16, 8), "mlp": (16, 16)}
    bank = attach(root, adapters, targets, shapes, torch.float32, torch.device("cpu"), impl=impl)
    return root, bank, adapters


def test_bank_in_place_and_swiglu_paths_equal_the_first_bank():
    """The in-place delta and the SwiGLU-fused delta give the first bank's numbers (and the per-piece sum written out
    by hand); no adapter selected gives the base linear's output bit for bit; compiled with inductor, the delta is
    added in place into the base GEMM's buffer and new scales recompile nothing."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    old, old_bank, adapters = _fused_bank("v1")
    new, new_bank, _ = _fused_bank("inplace")
    for sel in ({"a": 1.0}, {"a": 0.7, "b": -0.4}):
        old_bank.select(sel)
        new_bank.select(sel)
        with torch.no_grad():
            want = old.qkv.base(x) + torch.cat([sum(sel.get(n, 0.0) * ad[p].scaling * (x @ ad[p].a.T @ ad[p].b.T)
                                                    for n, ad in adapters.items() if p in ad) for p in "qkv"], -1)
            assert torch.allclose(new.qkv(x), want, atol=1e-5) and torch.allclose(old.qkv(x), want, atol=1e-5)
            g, u = old.mlp(x).chunk(2, -1)
            assert torch.allclose(new.mlp.swiglu(*new.mlp.parts(x)), F.silu(g) * u, atol=1e-6)
            y, h = new.qkv.parts(x)  # the fused single-block projection: q/k/v columns in place, the rest in a SwiGLU
            mix = new.qkv.swiglu(new.qkv.add_(y, h, 0, 8), h, 8)
            g, u = old.qkv(x)[..., 8:].chunk(2, -1)
            assert torch.allclose(mix, F.silu(g) * u, atol=1e-5)
            assert torch.allclose(y[..., :8], want[..., :8], atol=1e-5)
    new_bank.select({})
    with torch.no_grad():
        assert torch.equal(new.qkv(x), new.qkv.base(x))
    new_bank.select({"a": 1.0})
    torch._dynamo.reset()
    fn = torch.compile(new.qkv, backend="inductor", fullgraph=True, dynamic=False)
    with torch.no_grad():
        got, (code,) = run_and_get_code(fn, x)
        assert torch.allclose(got, new.qkv(x), atol=1e-6)
        assert "flux_dist.lora_addmm_" in code and "clone" not in code and "copy_" not in code, code
        counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for sel in ({}, {"b": 0.5}, {"a": 0.3, "b": 1.0}):
                new_bank.select(sel)
                assert torch.allclose(fn(x), new.qkv(x), atol=1e-6)
        assert not counters["recompiles"]


def test_swiglu_kernel_in_the_triton_interpreter():
    """The CUDA kernel of the SwiGLU-fused delta, run by Triton's CPU interpreter: odd sizes (masks), a column offset
    into a wider output, a bank wider than one rank chunk (300 > 256); float16 values rounded where the unfused path
    rounds them (the interpreter truncates to bfloat16, so bfloat16 is not compared here)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = """
import torch
from flux_dist.lora.kernels import swiglu_lora
torch.manual_seed(0)
for dt in (torch.float32, torch.float16):
    for M, F, R, col, extra in ((70, 40, 6, 0, 0), (130, 72, 80, 24, 8), (33, 20, 300, 4, 0)):
        y, h = torch.randn(M, col + 2 * F + extra).to(dt), torch.randn(M, R).to(dt)
        b = (torch.randn(2 * F, R) * 0.3).to(dt)
        g, u = torch.addmm(y.float()[:, col:col + 2 * F], h.float(), b.float().t()).to(dt).float().chunk(2, -1)
        want = (torch.nn.functional.silu(g) * u).to(dt).float()
        got = swiglu_lora(y, h, b, col, dot_f32=True).float()
        assert ((got - want).abs() <= 2e-5 + 1e-3 * want.abs()).all(), (dt, M, F, R, (got - want).abs().max())
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
