"""CUDA graphs for the block stack: captured once per shape (collectives included), replayed per step.

Only the block stack is captured — 56 blocks, thousands of kernels — while the embedders, the head,
the step cache's decision and the CFG combine stay outside it (eager, or compiled step regions under
``--compile``): a skipped step replays nothing, and the decision is never inside a graph. Inputs are
copied into static buffers before each replay; the returned tensor is the graph's static output,
valid until the next replay.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from .stack import BlockStack

log = logging.getLogger("flux_dist")


# Graphs kept (least recently used shape evicted): each holds its own memory pool and static buffers.
MAX_GRAPHS = 8


class GraphedStack:
    """A ``BlockStack`` that replays a captured CUDA graph of another (the model's plain stack)."""

    def __init__(self, stack: BlockStack, warmup: int = 2, max_graphs: int = MAX_GRAPHS) -> None:
        self.inner, self.warmup, self.max_graphs = stack, warmup, max_graphs
        self.graphs: OrderedDict[tuple, tuple[list[torch.Tensor], torch.Tensor, torch.cuda.CUDAGraph]] = OrderedDict()

    def __call__(self, tr, img, txt, mods, rope) -> torch.Tensor:
        flat = [img, txt, *mods, *rope]
        key = tuple((t.shape, t.dtype) for t in flat)
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            while len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)  # its pool is released with it
            self.graphs[key] = self._capture(tr, flat, len(mods))
        static, out, graph = self.graphs[key]
        for dst, src in zip(static, flat, strict=True):
            dst.copy_(src)
        graph.replay()
        return out

    def _capture(self, tr, flat: list[torch.Tensor], n_mods: int):
        static = [t.clone() for t in flat]

        def run() -> torch.Tensor:
            img, txt, *rest = static
            return self.inner(tr, img, txt, tuple(rest[:n_mods]), tuple(rest[n_mods:]))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: compile, autotune, NCCL set-up
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        log.info("captured a CUDA graph of the block stack for image tokens %s", tuple(flat[0].shape))
        return static, out, graph
