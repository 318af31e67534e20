"""Where the text encoder lives across ranks, and one object every rank calls to get prompt embeddings.

Placements (``model.text_encoder_placement``, ``--text-encoder-placement``):

* ``every``: each rank holds the whole (truncated) encoder and encodes; no collective.
* ``first``: rank 0 alone holds and runs it; the embeddings (shape, then values) are broadcast.
* ``shard``: tensor parallel over all ranks with PyTorch's tensor-parallel API
  (``parallelize_module``: ``ColwiseParallel`` on q/k/v and gate/up, ``RowwiseParallel`` on o and
  down, over a 1-D ``DeviceMesh`` of the world). Each rank holds 1/N of the layers' matrices
  (embedding table and norms replicated); KV heads are replicated where there are fewer than ranks.
  Every rank encodes; rank 0's result is then broadcast so the embeddings are bit-identical
  everywhere (an all-reduce is not promised to be).
* ``offload``: rank 0 holds the weights in host memory and diffusers' group offloading streams
  them to the GPU one decoder layer at a time (on a side stream); embeddings broadcast. On a CPU
  run it is ``first``.
* ``auto``: ``shard`` on CUDA with more than one rank, else ``every``.

Nothing here knows FLUX.2: the model adapter (``models/text_encoder/``) gives the decoder, the
weights and the prompt recipe (``encode_fn``). The names q/k/v/o_proj and gate/up/down_proj are the
Llama-family decoders' (Mistral, Qwen3).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import TextEncoderPlacement, choices
from ..errors import FluxDistError

log = logging.getLogger("flux_dist")

PLACEMENTS = choices(TextEncoderPlacement)
COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def resolve_placement(name: str, device: torch.device, world: int) -> str:
    """``auto`` -> ``shard`` on CUDA with >1 rank, else ``every``; ``offload`` on CPU -> ``first``."""
    if name not in PLACEMENTS:
        raise FluxDistError(f"unknown text encoder placement '{name}' (choose from {', '.join(PLACEMENTS)})")
    if name == "auto":
        return "shard" if device.type == "cuda" and world > 1 else "every"
    if name == "offload" and device.type != "cuda":
        return "first"
    return name


def check_placement(placement: str, world: int, shape: Any) -> None:
    """Refuse, before anything is loaded, a placement the encoder's shape cannot take.

    ``shape`` has ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``.
    """
    if placement not in PLACEMENTS:
        raise FluxDistError(f"unknown text encoder placement '{placement}' (choose from {', '.join(PLACEMENTS)})")
    if placement != "shard" or world == 1:
        return
    h, k, m = shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size
    problems = []
    if h % world:
        problems.append(f"{h} attention heads do not divide by {world} ranks")
    if k % world and world % k:
        problems.append(f"{k} KV heads neither divide by {world} ranks nor divide {world} (to be replicated)")
    if m % world:
        problems.append(f"MLP size {m} does not divide by {world} ranks")
    if problems:
        raise FluxDistError(f"--text-encoder-placement shard cannot split this text encoder over {world} ranks: "
                            f"{'; '.join(problems)}; use every, first or offload")


def module_bytes(module: nn.Module | None) -> int:
    """Parameter + buffer bytes this process holds of ``module`` (a DTensor counts its local shard only)."""
    if module is None:
        return 0
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.device.type == "meta" or local.data_ptr() in seen:
            continue
        seen.add(local.data_ptr())
        total += local.numel() * local.element_size()
    return total


# ------------------------------------------------------------------------------------------------
# tensor parallel


def world_mesh(device: torch.device):
    """A 1-D DeviceMesh of every rank (the default process group)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("te",))


