"""Sequence-parallel attention: Ulysses (all-to-all over heads), ring (K/V passed peer to peer,
merged through the log-sum-exp), and both at once (USP: Ulysses inside, ring outside).

All collectives are functional (``torch.distributed._functional_collectives``) so that
``torch.compile`` and CUDA graphs can take them. Tensors use diffusers' ``[B, S, H, D]`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..errors import FluxDistError
from . import kernels
from .collectives import all_to_all, wait
from .mesh import Mesh
from .sharding import ShardPlan


@dataclass
class AttnContext:
    """What attention needs to know about the layout; the plan changes with the request shape.

    The real-key indices are materialized on the device when the plan is set, so the attention code
    (possibly compiled) only reads a tuple.
    """

    mesh: Mesh
    plan: ShardPlan | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    key_idx: tuple[torch.Tensor | None, ...] = ()
    kernel: kernels.Kernel = field(default_factory=kernels.Kernel)  # see kernels.resolve

    def __post_init__(self) -> None:
        if self.plan is not None:
            plan, self.plan = self.plan, None
            self.set_plan(plan, self.device)

    def set_plan(self, plan: ShardPlan, device: torch.device) -> None:
        if plan is self.plan and device == self.device:
            return
        self.plan, self.device = plan, device
        self.key_idx = tuple(None if i is None else i.to(device) for i in plan.key_index())

    def key_index(self, block: int) -> torch.Tensor | None:
        return self.key_idx[block] if self.key_idx else None


def check_heads(heads: int, ulysses: int, where: str = "") -> None:
    if heads % ulysses:
        raise FluxDistError(f"attention heads ({heads}) are not divisible by --ulysses {ulysses}{where}")


def _a2a(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Equal-split all-to-all along dim 0, waited (the next op needs it)."""
    return wait(all_to_all(x, group))


def ulysses_send(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: int,
                 group: dist.ProcessGroup) -> torch.Tensor:
    """Start the q/k/v all-to-all (one collective); the result stays async until ``ulysses_recv``.

    Each tensor is copied once into the send buffer; compute issued before ``ulysses_recv`` overlaps it.
    """
    b, s, h, d = q.shape
    buf = q.new_empty(u, 3, b, s, h // u, d)
    for i, t in enumerate((q, k, v)):
        buf[:, i].copy_(t.view(b, s, u, h // u, d).permute(2, 0, 1, 3, 4))
    return all_to_all(buf, group)  # [u(src), 3, B, S, H/u, D]


def ulysses_recv(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wait for the all-to-all; one copy into ``[B, u*S, H/u, D]`` memory, returned as ``[B, H/u, u*S, D]`` views.

    That memory order is FA3's native layout, and the output all-to-all then needs no copy to send.
    """
    u, _, b, s, hu, d = y.shape
    y = wait(y).permute(1, 2, 0, 3, 4, 5).reshape(3, b, u * s, hu, d).transpose(2, 3)
    return y[0], y[1], y[2]


def ulysses_gather_send(out: torch.Tensor, u: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Start the inverse all-to-all of ``[B, H/u, u*S, D]`` (no copy when its memory is ``[B, u*S, H/u, D]``)."""
    b, hu, us, d = out.shape
    return all_to_all(out.reshape(b, hu, u, us // u, d).permute(2, 0, 3, 1, 4), group)  # [u, B, S, H/u, D]


def ulysses_gather_recv(y: torch.Tensor) -> torch.Tensor:
    """Wait for the inverse all-to-all: ``[B, S, H, D]`` with the head groups in source-rank order."""
    u, b, s, hu, d = y.shape
    return wait(y).permute(1, 2, 0, 3, 4).reshape(b, s, u * hu, d)


def _ring_shift(kv: torch.Tensor, ring: int, rank: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Send ``kv`` to the next rank of the ring and receive the previous rank's (async until used).

    An all-to-all with one non-empty split is a peer-to-peer transfer that compile can trace.
    """
    n = kv.shape[0]
    send = [0] * ring
    recv = [0] * ring
    send[(rank + 1) % ring] = n
    recv[(rank - 1) % ring] = n
    return all_to_all(kv, group, recv, send)


def _select(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x.index_select(2, idx)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """``[B, H, S, D]`` in and out. Each step overlaps the next K/V transfer with this block's attention."""
    mesh = ctx.mesh
    ring, r = mesh.dims.ring, mesh.ring_rank
    group = mesh.groups["ring"]
    kv = torch.stack([k, v]).contiguous()  # [2, B, H, S, D]; one transfer per step
    acc: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    for step in range(ring):
        nxt = _ring_shift(kv, ring, r, group) if step + 1 < ring else None
        src = (r - step) % ring
        idx = ctx.key_index(src)
        kb, vb = _select(kv[0], idx), _select(kv[1], idx)
        if kb.shape[2] > 0:
            o, l = kernels.attention_lse(q, kb, vb, ctx.kernel)
            if acc is None:
                acc, lse = o.float(), l
            else:
                new = torch.logaddexp(lse, l)
                acc = acc * torch.exp(lse - new).unsqueeze(-1) + o.float() * torch.exp(l - new).unsqueeze(-1)
                lse = new
        if nxt is not None:
            kv = wait(nxt)
    assert acc is not None, "every ring holds at least one real key"
    return acc.to(q.dtype)


def sp_send(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext):
    """First half of ``sp_attention``: start moving q/k/v; the caller may compute before ``sp_finish``."""
    u = ctx.mesh.dims.ulysses
    if u > 1:
        return ulysses_send(q, k, v, u, ctx.mesh.groups["ulysses"])
    return tuple(t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views


def sp_finish(pending, ctx: AttnContext) -> torch.Tensor:
    """Second half: attention over every real key, back to this rank's ``[B, S_loc, H, D]``."""
    return sp_wait(sp_attend(pending, ctx), ctx)


def sp_wait(sent, ctx: AttnContext) -> torch.Tensor:
    """Wait for ``sp_attend``'s output all-to-all (compute issued in between overlaps it)."""
    return ulysses_gather_recv(sent) if ctx.mesh.dims.ulysses > 1 else sent


def sp_attend(pending, ctx: AttnContext):
    """Attention over every real key; under Ulysses the output all-to-all is started, not waited."""
    dims = ctx.mesh.dims
    u = dims.ulysses
    q, k, v = ulysses_recv(pending) if u > 1 else pending
    if dims.ring > 1:
        out = ring_attention(q, k, v, ctx)
    else:
        idx = ctx.key_index(0)
        out = kernels.attention(q, _select(k, idx), _select(v, idx), ctx.kernel)
    if u > 1:
        return ulysses_gather_send(out, u, ctx.mesh.groups["ulysses"])
    return out.transpose(1, 2)


def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Attention of this rank's query shard against every real key of the sequence.

    ``q, k, v``: ``[B, S_loc, H, D]`` (RoPE already applied). Returns ``[B, S_loc, H, D]``.
    """
    return sp_finish(sp_send(q, k, v, ctx), ctx)
