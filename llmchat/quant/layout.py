"""Upstream ChatGLM quantized format: quantize, pack and dequantize (REFERENCE.md §2.7, §3.6).

Per output row, symmetric, ``scale = absmax / 127`` (int8) or ``absmax / 7`` (int4) rounded to
fp16, ``q = round(W / scale)`` computed in fp16 like upstream (which quantizes the fp16 model),
int4 packed two per byte with the even column in the high nibble: ``weight`` int8
``[out, in * bits / 8]`` + ``weight_scale`` ``[out]`` (+ fp16 ``bias``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmchat.errors import QuantizationError

QMAX = {8: 127, 4: 7}
CHUNK_ELEMS = 1 << 22  # rows are processed in blocks of about this many weights (bounded temps)


def quantize_weight(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Float ``[out, in]`` → (int8 ``[out, in]`` or packed int4 ``[out, in/2]``, fp16 scale).

    Upstream's arithmetic, op for op in fp16: ``scale = absmax / qmax``,
    ``q = round(w / scale)`` (round half to even). All-zero rows get scale 0 and q 0.
    """
    if bits not in QMAX:
        raise QuantizationError(f"unsupported bit width {bits}; use 8 or 4")
    out_f, in_f = w.shape
    if bits == 4 and in_f % 2:
        raise QuantizationError(f"int4 packs two weights per byte; in_features {in_f} is odd")
    scales, parts = [], []
    step = max(1, CHUNK_ELEMS // max(in_f, 1))
    for r in range(0, out_f, step):
        w16 = w[r : r + step].to(torch.float16)  # upstream quantizes the fp16 model
        scale = w16.abs().amax(dim=1) / QMAX[bits]  # fp16 [rows]
        q = torch.round(w16 / scale[:, None]).nan_to_num_(0.0).to(torch.int8)  # 0/0 rows → 0
        scales.append(scale)
        parts.append(pack_int4(q) if bits == 4 else q)
    return torch.cat(parts), torch.cat(scales)


def pack_int4(q: Tensor) -> Tensor:
    """int8 in [-8, 7] ``[out, in]`` → int8 ``[out, in/2]``, even column in the high nibble."""
    hi = q[:, 0::2].to(torch.uint8) << 4
    lo = q[:, 1::2].to(torch.uint8) & 0x0F
    return (hi | lo).view(torch.int8)


def unpack_int4(packed: Tensor) -> Tensor:
    """int8 ``[out, in/2]`` → sign-extended int8 ``[out, in]`` (inverse of ``pack_int4``)."""
    hi = packed >> 4  # arithmetic shift keeps the sign
    lo = (packed << 4) >> 4
    return torch.stack((hi, lo), dim=-1).flatten(-2)  # (out, in/2, 2) -> (out, in)


def dequantize_weight(weight: Tensor, scale: Tensor, bits: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """Upstream-layout tensors → float ``[out, in]``: ``q * scale`` exact in fp32, rounded once."""
    q = unpack_int4(weight) if bits == 4 else weight
    return scale_rows(q, scale, dtype)


def scale_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Signed integers ``[rows, in]`` times their row scale, exact in fp32, rounded once."""
    return (q.float() * scale.float()[:, None]).to(dtype)