def shard_decoder_(decoder: nn.Module, mesh: Any) -> Callable[[str, nn.Parameter], tuple[Any, ...]]:
    """Make a (meta) Llama-family decoder tensor parallel over ``mesh`` in place with
    ``parallelize_module``; returns ``local_index(name, param)``: the slice of the unsharded tensor this
    rank holds, for ``materialize_``.

    KV heads fewer than ranks (``W % K == 0``): k/v projections are widened to one KV head per rank
    (rank r holds original head ``r // (W / K)``), and each attention's ``num_key_value_groups`` becomes
    its local q heads, so every rank's q heads meet the KV head they used unsharded.
    """
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = mesh.size()
    rank = mesh.get_local_rank()
    cfg = decoder.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rep = world // kv if kv < world else 1
    plan: dict[str, Any] = {}
    for i, layer in enumerate(decoder.layers):
        attn = layer.self_attn
        if rep > 1:
            for leaf in ("k_proj", "v_proj"):
                old = getattr(attn, leaf)
                with torch.device("meta"):
                    new = nn.Linear(old.in_features, world * hd, bias=old.bias is not None, dtype=old.weight.dtype)
                new._flux_dist_orig_shape = {"weight": tuple(old.weight.shape)}
                if old.bias is not None:
                    new._flux_dist_orig_shape["bias"] = tuple(old.bias.shape)
                new._flux_dist_kv_rep = (rep, hd)
                setattr(attn, leaf, new.requires_grad_(False))
        attn.num_key_value_groups = (heads // world) // max(1, (max(kv, world) // world))
        for n in COLWISE:
            plan[f"layers.{i}.{n}"] = ColwiseParallel()
        for n in ROWWISE:
            plan[f"layers.{i}.{n}"] = RowwiseParallel()
    parallelize_module(decoder, mesh, plan, src_data_rank=None)

    def local_index(name: str, p: nn.Parameter) -> tuple[Any, ...]:
        if not isinstance(p, DTensor) or not isinstance(p.placements[0], Shard):
            return ()
        owner = decoder.get_submodule(name.rpartition(".")[0])
        dim = p.placements[0].dim
        if dim == 0 and hasattr(owner, "_flux_dist_kv_rep"):
            r, head_dim = owner._flux_dist_kv_rep
            h = rank // r
            return (slice(h * head_dim, (h + 1) * head_dim),)
        size = p.shape[dim] // world
        sl = slice(rank * size, (rank + 1) * size)
        return (sl,) if dim == 0 else (slice(None), sl)

    return local_index


# ------------------------------------------------------------------------------------------------
# the prompt cache


class PromptCache:
    """LRU of prompt embeddings bounded in bytes. Every rank makes the same calls in the same order with
    tensors of the same sizes, so every rank's cache holds the same keys; ``PromptEncoder`` still makes
    the hit decision common (one all-reduce of a flag) so a divergent cache can never split the ranks."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._d: OrderedDict[Any, tuple[list[torch.Tensor], int]] = OrderedDict()
        self.bytes = 0

    def __contains__(self, key: Any) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Any) -> list[torch.Tensor] | None:
        if key not in self._d:
            return None
        self._d.move_to_end(key)
        return self._d[key][0]

    def put(self, key: Any, value: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in value)
        if size > self.max_bytes:
            return
        if key in self._d:
            self.bytes -= self._d.pop(key)[1]
        self._d[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, s) = self._d.popitem(last=False)
            self.bytes -= s


# ------------------------------------------------------------------------------------------------
# the object the engine calls


EncodeFn = Callable[[nn.Module, Any, str, torch.device, int], torch.Tensor]


class PromptEncoder:
    """Prompt embeddings ``[1, T, D]``, identical on every rank, whatever the placement.

    Every rank must call ``encode`` with the same prompts and length (it runs collectives for every
    placement but ``every`` without a cache). ``encode_fn(encoder, tokenizer, prompt, device, max_len)``
    is the model's recipe; it runs where the placement says.
    """

    def __init__(self, *, placement: str, encoder: nn.Module | None, tokenizer: Any, encode_fn: EncodeFn,
                 identity: str, device: torch.device, rank: int = 0, world: int = 1, cache_mb: float = 0.0,
                 quant: str = "none") -> None:
        if placement not in PLACEMENTS or placement == "auto":
            raise FluxDistError(f"PromptEncoder needs a resolved placement, got '{placement}'")
        self.placement, self.encoder, self.tokenizer = placement, encoder, tokenizer
        self.encode_fn, self.identity, self.device = encode_fn, identity, device
        self.rank, self.world, self.quant = rank, world, quant
        self.cache = PromptCache(int(cache_mb * 2**20))
        self.hits = self.misses = self.encoder_calls = 0
        self.last_encode_s = 0.0
        self.last_hit = False
        self.text_encoder_bytes = module_bytes(encoder)
        self.runs_encoder = placement in ("every", "shard") or rank == 0
        if self.runs_encoder and encoder is None:
            raise FluxDistError(f"text encoder placement '{placement}': rank {rank} has no encoder to run")

    # -- collectives ----------------------------------------------------------------------------
    def _agree_hit(self, hit: bool) -> bool:
        """True only if every rank has the entry (all-reduce MIN of one flag)."""
        if self.world == 1:
            return hit
        flag = torch.tensor([1 if hit else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _broadcast(self, embs: list[torch.Tensor] | None, n: int) -> list[torch.Tensor]:
        """Rank 0's tensors on every rank: one header (dtype and shapes), then each tensor."""
        header = torch.zeros(1 + 4 * n, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            assert embs is not None
            header[0] = _DTYPES.index(embs[0].dtype)
            for i, e in enumerate(embs):
                if e.dim() > 4:
                    raise FluxDistError(f"prompt embedding of {e.dim()} dims: at most 4 are broadcast")
                shp = list(e.shape) + [0] * (4 - e.dim())
                header[1 + 4 * i:5 + 4 * i] = torch.tensor(shp)
        dist.broadcast(header, src=0)
        dtype = _DTYPES[int(header[0])]
        out = []
        for i in range(n):
            shape = [int(s) for s in header[1 + 4 * i:5 + 4 * i].tolist() if s > 0]
            if self.rank == 0:
                t = embs[i].contiguous()
            else:
                t = torch.empty(shape, dtype=dtype, device=self.device)
            dist.broadcast(t, src=0)
            out.append(t)
        return out

    # -- the call -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, prompts: list[str], max_len: int) -> list[torch.Tensor]:
        key = (tuple(prompts), int(max_len), self.identity)
        use_cache = self.cache.max_bytes > 0
        hit = self._agree_hit(key in self.cache) if use_cache else False
        self.last_hit = hit
        if hit:
            self.hits += 1
            self.last_encode_s = 0.0
            return self.cache.get(key)
        self.misses += int(use_cache)
        t0 = time.perf_counter()
        embs = None
        if self.runs_encoder:
            self.encoder_calls += 1
            embs = [self.encode_fn(self.encoder, self.tokenizer, p, self.device, max_len) for p in prompts]
        if self.world > 1 and self.placement != "every":
            embs = self._broadcast(embs, len(prompts))  # shard: rank 0's copy, so all are bit-identical
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_encode_s = time.perf_counter() - t0
        if use_cache:
            self.cache.put(key, embs)
        return embs

    def metrics(self) -> dict:
        return {"placement": self.placement, "text_encoder_bytes": self.text_encoder_bytes,
                "text_encoder_quant": self.quant, "encode_s": round(self.last_encode_s, 4),
                "prompt_cache": {"hits": self.hits, "misses": self.misses, "entries": len(self.cache),
                                 "bytes": self.cache.bytes, "max_bytes": self.cache.max_bytes,
                                 "last_hit": self.last_hit}}
