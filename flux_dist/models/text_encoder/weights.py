"""Where a (cut) encoder's weights come from: seeded random, a loaded module, or safetensors slices."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ...errors import FluxDistError
from .cut import decoder_of

# ------------------------------------------------------------------------------------------------
# weights: one protocol for random, in-memory and safetensors sources


class WeightSource:
    """Gives a parameter's values (or only rows / columns of it) by the decoder's parameter name.

    ``read`` is called once per parameter of the decoder, in ``named_parameters()`` order.
    """

    def read(self, name: str, shape: tuple[int, ...], index: tuple[Any, ...], device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class RandomWeights(WeightSource):
    """Seeded random weights drawn on the device: matrices ``N(0, 0.02)``, RMSNorm gains 1.

    The full tensor is drawn every time (then indexed), so a shard equals the same rows of the
    unsharded weight, and a truncated encoder's weights are the whole one's first layers: the draws
    follow the decoder's ``named_parameters()`` order, which is a prefix of the whole decoder's.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}

    def _gen(self, device: torch.device) -> torch.Generator:
        if device not in self._gens:
            self._gens[device] = torch.Generator(device).manual_seed(self.seed)
        return self._gens[device]

    def read(self, name, shape, index, device, dtype):
        if len(shape) >= 2:
            full = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=self._gen(device))
        elif name.endswith("norm.weight"):
            full = torch.ones(shape, device=device, dtype=dtype)
        else:
            raise FluxDistError(f"random text encoder: no rule for parameter {name} {tuple(shape)}")
        return full[index].contiguous() if index else full

    def describe(self) -> str:
        return f"random(seed={self.seed})"


class ModuleWeights(WeightSource):
    """The tensors of an already built encoder (a tiny preset, a model loaded with from_pretrained)."""

    def __init__(self, model: nn.Module) -> None:
        decoder, _ = decoder_of(model)
        self.sd = dict(decoder.named_parameters())

    def read(self, name, shape, index, device, dtype):
        t = self.sd[name].detach()
        return (t[index] if index else t).to(device=device, dtype=dtype).contiguous()


class SafetensorsWeights(WeightSource):
    """A text_encoder folder (one file or a sharded index); only the requested rows / columns are read."""

    PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")

    def __init__(self, folder: str) -> None:
        from safetensors import safe_open

        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
            files = {k: os.path.join(folder, v) for k, v in wm.items()}
        elif os.path.exists(os.path.join(folder, "model.safetensors")):
            path = os.path.join(folder, "model.safetensors")
            with safe_open(path, "pt") as f:
                files = dict.fromkeys(f.keys(), path)
        else:
            raise FluxDistError(f"{folder}: no model.safetensors (nor model.safetensors.index.json)")
        self.files = files
        self.folder = folder
        self._open: dict[str, Any] = {}

    def _key(self, name: str) -> str:
        for p in self.PREFIXES:
            if p + name in self.files:
                return p + name
        raise FluxDistError(f"{self.folder}: no tensor for text encoder parameter {name!r}")

    def read(self, name, shape, index, device, dtype):
        from safetensors import safe_open

        key = self._key(name)
        path = self.files[key]
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        sl = self._open[path].get_slice(key)
        t = sl[index] if index else sl[:]
        t = t.to(device=device, dtype=dtype).contiguous()
        # a fresh, aligned allocation like a built model's (CPU kernels round differently on unaligned data)
        return t.clone() if t.device.type == "cpu" and t.data_ptr() % 64 else t

    def describe(self) -> str:
        return f"safetensors({self.folder})"


def _rebuild_rotary_(decoder: nn.Module, device: torch.device) -> None:
    """RoPE tables are computed buffers: make them fresh (float32) on ``device`` rather than from_empty."""
    rot = decoder.rotary_emb
    with torch.device("cpu"):
        new = type(rot)(config=decoder.config)
    decoder.rotary_emb = new.to(device)


def materialize_(decoder: nn.Module, source: WeightSource, device: torch.device, dtype: torch.dtype,
                 local_index: Callable[[str, nn.Parameter], tuple[Any, ...]] | None = None) -> nn.Module:
    """Fill a meta decoder (possibly tensor-parallel: DTensor parameters) from ``source``, one tensor at a
    time, straight on ``device``: no copy of the whole encoder exists anywhere but in its final place.

    ``local_index(name, param)`` gives the slice of the unsharded tensor this rank holds (a sharded
    parameter), or ``()`` for the whole tensor.
    """
    from torch.distributed.tensor import DTensor

    for name, p in list(decoder.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = decoder.get_submodule(owner_name) if owner_name else decoder
        index = local_index(name, p) if local_index else ()
        orig_shape = getattr(owner, "_flux_dist_orig_shape", {}).get(leaf, tuple(p.shape))
        t = source.read(name, orig_shape, index, device, dtype)
        if isinstance(p, DTensor):
            t = DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        setattr(owner, leaf, nn.Parameter(t, requires_grad=False))
    _rebuild_rotary_(decoder, device)
    return decoder
