"""Quantized transformers in NVIDIA ModelOpt's Hugging Face checkpoint format (nvidia-modelopt 0.47.0).

The conventions hard-coded here are read from modelopt 0.47.0's source (modelopt/torch/export/...),
each cited where it is used; these tests do not import modelopt (tests/test_quant_modelopt_e2e.py runs
ModelOpt itself).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_dist.config import load_config
from flux_dist.engine import Engine
from flux_dist.errors import FluxDistError
from flux_dist.models.flux2 import load_quantized
from flux_dist.models.presets import build_preset
from flux_dist.models.source import load_model
from flux_dist.quant import QuantLinear, checkpoint_format, dequantize_fp8, dequantize_nvfp4

CPU = torch.device("cpu")
LIN = "transformer_blocks.0.attn.to_q"  # one linear NVIDIA's FLUX.2 recipe quantizes

# modelopt/torch/quantization/qtensor/nvfp4_tensor.py, module level `e2m1_values`: code -> value
# (bit 3 the sign, bits 0-2 the magnitude index), used by NVFP4QTensor.dequantize
MO_E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]


def _cfg(model="flux2-tiny", quant="none"):
    c = load_config(None, {"model.model": model, "model.quant": quant})
    c.request = dataclasses.replace(c.request, prompt="a fox", height=80, width=48, steps=2, max_sequence_length=13)
    return c


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize("mode", ["fp8-emulate", "nvfp4-emulate"])
def test_modelopt_format_round_trip(tmp_path, mode):
    """`flux-dist quantize --format modelopt` -> `--model DIR`: the same buffers bit for bit, same latents."""
    from flux_dist.cli import main

    d = tmp_path / "tiny-mo"
    assert main(["quantize", "flux2-tiny", str(d), "--quant", mode, "--format", "modelopt", "--dtype", "float32",
                 "--device", "cpu"]) == 0
    tdir = d / "transformer"
    assert checkpoint_format(str(tdir)) == "modelopt" and not (tdir / "flux_dist_quant.json").exists()
    built = load_model("flux2-tiny", dtype=torch.float32, device=CPU, seed=0, quant=mode).transformer
    tr, loaded_mode = load_quantized(str(tdir), CPU)
    assert loaded_mode == mode
    a, b = built.state_dict(), tr.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(_bits(a[k]), _bits(b[k])), k
    n = sum(isinstance(m, QuantLinear) for m in built.modules())
    assert n > 0 and sum(isinstance(m, QuantLinear) for m in tr.modules()) == n
    fresh, loaded = Engine(_cfg(quant=mode)), Engine(_cfg(model=str(d)))  # loaded: through loading.py
    assert sum(isinstance(m, QuantLinear) for m in loaded.model.tr.modules()) > 0
    assert torch.equal(loaded.generate(loaded.cfg.request, decode=False).latents,
                       fresh.generate(fresh.cfg.request, decode=False).latents)

    # -- the files follow ModelOpt's conventions --
    sd = load_file(str(tdir / "diffusion_pytorch_model.safetensors"))  # diffusers' save_pretrained name
    n_out, k_in = built.get_submodule(LIN).out_features, built.get_submodule(LIN).in_features
    assert not any(k.endswith((".weight_q", ".weight_block_scale", ".weight_global", ".input_scale")) for k in sd)
    hf = json.loads((tdir / "hf_quant_config.json").read_text())
    qc = json.loads((tdir / "config.json").read_text())["quantization_config"]
    # config.json: convert_hf_config.py::convert_hf_quant_config_format ("quant_method": "modelopt", "ignore");
    # hf_quant_config.json: quant_utils.py::get_quant_config + process_layer_quant_config
    assert qc["quant_method"] == "modelopt" and "x_embedder" in qc["ignore"] and LIN not in qc["ignore"]
    assert set(hf) == {"producer", "quantization"} and hf["quantization"]["kv_cache_quant_algo"] is None
    assert hf["quantization"]["exclude_modules"] == qc["ignore"]
    if mode.startswith("fp8"):
        # process_layer_quant_config: "fp8_pc_pt" -> FP8_PER_CHANNEL_PER_TOKEN (weight axis 0, per-token
        # activations: get_quantization_format); _export_quantized_weight registers weight_scale = amax / 448,
        # TensorQuantizer.export_amax squeezes the per-channel amax to [N]; to_quantized_weight: w / s[:, None]
        assert hf["quantization"]["quant_algo"] == qc["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
        assert "config_groups" not in qc  # convert_hf_quant_config_format has no branch for it
        assert sd[f"{LIN}.weight"].dtype == torch.float8_e4m3fn and sd[f"{LIN}.weight"].shape == (n_out, k_in)
        assert sd[f"{LIN}.weight_scale"].dtype == torch.float32 and sd[f"{LIN}.weight_scale"].shape == (n_out,)
        assert f"{LIN}.weight_scale_2" not in sd
        w = sd[f"{LIN}.weight"].double() * sd[f"{LIN}.weight_scale"].double()[:, None]
    else:
        # process_layer_quant_config: "nvfp4" -> {"quant_algo": "NVFP4", "group_size": 16};
        # convert_hf_quant_config_format: config_groups.group_0 with 4-bit float weights/activations
        assert hf["quantization"]["quant_algo"] == qc["quant_algo"] == "NVFP4"
        assert hf["quantization"]["group_size"] == 16
        g0 = qc["config_groups"]["group_0"]
        assert g0["weights"] == {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        assert g0["targets"] == ["Linear"]
        # _export_quantized_weight: weight uint8 [N, K/2], weight_scale e4m3 [N, K/16], weight_scale_2 0-d fp32
        assert sd[f"{LIN}.weight"].dtype == torch.uint8 and sd[f"{LIN}.weight"].shape == (n_out, k_in // 2)
        assert sd[f"{LIN}.weight_scale"].dtype == torch.float8_e4m3fn
        assert sd[f"{LIN}.weight_scale"].shape == (n_out, k_in // 16)
        assert sd[f"{LIN}.weight_scale_2"].dtype == torch.float32 and sd[f"{LIN}.weight_scale_2"].shape == ()
        w = _mo_nvfp4_dequant(sd[f"{LIN}.weight"], sd[f"{LIN}.weight_scale"], sd[f"{LIN}.weight_scale_2"])
    # ModelOpt's formula on the written tensors gives the weight our layer computes with
    ours = (dequantize_fp8(a[f"{LIN}.weight_q"], a[f"{LIN}.weight_scale"].reshape(-1, 1)) if mode.startswith("fp8")
            else dequantize_nvfp4(a[f"{LIN}.weight_q"], a[f"{LIN}.weight_block_scale"], a[f"{LIN}.weight_global"]))
    torch.testing.assert_close(ours.double(), w, rtol=1e-6, atol=0)


def _mo_nvfp4_dequant(packed: torch.Tensor, ws: torch.Tensor, ws2: torch.Tensor) -> torch.Tensor:
    """NVFP4QTensor.dequantize (nvfp4_tensor.py) written out in float64: unpacked[..., 0::2] = byte & 0xF,
    unpacked[..., 1::2] = byte >> 4; value = e2m1_values[code] * (weight_scale * weight_scale_2) per 16."""
    n, half = packed.shape
    codes = torch.empty(n, 2 * half, dtype=torch.long)
    codes[:, 0::2] = (packed & 0x0F).long()
    codes[:, 1::2] = (packed >> 4).long()
    vals = torch.tensor(MO_E2M1, dtype=torch.float64)[codes]
    scale = ws.double() * float(ws2)
    return (vals.reshape(n, -1, 16) * scale.unsqueeze(-1)).reshape(n, -1)


def _hand_made(tmp_path, algo: str, tensors: dict[str, torch.Tensor], *, hf_quant_config=False, linears=(LIN,),
               extra_config=None):
    """A ModelOpt-style diffusers transformer folder written with plain safetensors: the tiny preset's
    high-precision weights, with ``linears`` replaced by ``tensors`` (name suffix -> tensor)."""
    tr = build_preset("flux2-tiny").transformer
    d = tmp_path / f"mo-{algo}"
    tr.save_config(str(d))
    sd = {k: v.contiguous() for k, v in tr.state_dict().items()}
    for name in linears:
        del sd[f"{name}.weight"]
        sd.update({f"{name}.{k}": v for k, v in tensors.items()})
    save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
    # unified_export_hf.py::_export_diffusers_checkpoint: config.json gets "quantization_config" in
    # convert_hf_quant_config_format's layout; the diffusers path writes no hf_quant_config.json
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"ignore": ["proj_out", "x_embedder"], "quant_algo": algo,
                                  "producer": {"name": "modelopt", "version": "0.47.0"}, "quant_method": "modelopt",
                                  **(extra_config or {})}
    (d / "config.json").write_text(json.dumps(cfg))
    if hf_quant_config:  # the LLM path's file (_write_hf_export_config)
        (d / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "0.47.0"},
             "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["proj_out"]}}))
    return d, tr


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("per_channel", [False, True])
def test_hand_made_fp8_checkpoint_loads(tmp_path, per_channel):
    torch.manual_seed(0)
    n, k = 64, 64  # flux2-tiny's to_q
    w = torch.randn(n, k)
    # _export_quantized_weight, QUANTIZATION_FP8: weight_scale = torch.tensor(amax.item() / 448) (0-d);
    # FP8_PC_PT: amax / 448 per output channel, [N]; to_quantized_weight: (w / s).to(float8_e4m3fn)
    s = (w.abs().amax(1) / 448) if per_channel else torch.tensor(w.abs().max().item() / 448)
    q = (w / (s[:, None] if per_channel else s)).to(torch.float8_e4m3fn)
    tensors = {"weight": q, "weight_scale": s.float(), "input_scale": torch.tensor(0.02)}
    algo = "FP8_PER_CHANNEL_PER_TOKEN" if per_channel else "FP8"
    d, ref = _hand_made(tmp_path, algo, tensors, hf_quant_config=per_channel)
    rec = _Records()
    logging.getLogger("flux_dist").addHandler(rec)
    try:
        tr, mode = load_quantized(str(d), CPU)
    finally:
        logging.getLogger("flux_dist").removeHandler(rec)
    assert mode == "fp8-emulate"  # no FP8 GEMM on CPU
    assert any("activations static (1 static input_scale)" in m for m in rec.messages)
    lin = tr.get_submodule(LIN)
    assert isinstance(lin, QuantLinear) and lin.weight_scale.shape == (1, n)
    assert lin.input_scale is not None and float(lin.input_scale) == pytest.approx(0.02)  # kept and used
    assert sum(isinstance(m, QuantLinear) for m in tr.modules()) == 1  # the others stay as they were
    assert type(tr.get_submodule("transformer_blocks.0.attn.to_k")) is torch.nn.Linear
    # ModelOpt's dequantization (quant_utils.py::from_quantized_weight, FP8): q * weight_scale, in float64
    # (exact there: 4 + 24 significant bits); ours in float32 is that product correctly rounded
    want = q.double() * (s.double()[:, None] if per_channel else float(s))
    assert torch.equal(dequantize_fp8(lin.weight_q, lin.weight_scale.reshape(-1, 1)), want.float())
    assert torch.equal(tr.proj_out.weight, ref.proj_out.weight)


def test_hand_made_nvfp4_checkpoint_loads(tmp_path):
    g = torch.Generator().manual_seed(1)
    n, k = 64, 64
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = (codes[:, 1::2] << 4) | codes[:, 0::2]  # NVFP4QTensor.quantize's packing: element 2i low nibble
    ws = (torch.rand(n, k // 16, generator=g) * 40 + 0.01).to(torch.float8_e4m3fn)  # per-16 E4M3 scales
    ws2 = torch.tensor(3.1e-4)  # amax / (6 * 448), 0-d (get_weight_scaling_factor_2(...).squeeze())
    d, _ = _hand_made(tmp_path, "NVFP4", {"weight": packed, "weight_scale": ws, "weight_scale_2": ws2,
                                          "input_scale": torch.tensor(1e-3)},
                      extra_config={"config_groups": {"group_0": {"weights": {"group_size": 16}}}})
    tr, mode = load_quantized(str(d), CPU)
    assert mode == "nvfp4-emulate"
    lin = tr.get_submodule(LIN)
    got = dequantize_nvfp4(lin.weight_q, lin.weight_block_scale, lin.weight_global).double()
    torch.testing.assert_close(got, _mo_nvfp4_dequant(packed, ws, ws2), rtol=2.5e-7, atol=0)  # two float32 roundings
    x = torch.randn(3, k, generator=g)
    assert lin(x).shape == (3, n)


@pytest.mark.parametrize("algo,match", [("W4A16_AWQ", "W4A16_AWQ"), ("W4A8_AWQ", "W4A8_AWQ"),
                                        ("MIXED_PRECISION", "MIXED_PRECISION"), ("NVFP4_SVD", "NVFP4_SVD")])
def test_unsupported_quant_algo_is_a_clear_error(tmp_path, algo, match):
    d, _ = _hand_made(tmp_path, algo, {"weight": torch.zeros(64, 32, dtype=torch.uint8),
                                       "weight_scale": torch.ones(64, 1)})
    with pytest.raises(FluxDistError, match=f"quant_algo '{match}'.*not supported"):
        load_quantized(str(d), CPU)


def test_unknown_quantized_module_or_tensor_is_a_clear_error(tmp_path):
    w = torch.zeros(64, 64, dtype=torch.float8_e4m3fn)
    d, _ = _hand_made(tmp_path, "FP8", {"weight": w, "weight_scale": torch.tensor(1.0)},
                      linears=("context_embedder",))
    with pytest.raises(FluxDistError, match="'context_embedder'.*does not run"):
        load_quantized(str(d), CPU)
    d, _ = _hand_made(tmp_path / "awq", "FP8", {"weight": w, "weight_scale": torch.tensor(1.0),
                                                "pre_quant_scale": torch.ones(64)})
    with pytest.raises(FluxDistError, match=f"cannot map: {LIN}.pre_quant_scale"):
        load_quantized(str(d), CPU)
    # swizzled / padded NVFP4 scales (_postprocess_safetensors' opt-in deployment layouts) are refused
    d, _ = _hand_made(tmp_path / "swz", "NVFP4", {"weight": torch.zeros(64, 32, dtype=torch.uint8),
                                                  "weight_scale": torch.zeros(128 * 4, dtype=torch.float8_e4m3fn),
                                                  "weight_scale_2": torch.tensor(1.0)})
    with pytest.raises(FluxDistError, match="swizzled"):
        load_quantized(str(d), CPU)
