"""How bf16 linears compute a prompt on the CPU: in fp32 where torch's bf16 GEMM is slow.

torch runs a bf16 matrix product through oneDNN only where oneDNN has bf16 on the CPU
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: AVX512 cores, AVX512-BF16, AMX). Elsewhere
(e.g. AVX2-only CPUs) it falls back to its own generic bf16 GEMM, which for a 128-token prompt
is 2-3x slower than MKL's fp32 SGEMM on the same numbers (``benchmarks/bench_prefill.py``). A
one-token decode step is a matrix-vector product bound by memory traffic, where bf16 weights
(half the bytes) win. So on such CPUs ``UpcastLinear`` keeps the bf16 weights and, for inputs
of at least ``min_rows`` rows (a prompt), copies the weight block by block into one reused
fp32 buffer and multiplies in fp32; fewer rows (decode) take torch's bf16 path as before.

The arithmetic is the same: a bf16 x bf16 product is exact in fp32, both paths accumulate in
fp32 and round the output once to bf16; only the summation order differs. ``LLMCHAT_PREFILL``
forces a path (``native``: torch's bf16 always; ``fp32``: upcast from 2 rows), for benchmarks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_ROWS = 64  # below ~45 rows torch's own bf16 GEMM was faster here (bench_prefill.py)
CHUNK_ELEMS = 1 << 22  # weights upcast per block: a 16 MiB fp32 buffer, reused


@dataclass(frozen=True)
class PrefillPath:
    """``name``: ``native`` (torch's bf16 GEMM) or ``fp32`` (upcast from ``min_rows`` rows)."""

    name: str
    min_rows: int = 0
    note: str = ""

    def describe(self) -> str:
        what = ("bf16 matmul as is" if self.name == "native"
                else f"prompts of {self.min_rows}+ tokens computed in fp32 from the bf16 weights")
        return f"{what} ({self.note})" if self.note else what


def onednn_bf16() -> bool:
    """Whether torch's bf16 matmuls on this CPU go through oneDNN's bf16 kernels."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op gone: assume the fast path exists
        return True


def select_prefill(device: torch.device, dtype: torch.dtype) -> PrefillPath | None:
    """The path for float ``dtype`` weights on ``device``; None where there is no choice."""
    if device.type != "cpu" or dtype != torch.bfloat16:
        return None
    forced = os.environ.get("LLMCHAT_PREFILL", "").strip().lower()
    if forced == "native":
        return PrefillPath("native", note="LLMCHAT_PREFILL=native")
    if forced == "fp32":
        return PrefillPath("fp32", 2, note="LLMCHAT_PREFILL=fp32")
    cap = torch.backends.cpu.get_cpu_capability()
    if onednn_bf16():
        return PrefillPath("native", note=f"oneDNN has bf16 on this CPU, {cap}")
    return PrefillPath("fp32", MIN_ROWS, note=f"oneDNN has no bf16 on this CPU, {cap}")


class UpcastLinear(nn.Linear):
    """``nn.Linear`` (same parameters) whose inputs of ``min_rows``+ rows compute in fp32."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, min_rows: int,
                 scratch: dict[str, Tensor], device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.min_rows = min_rows
        self._scratch = scratch  # one fp32 buffer per model, shared by every layer

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if rows < self.min_rows:
            return super().forward(x)
        k, n = self.in_features, self.out_features
        x32 = x.reshape(rows, k).float()
        y = x.new_empty(rows, n)
        step = max(1, CHUNK_ELEMS // k)
        buf = self._buffer(min(step, n) * k)
        for r in range(0, n, step):
            w = self.weight[r : r + step]
            w32 = buf[: w.numel()].view(w.shape).copy_(w)  # (rows of W, K) in fp32
            b = None if self.bias is None else self.bias[r : r + step].float()
            y[:, r : r + step] = F.linear(x32, w32, b)  # rounded once to the input dtype
        return y.reshape(*x.shape[:-1], n)

    def _buffer(self, numel: int) -> Tensor:
        buf = self._scratch.get("fp32")
        if buf is None or buf.numel() < numel or buf.device != self.weight.device:
            buf = torch.empty(numel, dtype=torch.float32, device=self.weight.device)
            self._scratch["fp32"] = buf
        return buf

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp32 from {self.min_rows} rows"


def prepare_prefill(model: nn.Module, linears: Sequence[str], device: torch.device,
                    dtype: torch.dtype) -> dict[str, Any]:
    """Swap the plain ``nn.Linear`` layers named by ``linears`` (suffixes) of a meta-built model
    for ``UpcastLinear`` where ``select_prefill`` says so. Returns ``{"prefill_path": ...}``
    for ``LoadInfo.extra`` (empty where there is no choice)."""
    path = select_prefill(torch.device(device), dtype)
    if path is None:
        return {}
    swapped = 0
    if path.name == "fp32":
        scratch: dict[str, Tensor] = {}
        for name, mod in list(model.named_modules()):
            if type(mod) is not nn.Linear:  # quantized or already swapped layers stay
                continue
            if not any(name == s or name.endswith("." + s) for s in linears):
                continue
            new = UpcastLinear(mod.in_features, mod.out_features, mod.bias is not None,
                               min_rows=path.min_rows, scratch=scratch,
                               device=mod.weight.device, dtype=mod.weight.dtype)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            swapped += 1
        if not swapped:
            return {}
    extra = {"prefill_path": path.describe()}
    model.prefill_extra = extra  # read by the loader into LoadInfo.extra
    return extra
