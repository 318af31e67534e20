"""Replica groups and layouts, checked without torch: how the world is cut into groups, and which cut
the server uses for the next request.

A layout ``RxD`` is ``R`` replica groups of ``D`` ranks each (``R x D`` = the world). Each group is a
contiguous block of ranks, holds the whole model and serves its own request; within it the degree
runs as ``cfg x ring x ulysses``: the configured ``--cfg-parallel`` and ``--ring`` in every layout,
Ulysses taking the rest. ``--replicas R`` is one layout (``R x cfg x ring x ulysses`` ranks);
``--layouts 8x1,4x2,2x4`` (serve only) keeps several and picks one per request (``pick_layout``).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from .config import ParallelConfig
from .errors import FluxDistError

LAYOUT_RE = re.compile(r"([0-9]{1,4})[xX]([0-9]{1,4})", re.ASCII)


class Layout(NamedTuple):
    """``replicas`` groups, each of ``cfg x ring x ulysses`` ranks."""

    replicas: int
    cfg: int
    ring: int
    ulysses: int

    @property
    def degree(self) -> int:
        return self.cfg * self.ring * self.ulysses

    @property
    def name(self) -> str:
        return f"{self.replicas}x{self.degree}"


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """``"8x1,4x2"`` -> ``[(8, 1), (4, 2)]`` (replicas, degree); spaces around entries allowed."""
    out: list[tuple[int, int]] = []
    for item in text.split(","):
        m = LAYOUT_RE.fullmatch(item.strip())
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise FluxDistError(f"--layouts {text!r}: each entry is REPLICASxDEGREE with positive numbers "
                                f"(e.g. 8x1,4x2,2x4), got {item.strip()!r}")
        pair = (int(m.group(1)), int(m.group(2)))
        if pair in out:
            raise FluxDistError(f"--layouts {text!r}: {pair[0]}x{pair[1]} is given twice")
        out.append(pair)
    return out


def resolve_layouts(p: ParallelConfig, world: int) -> list[Layout]:
    """Every layout this run keeps, widest (fewest replicas) first; one without ``--layouts``.

    Refuses, before anything loads: ``--replicas`` with ``--layouts``, a layout whose ranks are not the
    world, a degree that is not a multiple of ``cfg x ring``, ``--replicas`` that does not fit the world.
    (The model's attention heads against each Ulysses degree are checked by the engine, before loading.)
    """
    if not p.layouts:
        if p.replicas > 1:
            ranks = p.replicas * p.cfg_parallel * p.ring * p.ulysses
            if ranks != world:
                why = f"{p.replicas} does not divide the world of {world} ranks" if world % p.replicas else \
                    (f"{p.replicas} x --cfg-parallel {p.cfg_parallel} x --ring {p.ring} x --ulysses {p.ulysses} = "
                     f"{ranks} ranks, but the world has {world}")
                raise FluxDistError(f"--replicas {why}")
        return [Layout(p.replicas, p.cfg_parallel, p.ring, p.ulysses)]
    if p.replicas > 1:
        raise FluxDistError("give --replicas or --layouts, not both (--layouts lists each layout's replicas)")
    fixed = p.cfg_parallel * p.ring
    out = []
    for replicas, degree in parse_layouts(p.layouts):
        name = f"{replicas}x{degree}"
        if replicas * degree != world:
            raise FluxDistError(f"--layouts {name}: {replicas} replicas x degree {degree} = {replicas * degree} "
                                f"ranks, but the world has {world}")
        if degree % fixed:
            raise FluxDistError(f"--layouts {name}: degree {degree} is not a multiple of --cfg-parallel "
                                f"{p.cfg_parallel} x --ring {p.ring} (every layout keeps them; Ulysses takes the rest)")
        out.append(Layout(replicas, p.cfg_parallel, p.ring, degree // fixed))
    return sorted(out, key=lambda lay: lay.replicas)


def multi_group(p: ParallelConfig) -> bool:
    """Whether this run cuts the world into groups (``--replicas`` > 1 or ``--layouts``)."""
    return p.replicas > 1 or bool(p.layouts)


def check_layout_use(p: ParallelConfig, command: str) -> None:
    """``--layouts`` is for ``serve``; ``--replicas`` for ``serve`` and batch mode (``batch``)."""
    if p.layouts and command != "serve":
        raise FluxDistError("--layouts is for serve (it picks a layout per request by the queue)")
    if p.replicas > 1 and command not in ("serve", "batch"):
        raise FluxDistError("--replicas is for serve and batch mode (--prompts-file): one image runs on every rank")


def pick_layout(layouts: list[Layout], waiting: int) -> Layout:
    """The rule: the widest layout (fewest replicas) with a group for every waiting request; with more
    waiting than any layout has groups, the one with the most. (Used when every group is idle.)"""
    fits = [lay for lay in layouts if lay.replicas >= waiting]
    return min(fits, key=lambda lay: lay.replicas) if fits else max(layouts, key=lambda lay: lay.replicas)
