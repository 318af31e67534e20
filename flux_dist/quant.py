"""Low-precision linears: FP8 (Hopper, Ada) and NVFP4 (Blackwell), with CPU references.

FP8: E4M3 weights with one scale per output channel, activations quantized per token at run time,
one ``torch._scaled_mm`` (row-wise scales, bf16 out) per linear. NVFP4: E2M1 values, one E4M3 scale
per 16 elements and one FP32 scale per tensor; its GEMM exists only on sm_100+ (``torch._scaled_mm``
with ``float4_e2m1fn_x2``). Where a kernel cannot run (CPU, or NVFP4 before Blackwell) the layer can
*emulate* it — dequantize and multiply in high precision — which is for validating numerics only:
it is slower than bf16 and says so loudly; ``auto`` never picks it.

Layers NVIDIA keeps in high precision for FLUX.2 stay in the model's dtype (DESIGN.md).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .errors import FluxDistError, NotSupportedError

log = logging.getLogger("flux_dist")

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
BLOCK = 16
MODES = ("none", "fp8", "nvfp4", "nvfp4-emulate", "fp8-emulate", "auto")
RESOLVED_MODES = tuple(m for m in MODES if m != "auto")  # what resolve_mode returns: a layer's format

# Block-level linears quantized in FLUX.2 (everything else stays high precision: embedders,
# time/guidance embedding, modulation, norm_out, proj_out, the text stream's attention projections).
QUANTIZED = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in", "ff.linear_out",
             "ff_context.linear_in", "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out",
             "attn.fd_split.qkv", "attn.fd_split.mlp",  # the Ulysses split of to_qkv_mlp_proj
             "attn.fd_out.attn", "attn.fd_out.mlp",  # to_out's column blocks
             "attn.fd_qkv.img")  # fused image-stream q/k/v (the text stream's stays high precision)


# -- FP8 -----------------------------------------------------------------------------------------
def quantize_fp8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) E4M3 with float32 scales ``[..., 1]``: ``x ~ q * scale``."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


# -- NVFP4 ---------------------------------------------------------------------------------------
def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 magnitude index (0..7) of ``|v| <= 6`` (ties to the even code, as hardware does)."""
    grid = FP4_GRID.to(v.device)
    d = (v.abs().unsqueeze(-1) - grid).abs()
    idx = d.argmin(dim=-1)
    # argmin picks the lower index on ties; move to the even code where the upper one is even
    up = d.gather(-1, (idx + 1).clamp(max=7).unsqueeze(-1)).squeeze(-1)
    tie = (up == d.gather(-1, idx.unsqueeze(-1)).squeeze(-1)) & (idx < 7)
    return torch.where(tie & (idx % 2 == 1), idx + 1, idx)


