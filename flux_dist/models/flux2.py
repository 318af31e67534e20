"""FLUX.2 adapter: which diffusers modules to wrap, and a forward pass over sharded tokens.

The blocks are diffusers' own ``Flux2TransformerBlock`` / ``Flux2SingleTransformerBlock``; only
their attention processors are swapped for ones that call sequence-parallel attention. The
forward here mirrors ``Flux2Transformer2DModel.forward`` (text-to-image path) but takes each
rank's ``[text shard, image shard]`` and exposes the block stack so the step cache can skip it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2Attention,
    Flux2Modulation,
    Flux2ParallelSelfAttention,
    Flux2Transformer2DModel,
    _get_qkv_projections,
)

from ..parallel.attention import AttnContext, check_heads, sp_attend, sp_attention, sp_send, sp_wait
from ..quant import QuantLinear, concat_linears, slice_linear
from ..sampling import euler_step


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
            mlp = attn.mlp_act_fn(split["mlp"](hidden_states))  # the larger GEMM, while q/k/v travel
            sent = sp_attend(pending, self.ctx)
            y = attn.fd_out["mlp"](mlp)  # the MLP's columns of to_out, while the attention output travels
            out = sp_wait(sent, self.ctx).flatten(2, 3).to(q.dtype)
            return attn.fd_out["attn"](out) + y
        h = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = torch.split(h, [3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = sp_attention(q, k, v, self.ctx).flatten(2, 3).to(q.dtype)
        if getattr(attn, "fd_out", None) is not None:
            return attn.fd_out["attn"](out) + attn.fd_out["mlp"](attn.mlp_act_fn(mlp))
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


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


@dataclass
class StepInputs:
    """Per-request tensors that stay fixed across steps (local shards)."""

    txt: torch.Tensor  # [B, T_loc, inner_dim]: context_embedder output, constant across steps
    rope: tuple[torch.Tensor, torch.Tensor]  # over the local [text, image] sequence
    guidance: torch.Tensor | None  # [B] (dev) or None (klein)


def prepare(tr: Flux2Transformer2DModel, txt: torch.Tensor, txt_ids: torch.Tensor, img_ids: torch.Tensor,
            guidance: torch.Tensor | None) -> StepInputs:
    """RoPE tables for the local tokens, computed once per request instead of once per step."""
    txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    t_cos, t_sin = tr.pos_embed(txt_ids)
    i_cos, i_sin = tr.pos_embed(img_ids)
    rope = (torch.cat([t_cos, i_cos], 0), torch.cat([t_sin, i_sin], 0))
    return StepInputs(txt=tr.context_embedder(txt), rope=rope, guidance=guidance)


def modulations(tr: Flux2Transformer2DModel, x: torch.Tensor, timestep: torch.Tensor,
                guidance: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Time/guidance embedding and the three shared modulation vectors."""
    timestep = timestep.to(x.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(x.dtype) * 1000
    temb = tr.time_guidance_embed(timestep, guidance)
    return (temb, tr.double_stream_modulation_img(temb), tr.double_stream_modulation_txt(temb),
            tr.single_stream_modulation(temb))


def embed(tr: Flux2Transformer2DModel, x: torch.Tensor, timestep: torch.Tensor,
          guidance: torch.Tensor | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The block stack's per-step inputs: image tokens at model width, and the modulations."""
    return tr.x_embedder(x), modulations(tr, x, timestep, guidance)


def first_block_signal(tr: Flux2Transformer2DModel, img: torch.Tensor, mod_img: torch.Tensor) -> torch.Tensor:
    """TeaCache's signal: the first double block's modulated image input."""
    (shift, scale, _), _ = Flux2Modulation.split(mod_img, 2)
    return (1 + scale) * tr.transformer_blocks[0].norm1(img) + shift


def signal_change(cur: torch.Tensor, prev: torch.Tensor, n: int) -> torch.Tensor:
    """``[sum |cur - prev|, sum |prev|]`` (float32 sums, as float64) over the first ``n`` tokens.

    A shard's real image tokens are a prefix of it (padding sits at the end of the last shard), so a
    slice selects them: no boolean indexing, hence no host sync and a static shape to compile.
    """
    cur, prev = cur[:, :n], prev[:, :n]
    diff = (cur - prev).abs().float().sum()
    return torch.stack([diff, prev.abs().float().sum()]).to(torch.float64)


def run_blocks(tr: Flux2Transformer2DModel, img: torch.Tensor, txt: torch.Tensor, mods: tuple[torch.Tensor, ...],
               rope: tuple[torch.Tensor, torch.Tensor], only_first: bool = False, skip_first: bool = False):
    """Every block; returns the joint local ``[text, image]`` hidden states.

    ``only_first`` runs the first double block alone and returns ``(txt, img)``; ``skip_first``
    runs the rest (the First-Block Cache splits the stack there).
    """
    _, mod_img, mod_txt, mod_single = mods
    doubles = tr.transformer_blocks[:1] if only_first else tr.transformer_blocks[int(skip_first):]
    for block in doubles:
        txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb_mod_img=mod_img,
                         temb_mod_txt=mod_txt, image_rotary_emb=rope)
    if only_first:
        return txt, img
    h = torch.cat([txt, img], dim=1)
    for block in tr.single_transformer_blocks:
        h = block(hidden_states=h, encoder_hidden_states=None, temb_mod=mod_single, image_rotary_emb=rope)
    return h


def image_stack(tr: Flux2Transformer2DModel, img: torch.Tensor, txt: torch.Tensor, mods: tuple[torch.Tensor, ...],
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The block stack, image tokens out (what a step cache replaces)."""
    return run_blocks(tr, img, txt, mods, rope)[:, txt.shape[1]:]


@dataclass
class Reuse:
    """A skipped block stack (from a step cache): the head's region adds ``residual`` to ``img``."""

    img: torch.Tensor
    residual: torch.Tensor


def head(tr: Flux2Transformer2DModel, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    return tr.proj_out(tr.norm_out(img, temb))


def reuse_head(tr: Flux2Transformer2DModel, img: torch.Tensor, residual: torch.Tensor,
               temb: torch.Tensor) -> torch.Tensor:
    """The head of a skipped step: the cached stack residual added first (one region with the head)."""
    return head(tr, img + residual, temb)


@dataclass(frozen=True)
class StepFns:
    """The step's work outside the block stack, as a few regions: all that a skipped cache step runs.

    Eager here; ``compile.compile_step`` compiles each region whole so a skipped step launches a few
    fused kernels instead of dozens of small ones. The cache's decision (a host bool from an
    all-gather) and the CFG combine stay outside every region.
    """

    embed: Callable = embed  # time/guidance embedding, modulations, x_embedder
    signal: Callable = first_block_signal  # TeaCache's signal
    change: Callable = signal_change  # this shard's sums for the shared cache decision
    head: Callable = head
    reuse_head: Callable = reuse_head  # residual add + head, on a skipped step
    update: Callable = euler_step  # the scheduler step


EAGER = StepFns()


def forward(tr: Flux2Transformer2DModel, x: torch.Tensor, timestep: torch.Tensor, inp: StepInputs,
            stack: Callable = image_stack, fns: StepFns = EAGER) -> torch.Tensor:
    """One transformer pass over local shards; returns the local image velocity ``[B, I_loc, C]``.

    ``fns`` holds the work outside the stack (compiled under ``--compile``); ``stack`` may return a
    ``Reuse`` instead of tokens when a cache skips the blocks.
    """
    img, mods = fns.embed(tr, x, timestep, inp.guidance)
    out = stack(tr, img, inp.txt, mods, inp.rope)
    if isinstance(out, Reuse):
        return fns.reuse_head(tr, out.img, out.residual, mods[0])
    return fns.head(tr, out, mods[0])
