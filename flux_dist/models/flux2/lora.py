"""FLUX.2 LoRA files, read with diffusers' own FLUX.2 loader, and where diffusers' module names live in
flux-dist's transformer (its fused q/k/v and split single-block projections).

``read_adapter`` does what ``Flux2Pipeline.load_lora_weights`` does up to the injection: the file's
layout converted by ``Flux2LoraLoaderMixin.lora_state_dict`` (diffusers' own ``save_lora_weights``
output, peft's, kohya's, ai-toolkit's), peft key names, and the ``LoraConfig`` diffusers builds from
the file's metadata (rank and alpha per module) — so each module's ``alpha / r`` is peft's.
``lora_targets`` maps those names onto the linears flux-dist runs after ``attention.parallelize``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_flux2 import Flux2FeedForward, Flux2SwiGLU
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from ...errors import FluxDistError, NotSupportedError
from ...lora import LoraBank, LoraLinear, LoraSwiGLU, LoraWeights, Piece, attach
from ...quant import QuantLinear

log = logging.getLogger("flux_dist")
FUSED_QKV = {"img": ("to_q", "to_k", "to_v"), "txt": ("add_q_proj", "add_k_proj", "add_v_proj")}


def read_adapter(name: str, path: str) -> tuple[dict[str, LoraWeights], dict[str, Any]]:
    """``{diffusers module name: LoraWeights}`` of a FLUX.2 LoRA file (or a directory holding one), and
    a summary (path, ranks, module count)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    if not os.path.exists(path):
        raise FluxDistError(f"LoRA {name!r}: file not found: {path}")
    try:
        sd, metadata = Flux2Pipeline.lora_state_dict(path, use_safetensors=True, local_files_only=True,
                                                     return_lora_metadata=True)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds; all mean "not a LoRA file we read"
        raise FluxDistError(f"LoRA {name!r}: cannot read {path} as a FLUX.2 LoRA safetensors file: {e}") from None
    if not sd:
        raise FluxDistError(f"LoRA {name!r}: {path} holds no tensors")
    if any(".lokr_" in k for k in sd):
        raise NotSupportedError(f"LoRA {name!r}: {path} is a LoKr adapter; flux-dist applies LoRA (A/B) adapters only")
    outside = sorted(k for k in sd if not k.startswith("transformer."))
    if outside:
        raise FluxDistError(f"LoRA {name!r}: {path} has weights outside the FLUX.2 transformer (e.g. {outside[0]!r}); "
                            "not a FLUX.2 transformer LoRA (text-encoder LoRAs are not applied)")
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    if metadata:
        metadata = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    if "lora_A" not in next(iter(sd)):
        sd = convert_unet_state_dict_to_peft(sd)
    odd = sorted(k for k in sd if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if odd:
        raise NotSupportedError(f"LoRA {name!r}: {path} holds {odd[0]!r}: DoRA magnitudes, LoRA biases and other "
                                "extras are not applied (plain lora_A / lora_B weights only)")
    rank = {f"^{k}": v.shape[1] for k, v in sd.items() if ".lora_B." in k and v.ndim > 1}
    try:
        config = _create_lora_config(sd, None, metadata or None, rank)
    except Exception as e:  # noqa: BLE001
        raise FluxDistError(f"LoRA {name!r}: {path} has a LoRA config diffusers cannot read: {e}") from None
    if config.use_dora or config.lora_bias:
        raise NotSupportedError(f"LoRA {name!r}: DoRA / LoRA-bias adapters are not applied")
    weights: dict[str, LoraWeights] = {}
    for module in sorted({k.rsplit(".lora_", 1)[0] for k in sd}):
        a, b = sd.get(f"{module}.lora_A.weight"), sd.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise FluxDistError(f"LoRA {name!r}: module {module!r} has lora_{'A' if a is None else 'B'} missing")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        weights[module] = LoraWeights(a, b, alpha / math.sqrt(r) if config.use_rslora else alpha / r)
    ranks = sorted({int(w.a.shape[0]) for w in weights.values()})
    return weights, {"path": path, "ranks": ranks, "modules": len(weights)}


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear | QuantLinear)