def quantize_nvfp4(x: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed uint8 [..., K/2], block scales e4m3 [..., K/16], global fp32 scale)``.

    ``x ~ e2m1 * block_scale * global``; global = amax / (448 * 6) so block scales fill E4M3's range.
    Weights take one global scale per tensor; activations one per token (``per_row``), so a token
    quantizes the same whichever rank holds it and the result does not depend on the layout.
    """
    if x.shape[-1] % BLOCK:
        raise FluxDistError(f"NVFP4 needs the inner dimension to be a multiple of {BLOCK}, got {x.shape[-1]}")
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if per_row else xf.abs().amax().reshape(())
    g = amax.clamp(min=1e-12) / (FP8_MAX * FP4_MAX)
    blocks = xf.reshape(*x.shape[:-1], -1, BLOCK)
    bs = (blocks.abs().amax(-1) / FP4_MAX / g).clamp(max=FP8_MAX).to(FP8)  # E4M3 block scale
    denom = (bs.float() * g).unsqueeze(-1)
    v = torch.where(denom > 0, blocks / denom.clamp(min=1e-30), torch.zeros_like(blocks)).clamp(-FP4_MAX, FP4_MAX)
    code = _round_e2m1(v) | ((v < 0).to(torch.int64) << 3)
    code = code.reshape(*x.shape[:-1], -1).to(torch.uint8)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)  # low nibble first, as float4_e2m1fn_x2
    return packed, bs, g


def dequantize_nvfp4(packed: torch.Tensor, bs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0xF, packed >> 4
    code = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1).long()
    mag = FP4_GRID.to(packed.device)[code & 7]
    val = torch.where(code >= 8, -mag, mag)
    blocks = val.reshape(*val.shape[:-1], -1, BLOCK) * (bs.float() * g).unsqueeze(-1)
    return blocks.reshape(*val.shape)


def _to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Swizzle ``[rows, K/16]`` E4M3 scales into cuBLAS' 128x4 tiled layout (sm_100 block-scaled GEMM)."""
    rows, cols = scales.shape
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = scales.new_zeros(pr, pc)
    padded[:rows, :cols] = scales
    tiles = padded.view(pr // 128, 128, pc // 4, 4).permute(0, 2, 1, 3)
    return tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


# -- modules -------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A linear whose weight is stored quantized; activations are quantized per call."""

    def __init__(self, lin: nn.Linear, mode: str) -> None:
        super().__init__()
        self.mode, self.in_features, self.out_features = mode, lin.in_features, lin.out_features
        self.out_dtype = lin.weight.dtype
        if mode.endswith("-emulate"):
            mode = mode.removesuffix("-emulate")
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach(), requires_grad=False)
        w = lin.weight.detach()
        if mode.startswith("fp8"):
            q, s = quantize_fp8_rowwise(w)
            self.register_buffer("weight_q", q)
            self.register_buffer("weight_scale", s.reshape(1, -1).contiguous())  # [1, N] for scale_b
        else:
            p, bs, g = quantize_nvfp4(w)
            self.register_buffer("weight_q", p)
            self.register_buffer("weight_block_scale", bs)
            self.register_buffer("weight_global", g)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.mode == "fp8":
            xq, xs = quantize_fp8_rowwise(x2)
            y = torch._scaled_mm(xq, self.weight_q.t(), scale_a=xs, scale_b=self.weight_scale,
                                 bias=self.bias, out_dtype=self.out_dtype)
        elif self.mode == "fp8-emulate":
            w = dequantize_fp8(self.weight_q, self.weight_scale.reshape(-1, 1))
            y = dequantize_fp8(*quantize_fp8_rowwise(x2)) @ w.t()
            y = (y if self.bias is None else y + self.bias.float()).to(self.out_dtype)
        elif self.mode == "nvfp4":
            y = self._nvfp4_gemm(x2)
        else:  # nvfp4-emulate
            w = dequantize_nvfp4(self.weight_q, self.weight_block_scale, self.weight_global)
            y = dequantize_nvfp4(*quantize_nvfp4(x2, per_row=True)) @ w.t()
            y = (y if self.bias is None else y + self.bias.float()).to(self.out_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _nvfp4_gemm(self, x2: torch.Tensor) -> torch.Tensor:
        """Blackwell path: FP4 x FP4 with swizzled E4M3 block scales; the two global scales after."""
        xp, xbs, xg = quantize_nvfp4(x2, per_row=True)
        fp4 = torch.float4_e2m1fn_x2
        y = torch._scaled_mm(xp.view(fp4), self.weight_q.view(fp4).t(), scale_a=_to_blocked(xbs),
                             scale_b=_to_blocked(self.weight_block_scale), out_dtype=torch.bfloat16)
        y = y * (xg * self.weight_global)
        return (y if self.bias is None else y + self.bias).to(self.out_dtype)


def slice_linear(lin: nn.Module, rows: slice | None = None, cols: slice | None = None) -> nn.Module:
    """A new linear holding a block of ``lin``'s weight: output rows and/or input columns (same format).

    Used to split a fused projection so its halves can run at different times (overlap with
    communication). Row slices keep per-row scales; column slices keep them too (the scales are per
    output channel), and NVFP4 column slices must fall on 16-element blocks.
    """
    rows = rows or slice(None)
    cols = cols or slice(None)
    if isinstance(lin, nn.Linear):
        w = lin.weight.detach()[rows, cols].contiguous()
        out = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None and cols == slice(None),
                        device=w.device, dtype=w.dtype)
        out.weight.data.copy_(w)
        if out.bias is not None:
            out.bias.data.copy_(lin.bias.detach()[rows])
        return out.requires_grad_(False)
    if not isinstance(lin, QuantLinear):
        raise TypeError(f"cannot slice {type(lin).__name__}")
    new = QuantLinear.__new__(QuantLinear)
    nn.Module.__init__(new)
    new.mode, new.out_dtype = lin.mode, lin.out_dtype
    keep_bias = lin.bias is not None and cols == slice(None)
    new.bias = nn.Parameter(lin.bias.detach()[rows], requires_grad=False) if keep_bias else None
    if lin.mode.startswith("fp8"):
        new.register_buffer("weight_q", lin.weight_q[rows, cols].contiguous())
        new.register_buffer("weight_scale", lin.weight_scale[:, rows].contiguous())
    else:
        c0, c1 = cols.start or 0, lin.in_features if cols.stop is None else cols.stop
        if c0 % BLOCK or c1 % BLOCK:
            raise FluxDistError(f"NVFP4 column slices must fall on {BLOCK}-element blocks, got {c0}:{c1}")
        new.register_buffer("weight_q", lin.weight_q[rows, c0 // 2:c1 // 2].contiguous())
        new.register_buffer("weight_block_scale", lin.weight_block_scale[rows, c0 // BLOCK:c1 // BLOCK].contiguous())
        new.register_buffer("weight_global", lin.weight_global)
    new.out_features = new.weight_q.shape[0]
    new.in_features = new.weight_q.shape[1] * (2 if lin.mode.startswith("nvfp4") else 1)
    return new


def concat_linears(lins: list[nn.Module]) -> nn.Module | None:
    """One linear computing ``cat([lin(x) for lin in lins], -1)`` (exact: scales are per output row),
    or None where the format does not allow it (NVFP4 has one global scale per weight tensor)."""
    if all(isinstance(m, nn.Linear) for m in lins):
        w = torch.cat([m.weight.detach() for m in lins])
        out = nn.Linear(w.shape[1], w.shape[0], bias=lins[0].bias is not None, device=w.device, dtype=w.dtype)
        out.weight.data.copy_(w)
        if out.bias is not None:
            out.bias.data.copy_(torch.cat([m.bias.detach() for m in lins]))
        return out.requires_grad_(False)
    if not all(isinstance(m, QuantLinear) and m.mode.startswith("fp8") for m in lins):
        return None
    new = slice_linear(lins[0])
    new.weight_q = torch.cat([m.weight_q for m in lins])
    new.weight_scale = torch.cat([m.weight_scale for m in lins], dim=1)
    if new.bias is not None:
        new.bias = nn.Parameter(torch.cat([m.bias.detach() for m in lins]), requires_grad=False)
    new.out_features = new.weight_q.shape[0]
    return new


def resolve_mode(mode: str, device: torch.device) -> str:
    """``auto``: NVFP4 on sm_100+, FP8 on sm_89 / sm_90, none elsewhere (never an emulation)."""
    if mode not in MODES:
        raise FluxDistError(f"unknown quantization '{mode}' (choose from {', '.join(MODES)})")
    cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    if mode == "auto":
        return "nvfp4" if cap >= (10, 0) else "fp8" if cap >= (8, 9) else "none"
    if mode == "fp8" and cap < (8, 9):
        raise NotSupportedError(f"FP8 GEMMs need sm_89+ (Ada/Hopper), this device is {device} sm_{cap[0]}{cap[1]}; "
                                "use --quant fp8-emulate to validate numerics (slow)")
    if mode == "nvfp4" and cap < (10, 0):
        raise NotSupportedError(f"NVFP4 GEMMs need Blackwell (sm_100+), this device is {device} "
                                f"sm_{cap[0]}{cap[1]}; use --quant nvfp4-emulate to validate numerics (slow)")
    if mode.endswith("emulate"):
        log.warning("*** --quant %s EMULATES low-precision GEMMs in high precision: numerics only, SLOWER "
                    "than bf16; never use it for speed ***", mode)
    return mode


QUANT_FILE = "flux_dist_quant.json"
WEIGHTS_FILE = "quantized.safetensors"
FORMATS = ("flux-dist", "modelopt")

# NVIDIA ModelOpt's Hugging Face checkpoint format (nvidia-modelopt 0.47.0, modelopt/torch/export/):
# a diffusers transformer folder whose config.json carries ``quantization_config`` with
# ``quant_method: "modelopt"`` (unified_export_hf.py::_export_diffusers_checkpoint, in the layout of
# convert_hf_config.py::convert_hf_quant_config_format); the LLM path also writes hf_quant_config.json
# (unified_export_hf.py::_write_hf_export_config). Per quantized linear ``<name>``:
#   FP8 per tensor ("FP8"):    weight e4m3 [N, K], weight_scale fp32 0-d = amax / 448, input_scale fp32 0-d
#   FP8 per channel ("FP8_PER_CHANNEL_PER_TOKEN"): weight_scale fp32 [N] (TensorQuantizer.export_amax
#                              squeezes the axis-0 amax), activations per token at run time
#   NVFP4 ("NVFP4"):           weight uint8 [N, K/2], two E2M1 codes a byte, element 2i in the low nibble
#                              (NVFP4QTensor.quantize); weight_scale e4m3 [N, K/16]; weight_scale_2 fp32
#                              0-d = amax / (6 * 448); input_scale fp32 0-d;
#                              w = e2m1 * weight_scale * weight_scale_2 (NVFP4QTensor.dequantize)
# (unified_export_hf.py::_export_quantized_weight, quant_utils.py::to_quantized_weight). Our buffers use
# the same conventions, so conversion is renaming and reshaping only.
MODELOPT_WEIGHTS = "diffusion_pytorch_model.safetensors"  # what diffusers' save_pretrained names it
MODELOPT_QUANT_FILE = "hf_quant_config.json"
MODELOPT_WRITE_ALGO = {"fp8": "FP8_PER_CHANNEL_PER_TOKEN", "nvfp4": "NVFP4"}  # our weights and activations
MODELOPT_READ_ALGO = {"FP8": "fp8", "FP8_PER_CHANNEL_PER_TOKEN": "fp8", "NVFP4": "nvfp4"}
# QuantLinear buffer -> ModelOpt tensor name, per format
MODELOPT_NAMES = {"fp8": {"weight_q": "weight", "weight_scale": "weight_scale"},
                  "nvfp4": {"weight_q": "weight", "weight_block_scale": "weight_scale",
                            "weight_global": "weight_scale_2"}}


def checkpoint_format(folder: str) -> str | None:
    """``flux-dist`` or ``modelopt`` for a quantized transformer folder, None for a plain one."""
    import json
    import os

    if os.path.exists(os.path.join(folder, QUANT_FILE)):
        return "flux-dist"
    if os.path.exists(os.path.join(folder, MODELOPT_QUANT_FILE)):
        return "modelopt"
    cfg = os.path.join(folder, "config.json")
    if os.path.exists(cfg):
        with open(cfg, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == "modelopt":
            return "modelopt"
    return None  # (another quant_method is left to diffusers' from_pretrained, as before)


def _quant_names(tr: nn.Module) -> list[str]:
    return [n for n, m in tr.named_modules() if isinstance(m, QuantLinear)]


def _modelopt_configs(tr: nn.Module, base: str) -> tuple[dict, dict]:
    """(config.json ``quantization_config``, hf_quant_config.json) as ModelOpt writes them for ``base``:
    quant_utils.py::get_quant_config / process_layer_quant_config, convert_hf_config.py."""
    from . import __version__

    algo = MODELOPT_WRITE_ALGO[base]
    quantized = set(_quant_names(tr))
    ignore = sorted(n for n, m in tr.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    producer = {"name": "flux-dist", "version": __version__}
    details: dict = {"quant_algo": algo, "kv_cache_quant_algo": None}
    hf_cfg: dict = {"quant_algo": algo, "producer": producer, "ignore": ignore, "quant_method": "modelopt"}
    if base == "nvfp4":
        details["group_size"] = BLOCK
        group = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": BLOCK}
        hf_cfg["config_groups"] = {"group_0": {"input_activations": dict(group), "weights": dict(group),
                                               "targets": ["Linear"]}}
    details["exclude_modules"] = ignore
    return hf_cfg, {"producer": producer, "quantization": details}


def save_quantized(tr: nn.Module, mode: str, folder: str, fmt: str = "flux-dist") -> None:
    """Write a quantized transformer so a large model is quantized once.

    ``flux-dist``: config + our QuantLinear buffers + flux_dist_quant.json. ``modelopt``: NVIDIA
    ModelOpt's HF format (see above): config.json with ``quantization_config``, hf_quant_config.json,
    diffusion_pytorch_model.safetensors. No ``input_scale`` is written: activations are quantized per
    token at run time, there is no calibrated static scale to give.
    """
    import json
    import os

    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise FluxDistError(f"unknown checkpoint format '{fmt}' (choose from {', '.join(FORMATS)})")
    base = mode.removesuffix("-emulate")
    if base not in MODELOPT_NAMES:
        raise FluxDistError(f"cannot save quantization '{mode}': pass an fp8 or nvfp4 mode")
    os.makedirs(folder, exist_ok=True)
    tr.save_config(folder)
    sd = {k: v.contiguous() for k, v in tr.state_dict().items()}
    names = _quant_names(tr)
    if fmt == "flux-dist":
        save_file(sd, os.path.join(folder, WEIGHTS_FILE))
        with open(os.path.join(folder, QUANT_FILE), "w") as f:
            json.dump({"format": "flux-dist-quant/1", "mode": mode, "modules": names}, f, indent=1)
        return
    split = [n for n in names if ".fd_" in n]
    if split:
        raise FluxDistError(f"cannot save {split[0]} in ModelOpt's format: a runtime split of a diffusers "
                            "linear; save the model before it is split for a layout")
    for n in names:
        for ours, theirs in MODELOPT_NAMES[base].items():
            t = sd.pop(f"{n}.{ours}")
            sd[f"{n}.{theirs}"] = t.reshape(-1).contiguous() if ours == "weight_scale" else t  # [1, N] -> [N]
    save_file(sd, os.path.join(folder, MODELOPT_WEIGHTS))
    hf_cfg, quant_cfg = _modelopt_configs(tr, base)
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = hf_cfg
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(folder, MODELOPT_QUANT_FILE), "w", encoding="utf-8") as f:
        json.dump(quant_cfg, f, indent=4)


def _modelopt_algo(folder: str) -> tuple[str, str]:
    """(quant_algo, our base mode) of a ModelOpt folder; a clear error for what we cannot run."""
    import json
    import os

    path = os.path.join(folder, MODELOPT_QUANT_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            q = json.load(f).get("quantization", {})
        source = MODELOPT_QUANT_FILE
    else:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            q = json.load(f)["quantization_config"]
        source = "config.json quantization_config"
        if q.get("kv_cache_scheme"):
            q = {**q, "kv_cache_quant_algo": q["kv_cache_scheme"]}
    algo = q.get("quant_algo")
    if algo not in MODELOPT_READ_ALGO:
        raise FluxDistError(f"{folder}: ModelOpt quant_algo {algo!r} ({source}) is not supported; flux-dist loads "
                            f"{', '.join(MODELOPT_READ_ALGO)}")
    if q.get("kv_cache_quant_algo"):
        raise FluxDistError(f"{folder}: ModelOpt kv_cache_quant_algo {q['kv_cache_quant_algo']!r} ({source}) is not "
                            "supported: flux-dist quantizes linears only")
    gs = q.get("group_size")
    if algo == "NVFP4" and gs not in (None, BLOCK):
        raise FluxDistError(f"{folder}: NVFP4 group_size {gs} ({source}); flux-dist's NVFP4 uses {BLOCK}")
    return algo, MODELOPT_READ_ALGO[algo]


def _read_safetensors(folder: str, names: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """One file, or the shards a ``<name>.index.json`` lists (diffusers shards above max_shard_size)."""
    import json
    import os

    from safetensors.torch import load_file

    for name in names:
        if os.path.exists(os.path.join(folder, name)):
            return load_file(os.path.join(folder, name), device=str(device))
        index = os.path.join(folder, name + ".index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for fn in files:
                sd.update(load_file(os.path.join(folder, fn), device=str(device)))
            return sd
    raise FluxDistError(f"{folder}: no {' or '.join(names)} (nor a sharded index)")


def _quantizable(tr: nn.Module, name: str) -> bool:
    """A linear flux-dist runs quantized: one of ``QUANTIZED`` inside a transformer block."""
    parts = name.split(".")
    return (len(parts) > 2 and parts[0] in ("transformer_blocks", "single_transformer_blocks")
            and parts[1].isdigit() and ".".join(parts[2:]) in QUANTIZED
            and isinstance(_get(tr, name), nn.Linear))


def _get(tr: nn.Module, name: str) -> nn.Module | None:
    try:
        return tr.get_submodule(name)
    except AttributeError:
        return None


def _from_modelopt(tr: nn.Module, folder: str, device: torch.device) -> str:
    """Swap the shells' linears that the checkpoint holds quantized for QuantLinear shells and return
    the state dict renamed to our buffers; returns the base mode. ``tr`` lives on the meta device."""
    algo, base = _modelopt_algo(folder)
    sd = _read_safetensors(folder, (MODELOPT_WEIGHTS, "model.safetensors"), device)
    quantized = sorted({k.removesuffix(".weight_scale") for k in sd if k.endswith(".weight_scale")})
    for name in quantized:
        if not _quantizable(tr, name):
            raise FluxDistError(f"{folder}: ModelOpt checkpoint quantizes '{name}', which flux-dist does not run "
                                f"quantized (it quantizes {', '.join(QUANTIZED[:8])}, ... in the blocks only)")
        parent, _, leaf = name.rpartition(".")
        setattr(tr.get_submodule(parent), leaf, QuantLinear(tr.get_submodule(name), base))
    n_input = 0
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        prefix, _, leaf = k.rpartition(".")
        if prefix in quantized and leaf == "input_scale":
            n_input += 1
            continue
        out[k] = v
    for name in quantized:
        lin = tr.get_submodule(name)
        n, kdim = lin.out_features, lin.in_features
        for ours, theirs in MODELOPT_NAMES[base].items():
            key = f"{name}.{theirs}"
            if key not in out:
                raise FluxDistError(f"{folder}: {algo} linear '{name}' has no '{key}'")
            t = out.pop(key)
            if base == "fp8" and ours == "weight_scale":
                if t.numel() not in (1, n):
                    raise FluxDistError(f"{folder}: '{key}' has shape {tuple(t.shape)}: FP8 scales are per tensor "
                                        f"or per output channel ({n})")
                t = t.float().reshape(-1).expand(n).reshape(1, n).contiguous()  # per tensor -> per channel
            want = {"weight_q": ((n, kdim), FP8) if base == "fp8" else ((n, kdim // 2), torch.uint8),
                    "weight_block_scale": ((n, kdim // BLOCK), FP8),
                    "weight_global": ((), torch.float32), "weight_scale": ((1, n), torch.float32)}[ours]
            if ours == "weight_global":
                if t.numel() != 1:
                    raise FluxDistError(f"{folder}: '{key}' has shape {tuple(t.shape)}, NVFP4's global scale is "
                                        "one value per tensor")
                t = t.float().reshape(())
            if tuple(t.shape) != want[0] or t.dtype != want[1]:
                raise FluxDistError(f"{folder}: '{key}' is {t.dtype} {tuple(t.shape)}, expected {want[1]} "
                                    f"{want[0]} (padded or swizzled NVFP4 scales are not read)")
            out[f"{name}.{ours}"] = t
    expected = set(tr.state_dict())
    unknown = sorted(set(out) - expected)
    if unknown:
        raise FluxDistError(f"{folder}: ModelOpt checkpoint tensor(s) flux-dist cannot map: {', '.join(unknown[:5])}")
    missing = sorted(expected - set(out))
    if missing:
        raise FluxDistError(f"{folder}: ModelOpt checkpoint lacks {', '.join(missing[:5])}")
    if n_input:
        log.info("ModelOpt checkpoint: %d static input_scale(s) ignored (flux-dist quantizes activations "
                 "per token at run time)", n_input)
    tr.load_state_dict(out, strict=True, assign=True)
    log.info("loaded ModelOpt %s checkpoint %s: %d quantized linears", algo, folder, len(quantized))
    return base


def load_quantized(folder: str, device: torch.device) -> tuple[nn.Module, str]:
    """The inverse of ``save_quantized`` in either format: shells built on the meta device, then the saved
    tensors assigned. A ModelOpt folder is detected (config.json ``quantization_config`` or
    hf_quant_config.json) and mapped onto QuantLinear; what cannot be mapped is a FluxDistError.

    A mode the device cannot run (FP8 on CPU, NVFP4 before Blackwell) is switched to its emulation,
    with the loud warning, rather than failing at the first GEMM.
    """
    import json
    import os

    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file

    fmt = checkpoint_format(folder)
    if fmt is None:
        raise FluxDistError(f"{folder}: not a quantized transformer (no {QUANT_FILE}, no ModelOpt quantization_config)")
    cfg = dict(Flux2Transformer2DModel.load_config(folder))
    cfg.pop("quantization_config", None)  # ours to read, not diffusers' quantizer's
    with torch.device("meta"):
        tr = Flux2Transformer2DModel.from_config(cfg)
    if fmt == "flux-dist":
        with open(os.path.join(folder, QUANT_FILE), encoding="utf-8") as f:
            mode = json.load(f)["mode"]
        with torch.device("meta"):
            quantize_transformer(tr, mode)
        tr.load_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE), device=str(device)), strict=True, assign=True)
    else:
        mode = _from_modelopt(tr, folder, device)
    try:
        resolve_mode(mode, device)
    except NotSupportedError:
        mode = f"{mode.removesuffix('-emulate')}-emulate"
        resolve_mode(mode, device)
    out_dtype = tr.proj_out.weight.dtype  # the shells were built in float32; the file's dtype rules
    for m in tr.modules():
        if isinstance(m, QuantLinear):
            m.mode, m.out_dtype = mode, out_dtype
    return tr.eval().requires_grad_(False), mode


def quantize_block(block: nn.Module, mode: str) -> int:
    """Swap one block's ``QUANTIZED`` linears for QuantLinear in place; returns how many were swapped.

    Per block so that a model can be quantized while it is built, one block at a time in high
    precision, never the whole model (FLUX.2 [dev] is 64 GB in bf16, about half that in FP8).
    """
    if mode not in RESOLVED_MODES:
        raise FluxDistError(f"cannot quantize to '{mode}': pass a mode from resolve_mode ({', '.join(RESOLVED_MODES)})")
    if mode == "none":
        return 0
    n = 0
    for name, mod in list(block.named_modules()):
        if isinstance(mod, nn.Linear) and name in QUANTIZED:
            parent, _, leaf = name.rpartition(".")
            setattr(block.get_submodule(parent), leaf, QuantLinear(mod, mode))
            n += 1
    return n


def quantize_transformer(tr: nn.Module, mode: str) -> int:
    """Swap the block linears for QuantLinear in place; returns how many QuantLinear the blocks hold.

    Linears that are already QuantLinear (a preset built quantized block by block, a model loaded
    quantized) are left alone and counted, so calling it after such a load never quantizes twice.
    """
    if mode == "none":
        return 0
    n = 0
    for blocks in (tr.transformer_blocks, tr.single_transformer_blocks):
        for block in blocks:
            quantize_block(block, mode)
            n += sum(isinstance(m, QuantLinear) for m in block.modules())
    return n
