"""The adapter bank: every loaded LoRA stacked in each targeted linear, weighted per request by data.

A targeted linear computes ``base(x) + B (s * (A x))`` where ``A`` is ``[slots * rank, in]`` (each
adapter's ``A`` in its slot, zero-padded to the bank's rank for this linear), ``B`` is
``[out, slots * rank]`` (with each adapter's ``alpha / r`` folded in) and ``s`` the per-slot scales of
the request, repeated over the slot's rank. An unused slot has scale 0 and adds exactly 0; the base
weight is never touched, whatever its format. The scales are one float32 tensor shared by every
``LoraLinear`` and written in place, so a compiled region or a CUDA graph sees new adapters as new data
and is reused.

Cost (``bench/lora_count.py``): the two GEMMs are skinny (width ``slots * rank``) and cheap in FLOPs;
what costs is memory traffic over the base output ``[tokens, out]``. The delta is therefore added *in
place* into the base GEMM's output (``ops.lora_addmm_``: one read and one write of it), and where the
model says the output feeds a SwiGLU (``LoraLinear.swiglu``, ``LoraSwiGLU``) it is added inside the
activation's kernel (``ops.lora_swiglu``: no extra pass at all).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import FluxDistError
from .ops import lora_addmm_, lora_swiglu

IMPLS = ("inplace", "v1")


@dataclass(frozen=True)
class LoraWeights:
    """One adapter on one source linear: ``delta(x) = scaling * b @ a @ x``."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float  # peft's alpha / r (or alpha / sqrt(r) for rsLoRA); the request's scale multiplies it


@dataclass(frozen=True)
class Piece:
    """Output rows ``out`` of a runtime linear: ``source(x)[..., rows]``, where only the input columns
    ``cols`` of ``source`` see this linear's input (a fused linear is several pieces, one after another;
    a row split is one piece with ``rows``; a column split one piece with ``cols``)."""

    source: str
    out: int
    rows: slice | None = None
    cols: slice | None = None


