"""Low-precision linears and their checkpoints (model-agnostic: the model adapter says which linears).

``numerics``: FP8 / NVFP4 quantize and dequantize; ``linear``: ``QuantLinear`` and its slice /
concat, mode resolution; ``formats``: flux-dist's and NVIDIA ModelOpt's checkpoint formats.
"""

from .formats import FORMATS, QuantPlan, checkpoint_format, load_quantized_into, save_quantized
from .linear import (
    MODES,
    RESOLVED_MODES,
    QuantLinear,
    activation_scaling,
    concat_linears,
    count_quantized,
    loaded_mode,
    quantize_linears,
    resolve_mode,
    set_fast_accum,
    slice_linear,
)
from .numerics import (
    BLOCK,
    FP4_GRID,
    FP4_MAX,
    FP8,
    FP8_MAX,
    dequantize_fp8,
    dequantize_nvfp4,
    quantize_fp8_rowwise,
    quantize_nvfp4,
)

__all__ = ["BLOCK", "FORMATS", "FP4_GRID", "FP4_MAX", "FP8", "FP8_MAX", "MODES", "RESOLVED_MODES", "QuantLinear",
           "QuantPlan", "activation_scaling", "checkpoint_format", "concat_linears", "count_quantized",
           "dequantize_fp8", "dequantize_nvfp4", "load_quantized_into", "loaded_mode", "quantize_fp8_rowwise",
           "quantize_linears", "quantize_nvfp4", "resolve_mode", "set_fast_accum", "save_quantized", "slice_linear"]
