"""Weight-only INT8/INT4 quantization: upstream ChatGLM semantics, PyTorch's own kernels.

* ``layout`` — the upstream layout (identical for quantizing on the fly and for the official
  pre-quantized checkpoints): quantize, pack, dequantize.
* ``backends`` — one class per kernel (packing, matmul, read-back) and ``select_backend``, the
  one place that picks a layer's backend from its width, shape, device and activation dtype.
* ``linear`` — ``QuantizedLinear`` (inference, and backward to its input with frozen weights)
  and ``prepare_model``, which swaps a model's linears and returns a ``QuantSummary``.
* ``cache`` — the result of quantizing a float checkpoint on the fly, kept as safetensors in the
  upstream layout so the next start loads it directly.
"""

from llmchat.quant import layout
from llmchat.quant.backends import (
    Backend,
    Dequant,
    Int4PackCPU,
    Int4PackCUDA,
    Int8PackMM,
    select_backend,
)
from llmchat.quant.layout import (
    QMAX,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)
from llmchat.quant.linear import (
    QuantizationWarning,
    QuantizedLinear,
    QuantSummary,
    prepare_model,
    resolve_bits,
    summarize,
)

__all__ = [
    "QMAX", "Backend", "Dequant", "Int4PackCPU", "Int4PackCUDA", "Int8PackMM",
    "QuantSummary", "QuantizationWarning", "QuantizedLinear", "dequantize_weight", "layout",
    "pack_int4", "prepare_model", "quantize_weight", "resolve_bits", "select_backend",
    "summarize", "unpack_int4",
]
