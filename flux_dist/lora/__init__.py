"""LoRA adapters applied unmerged and chosen per request, over any linear (bf16, FP8, NVFP4).

Model-agnostic: the model adapter reads an adapter file into ``{source module: LoraWeights}`` (its
own names, e.g. diffusers'), and says which of its runtime linears compute which slices of which
source modules (``Piece``: fused q/k/v, row- and column-split projections). ``attach`` then swaps
each targeted linear for a ``LoraLinear`` holding *every* loaded adapter at once, stacked and padded
to one rank (an adapter bank); a request picks adapters and scales by writing one small tensor of
per-slot scales (``LoraBank.select``), so compiled regions and CUDA graphs never change. The delta is
added in place into the base linear's output (``ops.lora_addmm_``), or, where the model says a SwiGLU
follows (``LoraLinear.swiglu``, ``LoraSwiGLU``), inside the activation's kernel (``ops.lora_swiglu``).
"""

from .bank import IMPLS, LoraBank, LoraLinear, LoraSwiGLU, LoraWeights, Piece, attach

__all__ = ["IMPLS", "LoraBank", "LoraLinear", "LoraSwiGLU", "LoraWeights", "Piece", "attach"]
