"""Token sharding: every rank keeps one contiguous shard of the text and one of the image tokens.

Each stream is padded to a multiple of the sequence-parallel degree, so all shards have the same
shape (all-to-all and ring transfers need that). Padded tokens never act as keys: attention drops
them by index, so the result does not depend on the layout. A rank's local sequence is always
``[text shard, image shard]``, the order diffusers' FLUX.2 blocks concatenate in.

The image stream is the noisy (target) image tokens followed by the reference images' tokens, if any
(editing): ``[target, references, padding]``, padded and sharded as one stream, so every rank holds an
equal share of the whole sequence and a rank's target tokens are always a prefix of its image shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collectives import all_gather


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ShardPlan:
    """Where every real token lives, for one request shape. Same on every rank."""

    txt_len: int
    img_len: int  # the target (noisy) image tokens: what the step updates and gather_image returns
    sp: int
    ulysses: int = 1
    ref_len: int = 0  # reference-image tokens after them in the image stream (constant across steps)

    @property
    def stream_len(self) -> int:
        """Real tokens of the image stream: target and references."""
        return self.img_len + self.ref_len

    @property
    def txt_loc(self) -> int:
        return _ceil_div(self.txt_len, self.sp)

    @property
    def img_loc(self) -> int:
        return _ceil_div(self.stream_len, self.sp)

    @property
    def local_len(self) -> int:
        return self.txt_loc + self.img_loc

    @property
    def padded(self) -> bool:
        return self.txt_loc * self.sp != self.txt_len or self.img_loc * self.sp != self.stream_len

    def valid(self, shard: int) -> torch.Tensor:
        """Bool mask over shard ``shard``'s local ``[text, image]`` sequence: True for real tokens."""
        t = torch.arange(self.txt_loc) + shard * self.txt_loc < self.txt_len
        i = torch.arange(self.img_loc) + shard * self.img_loc < self.stream_len
        return torch.cat([t, i])

    def n_target(self, shard: int) -> int:
        """How many target image tokens shard ``shard`` holds: a prefix of its image shard."""
        return max(0, min(self.img_loc, self.img_len - shard * self.img_loc))

    def target_mask(self, shard: int, device: torch.device | None = None) -> torch.Tensor | None:
        """``[1, img_loc, 1]`` bool, True on shard ``shard``'s target tokens; None without references (every
        real token is a target: padding is dropped at the gather)."""
        if not self.ref_len:
            return None
        return (torch.arange(self.img_loc, device=device) < self.n_target(shard)).view(1, -1, 1)

    def key_index(self) -> tuple[torch.Tensor | None, ...]:
        """Per ring block, the indices of real keys in the ulysses-gathered sequence (None: all real).

        Ring block ``j`` after the Ulysses all-to-all holds shards ``j*U .. j*U+U-1`` in order.
        """
        out: list[torch.Tensor | None] = []
        ring = self.sp // self.ulysses
        for j in range(ring):
            mask = torch.cat([self.valid(j * self.ulysses + u) for u in range(self.ulysses)])
            out.append(None if bool(mask.all()) else mask.nonzero().flatten())
        return tuple(out)

    def shard(self, x: torch.Tensor, stream: str, rank: int, dim: int = 1) -> torch.Tensor:
        """This rank's shard of a full ``stream`` ('txt', or 'img': target and reference tokens), zero-padded."""
        full, loc = (self.txt_len, self.txt_loc) if stream == "txt" else (self.stream_len, self.img_loc)
        if x.shape[dim] != full:
            raise ValueError(f"{stream} tensor has {x.shape[dim]} tokens along dim {dim}, plan says {full}")
        pad = loc * self.sp - full
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.narrow(dim, rank * loc, loc).contiguous()


def gather_image(x_loc: torch.Tensor, plan: ShardPlan, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All image shards of the sequence-parallel group, references and padding removed: ``[B, img_len, C]``."""
    if group is None or plan.sp == 1:
        return x_loc[:, : plan.img_len]
    # all_gather along dim 0 keeps shards in group-rank order, which is the shard order.
    g = all_gather(x_loc.transpose(0, 1), 0, group)
    return g.transpose(0, 1)[:, : plan.img_len]
