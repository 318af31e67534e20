"""One FLUX.2 transformer pass over this rank's ``[text shard, image shard]``, in pieces.

The forward mirrors ``Flux2Transformer2DModel.forward`` but exposes the block stack (a
``stack.BlockStack``) so a step cache can skip it and CUDA graphs can capture it, and groups the
work outside the stack into a few regions (``StepFns``) that ``--compile`` compiles whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Modulation, Flux2Transformer2DModel

from ...sampling import euler_step
from ...stack import BlockStack, Reuse


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


def first_block_signal(tr: Flux2Transformer2DModel, img: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """TeaCache's signal: the first double block's modulated image input."""
    (shift, scale, _), _ = Flux2Modulation.split(mods[1], 2)
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
    """The block stack, image tokens out (a ``BlockStack``: what a step cache replaces)."""
    return run_blocks(tr, img, txt, mods, rope)[:, txt.shape[1]:]


def first_block(tr, img, txt, mods, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """The First-Block Cache's probe: the first double block alone, ``(txt, img)`` out."""
    return run_blocks(tr, img, txt, mods, rope, only_first=True)


def rest_blocks(tr, img, txt, mods, rope) -> torch.Tensor:
    """Every block after the first, image tokens out."""
    return run_blocks(tr, img, txt, mods, rope, skip_first=True)[:, txt.shape[1]:]


def head(tr: Flux2Transformer2DModel, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    return tr.proj_out(tr.norm_out(img, temb))


def reuse_head(tr: Flux2Transformer2DModel, img: torch.Tensor, residual: torch.Tensor,
               temb: torch.Tensor) -> torch.Tensor:
    """The head of a skipped step: the cached stack residual added first (one region with the head)."""
    return head(tr, img + residual, temb)


@dataclass(frozen=True)
class StepFns:
    """The step's work outside the block stack, as a few regions: all that a skipped cache step runs.

    Eager here; ``compile.compile_fns`` compiles each region whole so a skipped step launches a few
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
            stack: BlockStack = image_stack, fns: StepFns = EAGER) -> torch.Tensor:
    """One transformer pass over local shards; returns the local image velocity ``[B, I_loc, C]``."""
    img, mods = fns.embed(tr, x, timestep, inp.guidance)
    out = stack(tr, img, inp.txt, mods, inp.rope)
    if isinstance(out, Reuse):
        return fns.reuse_head(tr, out.img, out.residual, mods[0])
    return fns.head(tr, out, mods[0])
