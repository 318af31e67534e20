"""NVIDIA ModelOpt itself in the loop (nvidia-modelopt 0.47, the `test` extra installs it).

`flux-dist quantize --calibrate` runs ModelOpt's own `mtq.quantize` (FP8 configs, fake quantization on
CPU) through flux-dist's denoise loop and ModelOpt's own Hugging Face exporter; flux-dist then loads what
ModelOpt wrote and must give ModelOpt's fake-quantized transformer output on the same inputs. The
reference is the calibrated ModelOpt model itself, copied just before its exporter runs.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_dist.cli import build_parser
from flux_dist.config import load_config
from flux_dist.engine import Engine
from flux_dist.errors import FluxDistError
from flux_dist.models.flux2 import load_quantized
from flux_dist.models.presets import save_preset
from flux_dist.quant import QuantLinear
from flux_dist.quant import modelopt as mo

from dist_utils import run_distributed

mtq = pytest.importorskip("modelopt.torch.quantization")
CPU = torch.device("cpu")
CALIB = ["--calib-height", "64", "--calib-width", "64", "--calib-steps", "2", "--calib-max-seq-len", "16"]


def _quantize(args: list[str]) -> int:
    a = build_parser().parse_args(["quantize", *args])
    return a.func(a)


@pytest.fixture(scope="module", params=["static", "dynamic"])
def export(request, tmp_path_factory):
    """(model dir, ModelOpt's calibrated fake-quant transformer, activations), via the CLI."""
    acts = request.param
    d = tmp_path_factory.mktemp(f"mo-{acts}")
    prompts = d / "prompts.txt"
    prompts.write_text("a red fox in the snow\na lighthouse at dusk\n")
    seen = {}
    real = mo.export

    def keep_reference(module, folder, activations):
        seen["ref"] = copy.deepcopy(module)  # ModelOpt's fake-quant model as calibrated, before export
        real(module, folder, activations)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mo, "export", keep_reference)
        assert _quantize(["flux2-tiny", str(d / "model"), "--calibrate", str(prompts), "--quant", "fp8",
                          "--activations", acts, "--dtype", "float32", "--device", "cpu", *CALIB]) == 0
    return d / "model", seen["ref"].eval(), acts


def _inputs(cfg, n_img=48, n_txt=13):
    g = torch.Generator().manual_seed(7)
    img_ids = torch.zeros(n_img, 4)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(n_img) // 8, torch.arange(n_img) % 8
    txt_ids = torch.zeros(n_txt, 4)
    txt_ids[:, 3] = torch.arange(n_txt)
    return dict(hidden_states=torch.randn(1, n_img, cfg.in_channels, generator=g) * 1.5,
                encoder_hidden_states=torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g),
                timestep=torch.tensor([0.7]), img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([4.0]),
                return_dict=False)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_modelopt_export_matches_modelopt_fake_quant(export):
    """What ModelOpt exported, loaded by flux-dist, computes what ModelOpt's fake quantization computes."""
    d, ref, acts = export
    tdir = d / "transformer"
    qc = json.loads((tdir / "config.json").read_text())["quantization_config"]
    sd = load_file(str(tdir / "diffusion_pytorch_model.safetensors"))
    lin = "transformer_blocks.0.attn.to_q"
    # what ModelOpt wrote (not what we expect it to write): the layouts the loader must map
    assert qc["quant_method"] == "modelopt" and qc["producer"]["name"] == "modelopt"
    if acts == "static":  # FP8_DEFAULT_CFG: per-tensor weight scale, calibrated per-tensor input_scale
        assert qc["quant_algo"] == "FP8" and sd[f"{lin}.weight_scale"].shape == ()
        assert sd[f"{lin}.input_scale"].shape == ()
    else:  # FP8_PER_CHANNEL_PER_TOKEN_CFG: per-channel weight scale, no input_scale
        assert qc["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN" and sd[f"{lin}.weight_scale"].ndim == 1
        assert not any(k.endswith(".input_scale") for k in sd)
    assert "x_embedder" in qc["ignore"] and "proj_out" in qc["ignore"]  # NVIDIA's high-precision layers

    tr, mode = load_quantized(str(tdir), CPU)
    assert mode == "fp8-emulate"
    n = sum(isinstance(m, QuantLinear) for m in tr.modules())
    assert n == sum(k.endswith(".weight_scale") for k in sd) > 0
    assert all((m.input_scale is not None) == (acts == "static") for m in tr.modules() if isinstance(m, QuantLinear))
    kw = _inputs(tr.config)
    with torch.no_grad():
        want = ref(**kw)[0]
        got = tr(**kw)[0]
        err = _rel(got, want)
        assert err < 1e-3, err  # the formats' rounding (x / s vs x * (1 / s) before the E4M3 cast)
        mtq.disable_quantizer(ref, "*")
        plain = ref(**kw)[0]
    gap = _rel(want, plain)
    assert gap > 30 * err, (gap, err)  # quantization is real, and far above the agreement
    if acts == "static":  # a loader that ignored input_scale (per-token scales instead) is caught
        for m in tr.modules():
            if isinstance(m, QuantLinear):
                m.input_scale = None
        with torch.no_grad():
            assert _rel(tr(**kw)[0], want) > 10 * max(err, 1e-4)


def _cfg(model, u=1, r=1):
    c = load_config(None, {"model.model": str(model), "parallel.ulysses": u, "parallel.ring": r})
    c.request = dataclasses.replace(c.request, prompt="a fox", height=80, width=48, steps=2, max_sequence_length=13)
    return c


def _layouts(rank, world, model, layouts):
    out = []
    for u, r in layouts:
        eng = Engine(_cfg(model, u, r))
        out.append(eng.generate(eng.cfg.request, decode=False).latents)
    return out


def test_modelopt_export_every_layout_equals_one_process(export):
    d, _, acts = export
    if acts != "static":
        pytest.skip("one export is enough for the layouts (static: the new input_scale path)")
    eng = Engine(_cfg(d))
    assert eng.activations == "static"
    res = eng.generate(eng.cfg.request, decode=False)
    assert res.metrics["quant_activations"] == "static" and res.metrics["quant"] == "fp8-emulate"
    ref = res.latents
    for rank_out in run_distributed(_layouts, 2, str(d), [(2, 1), (1, 2)]):
        for lat in rank_out:
            assert _rel(lat, ref) < 1e-5


def test_calibrate_without_modelopt_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_modelopt(name, *a, **k):
        if name == "modelopt" or name.startswith("modelopt."):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_modelopt)
    (tmp_path / "p.txt").write_text("a fox\n")
    with pytest.raises(FluxDistError, match=r"pip install 'flux-dist\[quant\]'"):
        _quantize(["flux2-tiny", str(tmp_path / "m"), "--calibrate", str(tmp_path / "p.txt"), "--quant", "fp8"])
    # everything else still works: flux-dist's own quantization and its ModelOpt-format writer
    assert _quantize(["flux2-tiny", str(tmp_path / "q"), "--quant", "fp8-emulate", "--format", "modelopt",
                      "--dtype", "float32", "--device", "cpu"]) == 0
    tr, _ = load_quantized(str(tmp_path / "q" / "transformer"), CPU)
    assert sum(isinstance(m, QuantLinear) for m in tr.modules()) > 0


