"""How the float linears of a model multiply on the CPU: oneDNN-packed weights, or fp32 prompts.

Three paths, picked per model from what the CPU has (``select_cpu_linear``), each measured in
``benchmarks/bench_prefill.py`` and ``benchmarks/compare_llamacpp.py``:

* ``packed`` — the weight is reordered once, after loading, into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``; same bytes, it replaces the plain weight) and
  multiplied by oneDNN (``_linear_pointwise``). A one-token decode step then streams the weight at
  memory bandwidth, where torch's own bf16 matrix-vector product reaches about half of it (AVX512
  Zen 4, 2 threads, 4096->27392 bf16: 6.5 vs 12.6 ms), and prompts are a little faster too; fp32
  weights skip MKL's SGEMM, slow on AMD CPUs (128 rows: 71 vs 253 ms). Used on x86-64 for fp32
  wherever torch has oneDNN, for bf16 where oneDNN has bf16 on the CPU (AVX512 cores,
  AVX512-BF16, AMX).
* ``upcast`` — CPUs without oneDNN bf16 (AVX2-only): torch's bf16 GEMM falls back to a generic
  routine, 2-3x slower for a 128-token prompt than MKL's fp32 SGEMM on the same numbers. Inputs
  of at least ``MIN_ROWS`` rows (a prompt) copy the bf16 weight block by block into one reused
  fp32 buffer and multiply in fp32; fewer rows (decode, where bf16's half bytes win) take torch's
  bf16 path.
* ``native`` — torch's own matmul, as is (fp16, other devices, and ``LLMCHAT_CPU_LINEAR=native``).

The arithmetic is the same on every path: bf16 x bf16 products are exact in fp32, every path
accumulates in fp32 and rounds the output once; only the summation order differs.
``LLMCHAT_CPU_LINEAR=native|upcast|packed`` forces a path (benchmarks, tests).

Packed weights have no backward pass, so a model loaded for training (``training=True``: P-tuning
sends gradients through the frozen linears to the prefix) keeps plain weights.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmchat.errors import UsageError

MIN_ROWS = 64  # upcast: below ~45 rows torch's own bf16 GEMM was faster (bench_prefill.py)
CHUNK_ELEMS = 1 << 22  # upcast: weights per block, a 16 MiB fp32 buffer, reused
PACK_BATCH = 128  # the batch-size hint oneDNN packs for (decode and prompts alike were fastest)
ENV = "LLMCHAT_CPU_LINEAR"


@dataclass(frozen=True)
class CpuLinearPath:
    """``name``: ``native``, ``upcast`` (fp32 from ``min_rows`` rows) or ``packed``."""

    name: str
    min_rows: int = 0
    note: str = ""

    def describe(self) -> str:
        what = {
            "native": "torch's matmul as is",
            "upcast": f"prompts of {self.min_rows}+ tokens computed in fp32 from the bf16 weights",
            "packed": "weights packed for oneDNN",
        }[self.name]
        return f"{what} ({self.note})" if self.note else what


def onednn_bf16() -> bool:
    """Whether torch's bf16 matmuls on this CPU go through oneDNN's bf16 kernels."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op gone: assume the fast path exists
        return True


def _can_pack() -> bool:
    """oneDNN packing is used on x86-64 only, where it was measured (oneDNN on ARM is another
    code base, with its own kernels)."""
    return bool(platform.machine().lower() in ("x86_64", "amd64")
                and torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def select_cpu_linear(device: torch.device, dtype: torch.dtype, *,
                      training: bool = False) -> CpuLinearPath | None:
    """The path for ``dtype`` weights on ``device``; None where there is no choice."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return None
    forced = os.environ.get(ENV, "").strip().lower()
    if forced not in ("", "native", "upcast", "packed"):
        raise UsageError(f"{ENV}={forced!r}: use native, upcast (bf16 only) or packed, or unset it")
    if forced == "native":
        return CpuLinearPath("native", note=f"{ENV}=native")
    if forced == "upcast" and dtype == torch.bfloat16:
        return CpuLinearPath("upcast", 2, note=f"{ENV}=upcast")
    if forced == "packed" and not training:
        return CpuLinearPath("packed", note=f"{ENV}=packed")
    cap = torch.backends.cpu.get_cpu_capability()
    bf16 = dtype == torch.bfloat16
    if not training and _can_pack() and (not bf16 or onednn_bf16()):
        return CpuLinearPath("packed", note=f"oneDNN{' has bf16' if bf16 else ''} on this "
                                            f"CPU, {cap}")
    if bf16 and not onednn_bf16():
        return CpuLinearPath("upcast", MIN_ROWS, note=f"oneDNN has no bf16 on this CPU, {cap}")
    return None  # fp32 without oneDNN, or training on a CPU with oneDNN bf16


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose ``weight`` becomes oneDNN's packed layout once loaded (``pack``).

    After ``pack`` the ``weight`` buffer is an opaque oneDNN tensor (same dtype, shape and bytes);
    only this module's ``forward`` can multiply by it, for inference only."""

    def pack(self) -> None:
        if self.weight.is_mkldnn:
            return
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_BATCH)
        del self.weight
        self.register_buffer("weight", packed)

    def forward(self, x: Tensor) -> Tensor:
        if not self.weight.is_mkldnn:  # not packed yet (or a load that failed half way)
            return super().forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("this model's CPU weights are packed for oneDNN, which has no "
                               "backward pass; load it with training=True to train through it")
        y: Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return y

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.is_mkldnn:  # state_dict() holds plain tensors (oracles, tools)
            destination[prefix + "weight"] = self.weight.to_dense()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed for oneDNN"


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


def prepare_cpu_linears(model: nn.Module, device: torch.device, dtype: torch.dtype, *,
                        training: bool = False) -> None:
    """Swap the plain ``nn.Linear`` layers of a meta-built model (quantized ones stay) for the
    path ``select_cpu_linear`` picks, and note it as ``model.cpu_linear_extra``
    (``{"cpu_linear": ...}``, which the loader puts in ``LoadInfo.extra`` for ``--verbose``).
    Call ``finish_cpu_linears`` once the weights are loaded."""
    path = select_cpu_linear(torch.device(device), dtype, training=training)
    if path is None:
        return
    if path.name != "native":
        scratch: dict[str, Tensor] = {}
        swapped = 0
        for name, mod in list(model.named_modules()):
            if type(mod) is not nn.Linear:
                continue
            args = (mod.in_features, mod.out_features, mod.bias is not None)
            where = {"device": mod.weight.device, "dtype": mod.weight.dtype}
            new = (PackedLinear(*args, **where) if path.name == "packed"
                   else UpcastLinear(*args, min_rows=path.min_rows, scratch=scratch, **where))
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            swapped += 1
        if not swapped:
            return
    model.cpu_linear_extra = {"cpu_linear": path.describe()}


def finish_cpu_linears(model: nn.Module) -> None:
    """Pack the loaded weights of every ``PackedLinear`` (one layer at a time)."""
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            mod.pack()
