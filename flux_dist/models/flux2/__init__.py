"""The FLUX.2 adapter ([dev] and [klein]): everything the engine needs to know about FLUX.2.

``attention``: the blocks' sequence-parallel processors and fusions; ``step``: one transformer pass
in pieces (block stack, regions outside it); ``pipeline``: the request's ends (prompt, noise,
schedule, decode); ``references``: reference images (editing) checked, resized, VAE-encoded, packed and
given their ids as the pipelines do; ``quant_plan``: which linears run in low precision. ``Flux2Adapter`` gathers them
behind the interface the engine calls (``models.ModelAdapter``).
"""

from __future__ import annotations

from typing import Any

import torch

from ...cache import CacheHooks
from ...parallel.attention import AttnContext
from ...stack import BlockStack
from ..components import Components
from . import lora, pipeline, references, step
from .attention import fuse_qkv, parallelize, split_for_overlap, split_out
from .quant_plan import QUANTIZED, load_quantized, quantize_block, quantize_transformer
from .step import EAGER, StepFns, StepInputs, forward, image_stack, modulations, prepare

# FLUX.2 [dev]'s TeaCache polynomial published by NVIDIA (highest power first; docs/facts.md).
FLUX2_DEV_TEACACHE = [1.04582360e02, -6.87605554e00, -8.61659379e-02, 5.37600252e-02]

__all__ = ["EAGER", "FLUX2_DEV_TEACACHE", "QUANTIZED", "Flux2Adapter", "StepFns", "StepInputs", "forward",
           "fuse_qkv", "image_stack", "load_quantized", "modulations", "parallelize", "prepare", "quantize_block",
           "quantize_transformer", "split_for_overlap", "split_out"]


class Flux2Adapter:
    """One loaded FLUX.2 model seen through the engine's interface (request ends and step pieces)."""

    step_fns: StepFns = EAGER
    stack: BlockStack = staticmethod(step.image_stack)

    def __init__(self, c: Components, device: torch.device) -> None:
        self.c, self.device = c, device
        self.tr = c.transformer.eval()
        self.name = c.name
        self.true_cfg = c.family == "klein" and not c.is_distilled
        self.image_multiple = max(16, 2 * pipeline.vae_scale(c))  # pixels per token side, at least 16
        self.teacache_coefficients = list(FLUX2_DEV_TEACACHE) if c.family == "dev" else None
        self.prompt_encoder: Any = None  # the cut encoder at its placement (models.attach_text_encoder)

    # -- build steps ------------------------------------------------------------------------------
    def quantize(self, mode: str) -> int:
        return quantize_transformer(self.tr, mode)

    def parallelize(self, ctx: AttnContext) -> None:
        parallelize(self.tr, ctx)

    def load_lora(self, adapters: dict[str, str], dtype: torch.dtype) -> Any:
        """Attach every ``{name: path}`` LoRA to the parallelized transformer (a ``lora.LoraBank``, maybe empty)."""
        return lora.load_lora(self.tr, adapters, dtype, self.device)

    def blocks(self) -> list[torch.nn.Module]:
        """The repeated blocks, each compiled as one region."""
        return [*self.tr.transformer_blocks, *self.tr.single_transformer_blocks]

    def cache_hooks(self, stack: BlockStack, fns: StepFns) -> CacheHooks:
        return CacheHooks(signal=fns.signal, change=fns.change, stack=stack, first_block=step.first_block,
                          rest=step.rest_blocks)

    @property
    def text_encoder_label(self) -> str:
        enc = self.prompt_encoder.encoder if self.prompt_encoder is not None else self.c.text_encoder
        if self.prompt_encoder is None and enc is None:
            return "random-embeddings"
        return type(enc).__name__ if enc is not None else "elsewhere"  # first / offload: rank 0 holds it

    def text_metrics(self) -> dict:
        return self.prompt_encoder.metrics() if self.prompt_encoder is not None else {"placement": "none"}

    # -- the request ------------------------------------------------------------------------------
    def encode(self, prompts: list[str], max_len: int, seed: int,
               dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prompt embeddings ``[1, T, joint_dim]`` and their position ids, identical on every rank (every
        rank passes the same prompts: the placements other than ``every`` are collectives)."""
        if self.prompt_encoder is not None:
            embs = self.prompt_encoder.encode(prompts, max_len)
        else:  # seeded random embeddings (text_encoder: none), or a whole encoder kept by the caller
            embs = [pipeline.encode_prompt(self.c, p, max_len, seed, self.device, dtype) for p in prompts]
        return [(e, pipeline.text_ids(e)) for e in embs]

    def noise(self, height: int, width: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return pipeline.noise(self.c, height, width, seed, self.device, dtype)

    def references(self, images: list[Any],
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Reference tokens ``[1, R, C]``, their ids ``[1, R, 4]`` and processed sizes (``R = 0`` without images)."""
        return references.encode(self.c, images, self.device, dtype)

    def schedule(self, steps: int, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return pipeline.schedule(self.c.scheduler, steps, image_seq_len, self.device)

    def prepare(self, emb: torch.Tensor, ids: torch.Tensor, img_ids: torch.Tensor, guidance: float) -> StepInputs:
        """Per-request step inputs from this rank's text and image shards."""
        g = None
        if self.tr.config.guidance_embeds:  # [dev]: guidance is an input of the model, not a second branch
            g = torch.full([1], guidance, device=self.device, dtype=torch.float32).expand(1)
        return step.prepare(self.tr, emb, ids, img_ids, g)

    def forward(self, x: torch.Tensor, t: torch.Tensor, inp: StepInputs, stack: BlockStack,
                fns: StepFns) -> torch.Tensor:
        return step.forward(self.tr, x.to(self.tr.dtype), t, inp, stack, fns)

    def decode(self, latents: torch.Tensor, ids: torch.Tensor) -> Any:
        return pipeline.decode(self.c, latents, ids)
