"""FLUX.2's quantization plan: which linears run in FP8 / NVFP4 and which stay in the model dtype.

Quantized: the blocks' attention and MLP linears (and the fused / split ones the layouts make).
High precision (NVIDIA's FLUX.2 recipe, docs/facts.md): the embedders, time/guidance embedding,
modulation, ``norm_out``, ``proj_out`` and the text stream's attention projections.
"""

from __future__ import annotations

import torch.nn as nn
from diffusers import Flux2Transformer2DModel

from ...quant import QuantPlan, count_quantized, quantize_linears

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
QUANTIZED = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in", "ff.linear_out",
             "ff_context.linear_in", "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out",
             "attn.fd_split.qkv", "attn.fd_split.mlp",  # the Ulysses split of to_qkv_mlp_proj
             "attn.fd_out.attn", "attn.fd_out.mlp",  # to_out's column blocks
             "attn.fd_qkv.img")  # fused image-stream q/k/v (the text stream's stays high precision)


def quantize_block(block: nn.Module, mode: str) -> int:
    """Swap one block's planned linears in place; returns how many were swapped.

    Per block so that a model can be quantized while it is built or read, one block at a time in high
    precision, never the whole model (FLUX.2 [dev] is 64 GB in bf16, about half that in FP8).
    """
    return quantize_linears(block, QUANTIZED, mode)


def quantize_transformer(tr: nn.Module, mode: str) -> int:
    """Quantize every block in place; returns how many quantized linears the blocks hold.

    Linears that are already quantized (a preset built quantized block by block, a model loaded
    quantized) are left alone and counted, so calling it after such a load never quantizes twice.
    """
    if mode == "none":
        return 0
    n = 0
    for blocks in BLOCK_LISTS:
        for block in getattr(tr, blocks):
            quantize_block(block, mode)
            n += count_quantized(block)
    return n


def quantizable(tr: nn.Module, name: str) -> bool:
    """A linear flux-dist runs quantized: one of ``QUANTIZED`` inside a transformer block."""
    parts = name.split(".")
    if not (len(parts) > 2 and parts[0] in BLOCK_LISTS and parts[1].isdigit() and ".".join(parts[2:]) in QUANTIZED):
        return False
    try:
        return isinstance(tr.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


PLAN = QuantPlan(quantize=quantize_transformer, quantizable=quantizable,
                 summary=f"{', '.join(QUANTIZED[:8])}, ... in the blocks only")


def load_quantized(folder: str, device, dtype=None) -> tuple[Flux2Transformer2DModel, str]:
    """A quantized FLUX.2 transformer folder (flux-dist's or ModelOpt's format): a shell built on the
    meta device, then the saved tensors assigned, the rest cast to ``dtype``. Returns the transformer and the
    mode it runs."""
    import torch

    from ...quant import load_quantized_into

    cfg = dict(Flux2Transformer2DModel.load_config(folder))
    cfg.pop("quantization_config", None)  # ours to read, not diffusers' quantizer's
    with torch.device("meta"):
        tr = Flux2Transformer2DModel.from_config(cfg)
    mode = load_quantized_into(tr, folder, device, PLAN, dtype)
    return tr.eval().requires_grad_(False), mode