# -- published layouts flux-dist does not read: a clear error, never a plain (bf16) load ------------------
def _to_blocked(s: torch.Tensor) -> torch.Tensor:
    """comfy-kitchen float_utils.to_blocked (cuBLAS 128x4 tiles), as the ComfyUI / BFL NVFP4 files store them."""
    rows, cols = s.shape
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    p = s.new_zeros(pr, pc)
    p[:rows, :cols] = s
    return p.view(pr // 128, 128, pc // 4, 4).permute(0, 2, 1, 3).reshape(-1, 4, 32, 4).transpose(1, 2).reshape(
        -1, 32, 16).reshape(pr, pc)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain") / "tiny"
    save_preset("flux2-tiny", str(d))
    return d


def _replace_transformer_files(d, tensors: dict, name="diffusion_pytorch_model.safetensors", config=None):
    t = d / "transformer"
    for f in t.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(t / name))
    cfg = json.loads((t / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if config:
        cfg["quantization_config"] = config
    (t / "config.json").write_text(json.dumps(cfg))


def test_bfl_comfy_nvfp4_single_file_is_a_clear_error(plain_dir, tmp_path):
    """A tiny checkpoint in the layout of black-forest-labs/FLUX.2-dev-NVFP4 (BFL key names, q/k/v packed,
    ComfyUI `.comfy_quant` markers, high-nibble-first codes, swizzled padded block scales)."""
    import shutil

    d = tmp_path / "bfl"
    shutil.copytree(plain_dir, d)
    n, k = 3 * 64, 64
    marker = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    scales = (torch.rand(n, k // 16) + 0.5).to(torch.float8_e4m3fn)
    tensors = {"double_blocks.0.img_attn.qkv.weight": torch.randint(0, 255, (n, k // 2), dtype=torch.uint8),
               "double_blocks.0.img_attn.qkv.weight_scale": _to_blocked(scales.view(torch.uint8)).view(
                   torch.float8_e4m3fn),
               "double_blocks.0.img_attn.qkv.weight_scale_2": torch.tensor(1e-3),
               "double_blocks.0.img_attn.qkv.comfy_quant": marker,
               "final_layer.linear.weight": torch.randn(32, 64)}
    _replace_transformer_files(d, tensors, name="flux2-dev-nvfp4.safetensors")
    with pytest.raises(FluxDistError) as e:
        Engine(_cfg(d))
    msg = str(e.value)
    for part in ("Black Forest Labs' original key names", "double_blocks.0.img_attn.qkv", ".comfy_quant",
                 "high nibble", "swizzled", "flux2-dev-nvfp4.safetensors"):
        assert part in msg, (part, msg)


def test_unscaled_fp8_or_foreign_quant_method_is_a_clear_error(plain_dir, tmp_path):
    import shutil

    d = tmp_path / "fp8"
    shutil.copytree(plain_dir, d)
    sd = load_file(str(d / "transformer" / "diffusion_pytorch_model.safetensors"))
    lin = "transformer_blocks.0.attn.to_q.weight"
    fp8 = dict(sd, **{lin: sd[lin].to(torch.float8_e4m3fn)})  # FP8 weights, no scales, no config
    _replace_transformer_files(d, fp8)
    with pytest.raises(FluxDistError, match="low-precision weight.*to_q.*no quantization_config"):
        Engine(_cfg(d))
    _replace_transformer_files(d, sd, config={"quant_method": "gguf"})
    with pytest.raises(FluxDistError, match="quant_method 'gguf'"):
        Engine(_cfg(d))
