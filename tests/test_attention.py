"""Sequence-parallel attention primitives against full attention on one process (float32, gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flux_dist.errors import FluxDistError
from flux_dist.parallel.attention import AttnContext, check_heads, sp_attention
from flux_dist.parallel.mesh import Mesh, ParallelDims
from flux_dist.parallel.sharding import ShardPlan

from dist_utils import run_distributed

H, D = 4, 8


def _full(txt: int, img: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, txt + img, H, D, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    return q, k, v, ref


def _split(x: torch.Tensor, plan: ShardPlan, shard: int) -> torch.Tensor:
    t, i = x[:, : plan.txt_len], x[:, plan.txt_len:]
    return torch.cat([plan.shard(t, "txt", shard), plan.shard(i, "img", shard)], dim=1)


def _worker(rank: int, world: int, layouts: list[tuple[int, int]], shapes: list[tuple[int, int]]):
    errs = []
    for ring, uly in layouts:
        mesh = Mesh(ParallelDims(1, ring, uly), rank, world)
        for txt, img in shapes:
            q, k, v, ref = _full(txt, img)
            plan = ShardPlan(txt, img, mesh.dims.sp, uly)
            ctx = AttnContext(mesh, plan)
            s = mesh.sp_rank
            out = sp_attention(_split(q, plan, s), _split(k, plan, s), _split(v, plan, s), ctx)
            want = _split(ref, plan, s)
            valid = plan.valid(s)
            err = ((out - want)[:, valid].norm() / want[:, valid].norm()).item()
            errs.append(((ring, uly, txt, img), err))
    return errs


# (txt, img): even, uneven text, uneven image, both uneven
SHAPES = [(8, 24), (7, 24), (8, 23), (5, 13)]


@pytest.mark.parametrize("world,layouts", [(2, [(1, 2), (2, 1)]), (4, [(2, 2), (1, 4), (4, 1)])])
def test_sp_attention_matches_full(world, layouts):
    for rank_errs in run_distributed(_worker, world, layouts, SHAPES):
        for key, err in rank_errs:
            assert err < 1e-5, (key, err)


def test_plan_padding_and_key_index():
    plan = ShardPlan(txt_len=7, img_len=10, sp=4, ulysses=2)
    assert (plan.txt_loc, plan.img_loc, plan.padded) == (2, 3, True)
    assert int(sum(plan.valid(s).sum() for s in range(4))) == 17
    # ring block 1 holds shards 2 and 3: text 2 real + 1 real, image 3 real + 1 real
    idx = plan.key_index()[1]
    assert idx is not None and idx.numel() == 2 + 3 + 1 + 1
    assert ShardPlan(8, 12, 4, 2).key_index() == (None, None)


def test_heads_not_divisible_is_an_error():
    with pytest.raises(FluxDistError, match="not divisible"):
        check_heads(6, 4)


def test_degrees_must_multiply_to_world():
    with pytest.raises(FluxDistError, match="world size"):
        Mesh(ParallelDims(1, 2, 2), 0, 2)