def lora_targets(tr: nn.Module) -> tuple[dict[str, list[Piece]], dict[str, tuple[int, int]]]:
    """``(targets, shapes)``: each linear flux-dist runs -> the diffusers pieces it computes, and each
    diffusers linear -> ``(in, out)``. Call after ``attention.parallelize`` (the fusions / splits exist)."""
    targets: dict[str, list[Piece]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for name, mod in tr.named_modules():
        if not _is_linear(mod):
            continue
        group, _, leaf = name.rpartition(".")
        attn, _, kind = group.rpartition(".")
        if kind == "fd_qkv":  # double block: to_q | to_k | to_v in one GEMM (image or text stream)
            n = mod.out_features // 3
            targets[name] = [Piece(f"{attn}.{s}", n) for s in FUSED_QKV[leaf]]
            shapes.update({f"{attn}.{s}": (mod.in_features, n) for s in FUSED_QKV[leaf]})
        elif kind == "fd_split":  # single block: to_qkv_mlp_proj's row blocks
            split = tr.get_submodule(group)
            q, total = split["qkv"].out_features, split["qkv"].out_features + split["mlp"].out_features
            rows = slice(0, q) if leaf == "qkv" else slice(q, total)
            targets[name] = [Piece(f"{attn}.to_qkv_mlp_proj", mod.out_features, rows=rows)]
            shapes[f"{attn}.to_qkv_mlp_proj"] = (mod.in_features, total)
        elif kind == "fd_out":  # single block: to_out's column blocks (attention | MLP)
            split = tr.get_submodule(group)
            n, total = split["attn"].in_features, split["attn"].in_features + split["mlp"].in_features
            cols = slice(0, n) if leaf == "attn" else slice(n, total)
            targets[name] = [Piece(f"{attn}.to_out", mod.out_features, cols=cols)]
            shapes[f"{attn}.to_out"] = (total, mod.out_features)
        else:
            targets[name] = [Piece(name, mod.out_features)]
            shapes[name] = (mod.in_features, mod.out_features)
    return targets, shapes


def load_lora(tr: nn.Module, adapters: dict[str, str], dtype: torch.dtype, device: torch.device) -> LoraBank:
    """Read every ``{name: path}`` adapter and attach the bank to the (parallelized) transformer (an empty
    bank, touching nothing, when there are none)."""
    if not adapters:
        return LoraBank((), torch.zeros(0, device=device))
    read = {name: read_adapter(name, path) for name, path in adapters.items()}
    targets, shapes = lora_targets(tr)
    bank = attach(tr, {n: w for n, (w, _) in read.items()}, targets, shapes, dtype, device,
                  info={n: i for n, (_, i) in read.items()})
    fused = fuse_swiglu(tr)
    log.info("LoRA: %d adapter(s) on %d linears (%d feed-forward SwiGLUs take the delta in their kernel): %s",
             len(bank.names), bank.wrapped, fused, bank.describe())
    return bank


def fuse_swiglu(tr: nn.Module) -> int:
    """Each feed-forward whose ``linear_in`` carries the bank becomes ``LoraSwiGLU`` + identity: the delta is added
    inside the SwiGLU's kernel instead of in a pass over the widest output of the block (the single blocks'
    processor does the same for theirs, ``attention._swiglu``). Returns how many."""
    n = 0
    for ff in tr.modules():
        lin = getattr(ff, "linear_in", None)
        if (isinstance(ff, Flux2FeedForward) and isinstance(lin, LoraLinear) and lin.fuses
                and isinstance(ff.act_fn, Flux2SwiGLU)):
            ff.linear_in, ff.act_fn = LoraSwiGLU(lin), nn.Identity()
            n += 1
    return n
