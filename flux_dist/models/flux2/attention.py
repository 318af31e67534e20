"""FLUX.2's blocks over sharded tokens: attention processors that call sequence-parallel attention,
and the projection fusions / splits each layout takes.

The blocks are diffusers' own ``Flux2TransformerBlock`` / ``Flux2SingleTransformerBlock``; only
their attention processors are swapped (``set_processor``), and a few linears are fused or split.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2ParallelSelfAttention,
    Flux2Transformer2DModel,
    _get_qkv_projections,
)

from ...lora import LoraLinear
from ...parallel.attention import AttnContext, check_heads, sp_attend, sp_attention, sp_send, sp_wait
from ...quant import QuantLinear, concat_linears, slice_linear


class DoubleStreamAttnProcessor:
    """Joint text+image attention of a double-stream block, sharded over the sequence."""

    def __init__(self, ctx: AttnContext) -> None:
        self.ctx = ctx

    def __call__(
        self,
        attn: Flux2Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = getattr(attn, "fd_qkv", None)
        if fused is not None:
            q, k, v = fused["img"](hidden_states).chunk(3, dim=-1)
            eq, ek, ev = fused["txt"](encoder_hidden_states).chunk(3, dim=-1)
        else:
            q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
        q = torch.cat([attn.norm_added_q(eq), attn.norm_q(q)], dim=1)
        k = torch.cat([attn.norm_added_k(ek), attn.norm_k(k)], dim=1)
        v = torch.cat([ev, v], dim=1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = sp_attention(q, k, v, self.ctx).flatten(2, 3).to(q.dtype)
        txt, img = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, attn.to_add_out(txt)


class SingleStreamAttnProcessor:
    """Fused attention + MLP of a single-stream block, sharded over the sequence.

    Under Ulysses the fused input projection is split by output rows (``split_for_overlap``) so the
    MLP half's GEMM runs while q/k/v are in the all-to-all instead of the GPU waiting for it. A row
    split computes exactly the same numbers (also quantized: scales are per output row and per token).
    """

    def __init__(self, ctx: AttnContext) -> None:
        self.ctx = ctx

    def __call__(
        self,
        attn: Flux2ParallelSelfAttention,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        split = getattr(attn, "fd_split", None)
        if split is not None:
            qkv = split["qkv"](hidden_states)
            q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
            q, k = attn.norm_q(q), attn.norm_k(k)
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
            pending = sp_send(q, k, v, self.ctx)
            mlp = _swiglu(split["mlp"], hidden_states, attn.mlp_act_fn)  # the larger GEMM, while q/k/v travel
            sent = sp_attend(pending, self.ctx)
            y = attn.fd_out["mlp"](mlp)  # the MLP's columns of to_out, while the attention output travels
            out = sp_wait(sent, self.ctx).flatten(2, 3).to(q.dtype)
            return attn.fd_out["attn"](out) + y
        lin, n_qkv = attn.to_qkv_mlp_proj, 3 * attn.inner_dim
        if _fused(lin):  # the delta of the q/k/v columns in place, the MLP's inside its SwiGLU
            y, h = lin.parts(hidden_states)
            qkv, mlp = lin.add_(y, h, 0, n_qkv)[..., :n_qkv], lin.swiglu(y, h, n_qkv)
        else:
            qkv, mlp = torch.split(lin(hidden_states), [n_qkv, attn.mlp_hidden_dim * attn.mlp_mult_factor], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = sp_attention(q, k, v, self.ctx).flatten(2, 3).to(q.dtype)
        mlp = mlp if _fused(lin) else attn.mlp_act_fn(mlp)
        if getattr(attn, "fd_out", None) is not None:
            return attn.fd_out["attn"](out) + attn.fd_out["mlp"](mlp)
        return attn.to_out(torch.cat([out, mlp], dim=-1))


# A LoRA bank on the single block's MLP input (``flux_dist.lora``): the adapters' delta goes inside the SwiGLU's kernel.
def _fused(lin: torch.nn.Module) -> bool:
    return isinstance(lin, LoraLinear) and lin.fuses


def _swiglu(lin: torch.nn.Module, x: torch.Tensor, act) -> torch.Tensor:
    """``act(lin(x))`` for the SwiGLU ``act``."""
    return lin.swiglu(*lin.parts(x)) if _fused(lin) else act(lin(x))


def parallelize(transformer: Flux2Transformer2DModel, ctx: AttnContext) -> None:
    """Swap every block's attention processor for the sequence-parallel one (also on 1 rank)."""
    check_heads(transformer.config.num_attention_heads, ctx.mesh.dims.ulysses)
    for block in transformer.transformer_blocks:
        block.attn.set_processor(DoubleStreamAttnProcessor(ctx))
        fuse_qkv(block.attn)
    for block in transformer.single_transformer_blocks:
        block.attn.set_processor(SingleStreamAttnProcessor(ctx))
        if ctx.mesh.dims.ulysses > 1:
            split_for_overlap(block.attn)
        elif isinstance(block.attn.to_out, QuantLinear):
            split_out(block.attn)  # the same per-token activation scales as under Ulysses: same numbers


def fuse_qkv(attn: Flux2Attention) -> None:
    """One GEMM per stream for q/k/v (wider N, one activation read) where the weight format allows it."""
    if getattr(attn, "fd_qkv", None) is not None:
        return
    img = concat_linears([attn.to_q, attn.to_k, attn.to_v])
    txt = concat_linears([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj])
    if img is None or txt is None:
        return
    attn.fd_qkv = torch.nn.ModuleDict({"img": img, "txt": txt})
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        delattr(attn, name)
        setattr(attn, name, None)


def split_out(attn: Flux2ParallelSelfAttention) -> None:
    """Split ``to_out`` into its attention and MLP column blocks: ``to_out(cat[a, m]) = A a + M m``.

    Under Ulysses the MLP half runs while the attention output is in the all-to-all. A quantized model
    takes the split in every layout, so each half's input is quantized per token the same way everywhere.
    """
    if getattr(attn, "fd_out", None) is not None:
        return
    out, n = attn.to_out, attn.inner_dim
    a = slice_linear(out, cols=slice(0, n))
    if out.bias is not None:  # column blocks drop the bias: it is added once, with the attention half
        a.bias = torch.nn.Parameter(out.bias.detach(), requires_grad=False)
    attn.fd_out = torch.nn.ModuleDict({"attn": a, "mlp": slice_linear(out, cols=slice(n, None))})
    del attn.to_out
    attn.to_out = None


def split_for_overlap(attn: Flux2ParallelSelfAttention) -> None:
    """Split the fused QKV + MLP-in projection into its two row blocks (the fused one is dropped), and
    ``to_out`` into column blocks, so both all-to-alls of the block have a GEMM to hide behind."""
    split_out(attn)
    if getattr(attn, "fd_split", None) is not None:
        return
    qkv, fused = 3 * attn.inner_dim, attn.to_qkv_mlp_proj
    attn.fd_split = torch.nn.ModuleDict({"qkv": slice_linear(fused, rows=slice(0, qkv)),
                                         "mlp": slice_linear(fused, rows=slice(qkv, None))})
    del attn.to_qkv_mlp_proj
    attn.to_qkv_mlp_proj = None