class LoraLinear(nn.Module):
    """``base(x)`` plus every slot's ``scale * B (A x)``; ``base`` is any linear (bf16, FP8, NVFP4)."""

    # "inplace": the delta accumulated into the base output in place (and into a SwiGLU's kernel where the model
    # asks); "v1": the first bank's ``y + B (s * (A x))`` (4 passes over the output once compiled), kept selectable
    # to measure against. Read when a LoraLinear is built (``attach(impl=...)`` or this default).
    impl: str = "inplace"

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                 impl: str | None = None) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.slots = a.shape[1], b.shape[0], scales.shape[0]
        self.impl = impl or type(self).impl
        if self.impl not in IMPLS:
            raise FluxDistError(f"unknown LoRA bank implementation {self.impl!r} (choose from {', '.join(IMPLS)})")
        self.register_buffer("lora_a", a)  # [slots * rank, in]
        self.register_buffer("lora_b", b)  # [out, slots * rank], scaling folded in
        self.register_buffer("lora_scales", scales, persistent=False)  # [slots] float32, shared, written per request

    def extra_repr(self) -> str:
        return f"slots={self.slots}, rank={self.lora_a.shape[0] // self.slots}, impl={self.impl}"

    @property
    def fuses(self) -> bool:
        """Whether ``swiglu`` adds the delta inside the activation (else: the caller's activation after ``forward``)."""
        return self.impl == "inplace"

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``h = s * (A x)`` ``[..., slots * rank]`` in ``B``'s dtype: the request's scales applied per slot."""
        h = F.linear(x.to(self.lora_a.dtype), self.lora_a)
        return (h.unflatten(-1, (self.slots, -1)) * self.lora_scales[:, None]).flatten(-2).to(self.lora_b.dtype)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base(x), h)``: the base output without the delta, and the rank-space activations."""
        return self.base(x), self.project(x)

    def add_(self, y: torch.Tensor, h: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``y`` (from ``parts``) with the delta's output rows ``start:stop`` added to its columns ``start:stop``:
        in place where ``y`` allows it (returned either way)."""
        b = self.lora_b[start:stop]
        if self.impl == "inplace" and y.dtype == b.dtype and y.is_contiguous():
            lora_addmm_(y, h, b, start)
            return y
        if start == 0 and b.shape[0] == y.shape[-1]:
            return y + F.linear(h, b).to(y.dtype)
        y = y.clone()
        y[..., start:start + b.shape[0]] += F.linear(h, b).to(y.dtype)
        return y

    def swiglu(self, y: torch.Tensor, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``silu(g) * u`` of ``[g | u]`` = columns ``start:`` of ``y`` plus their delta (a SwiGLU after this linear),
        the delta added inside the activation's kernel."""
        if self.fuses and y.dtype == self.lora_b.dtype and y.is_contiguous():
            return lora_swiglu(y, h, self.lora_b[start:], start)
        g, u = self.add_(y, h, start)[..., start:].chunk(2, dim=-1)
        return F.silu(g) * u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_(*self.parts(x))


class LoraSwiGLU(nn.Module):
    """``silu(g) * u`` of ``[g | u] = lin(x)``: a ``LoraLinear`` and the SwiGLU after it as one module, where the
    model's feed-forward has them as two (``linear_in`` then the activation: the adapter puts this module in
    ``linear_in``'s place and an identity in the activation's)."""

    def __init__(self, lin: LoraLinear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin.swiglu(*self.lin.parts(x))


@dataclass
class LoraBank:
    """The loaded adapters (slot order = ``names``) and the scales tensor every ``LoraLinear`` reads."""

    names: tuple[str, ...]
    scales: torch.Tensor
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # per adapter: path, ranks, modules, ...
    wrapped: int = 0  # how many runtime linears carry the bank

    def select(self, chosen: Mapping[str, float] | None) -> None:
        """This request's adapters and scales (others 0), written in place (no new tensor, no recompile)."""
        v = torch.zeros(len(self.names), dtype=torch.float32)
        for name, scale in (chosen or {}).items():
            if name not in self.names:
                raise FluxDistError(f"unknown LoRA adapter {name!r} (loaded: {', '.join(self.names)})")
            v[self.names.index(name)] = float(scale)
        self.scales.copy_(v)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": n, **self.info.get(n, {})} for n in self.names]


def _check(name: str, weights: Mapping[str, LoraWeights], shapes: Mapping[str, tuple[int, int]]) -> None:
    if not weights:
        raise FluxDistError(f"LoRA {name!r} holds no LoRA weights for this model")
    for src, w in weights.items():
        if src not in shapes:
            raise FluxDistError(f"LoRA {name!r} targets module {src!r}, which this model does not have as a linear")
        n_in, n_out = shapes[src]
        a, b = w.a, w.b
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[1] != n_in or b.shape[0] != n_out:
            raise FluxDistError(f"LoRA {name!r} does not fit module {src!r}: lora_A {tuple(a.shape)} and lora_B "
                                f"{tuple(b.shape)}, the module is {n_in} -> {n_out} (lora_A [r, {n_in}], lora_B "
                                f"[{n_out}, r] expected): an adapter for another model?")


def _fuse(weights: Mapping[str, LoraWeights], pieces: list[Piece]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One adapter's ``(A [r, in], B [out, r])`` on a runtime linear made of ``pieces`` (float32), or None
    where the adapter touches none of them. Pieces stack along the rank: ``A`` concatenated, ``B`` block
    diagonal, so piece ``i``'s rows see only its own source's LoRA."""
    parts = [(p, weights.get(p.source)) for p in pieces]
    if all(w is None for _, w in parts):
        return None
    a_list = [w.a.float()[:, p.cols or slice(None)] for p, w in parts if w is not None]
    a = torch.cat(a_list)
    b = torch.zeros(sum(p.out for p in pieces), a.shape[0], dtype=torch.float32, device=a.device)
    row = col = 0
    for p, w in parts:
        if w is not None:
            r = w.a.shape[0]
            b[row:row + p.out, col:col + r] = w.b.float()[p.rows or slice(None)] * w.scaling
            col += r
        row += p.out
    return a, b


def attach(root: nn.Module, adapters: Mapping[str, Mapping[str, LoraWeights]], targets: Mapping[str, list[Piece]],
           shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype, device: torch.device,
           info: dict[str, dict[str, Any]] | None = None, impl: str | None = None) -> LoraBank:
    """Swap every runtime linear of ``root`` that some adapter touches for a ``LoraLinear`` holding all of them.

    ``adapters``: name -> {source module -> weights}; ``targets``: runtime linear name -> its pieces;
    ``shapes``: source module -> (in, out). A source module the model does not have, or weights of the
    wrong shape, is a ``FluxDistError`` naming the adapter and the module (before anything is swapped).
    """
    names = tuple(adapters)
    for name in names:
        _check(name, adapters[name], shapes)
    scales = torch.zeros(len(names), dtype=torch.float32, device=device)
    bank = LoraBank(names, scales, info or {})
    for target, pieces in targets.items():
        fused = [_fuse(adapters[n], pieces) for n in names]
        if all(f is None for f in fused):
            continue
        base = root.get_submodule(target)
        rank = max(f[0].shape[0] for f in fused if f is not None)
        a = torch.zeros(len(names) * rank, base.in_features, dtype=torch.float32)
        b = torch.zeros(base.out_features, len(names) * rank, dtype=torch.float32)
        for slot, f in enumerate(fused):
            if f is not None:
                r = f[0].shape[0]
                a[slot * rank:slot * rank + r] = f[0]
                b[:, slot * rank:slot * rank + r] = f[1]
        parent, _, leaf = target.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        setattr(owner, leaf, LoraLinear(base, a.to(device, dtype), b.to(device, dtype), scales, impl))
        bank.wrapped += 1
    return bank
