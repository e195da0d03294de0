"""One class per way of computing a quantized linear, and ``select_backend``, which picks one.

A backend owns the stored layout of the weight (``pack``: upstream layout → stored), the forward
matmul (``linear``) and the read-back (``int_rows``: stored → signed integers, for dequantizing
and for the backward pass). ``select_backend`` is the only place that decides which one a layer
gets, from the bit width, the shape, the device and the activation dtype; its rules are a plain
sequence of checks, easy to change when measurements say so.

* ``Int8PackMM`` — ``torch._weight_int8pack_mm`` (per-row int8, CPU and CUDA) on the upstream int8
  layout itself. With bf16 activations the kernel's scales would have to be bf16, which cannot
  hold the fp16 scales exactly, so it runs with unit scales and the row scale is applied after the
  matmul in fp32. fp32/fp16 scales are exact, so they go into the kernel. Inputs of more than
  ``max_rows`` rows take the dequantize + matmul path (faster for prompts).
* ``Int4PackCPU`` / ``Int4PackCUDA`` — ``torch._weight_int4pack_mm_for_cpu`` /
  ``torch._weight_int4pack_mm`` (CUDA: bf16 only, sm80+). THUDM's signed nibble s becomes s + 8
  (lossless) with group scale 1 and zero 0, so the kernel computes ``x @ s.T`` exactly in its fp32
  accumulator and the fp16 row scale is applied afterwards in fp32. Putting the row scale into the
  kernel's per-group table instead would round it to bf16 (8 bits of mantissa instead of fp16's
  11) and change the weights; this way they are exact.
* Prompts on CPUs where oneDNN has bf16 (AVX512-BF16, AMX): the weight-only kernels above run a
  prompt row by row, while oneDNN's bf16 GEMM does the whole product at once. The integers
  themselves (|q| <= 128) are exact in bf16, so inputs of at least ``prompt_rows`` rows convert
  the stored integers block by block to bf16 (int8: a cast; the CPU int4 layout: two nibble
  planes per block of rows) and multiply in bf16 with fp32 sums, then apply the row scale
  exactly as after the kernels (``integer_gemm``): the same numbers up to summation order, and
  for a ChatGLM2-6B layer at 128 rows int8 takes 98 ms instead of 244, int4 153 instead of 216
  (``benchmarks/bench_prefill.py``).
* ``Dequant`` — the reference: dequantize (``q * scale`` rounded once to the activation dtype,
  what upstream's own fallback does) block by block and ``F.linear``. Used for tests, for shapes
  the kernels reject and for int4 where the fast kernel cannot run (CPU with fp32/fp16
  activations is 10-20x slower through the kernel and scales badly with prompt length; CUDA needs
  bf16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from llmchat.cpu_linear import onednn_bf16
from llmchat.quant import layout as fmt
from llmchat.quant.layout import pack_int4, unpack_int4

if TYPE_CHECKING:
    from llmchat.quant.linear import QuantizedLinear


ALIGN = 64  # bytes: AVX512 aligned loads


@dataclass(frozen=True)
class Backend:
    """How a quantized linear stores its weight and computes ``x @ W.T + b``."""

    name: ClassVar[str] = ""  # shown by --verbose (``quant_backend``)
    fallback: ClassVar[bool] = False  # the slow dequantize + matmul path (warned about)
    row_group: ClassVar[int] = 1  # rows per independent block of the stored layout
    max_rows: int | None = None  # kernel for inputs of at most this many rows; dequant above
    prompt_rows: int | None = None  # inputs of this many rows or more: ``integer_gemm``
    note: str = ""  # why this backend (for a fallback: what would enable the fast one)

    def pack(self, q: Tensor) -> Tensor:
        """Upstream layout (int8 ``[out, in * bits / 8]``) → the stored ``weight``."""
        return aligned(q)

    def linear(self, layer: QuantizedLinear, x: Tensor) -> Tensor:
        """``(M, K)`` → ``(M, N)``."""
        return dequant_linear(layer, x)

    def int_rows(self, layer: QuantizedLinear, r0: int, r1: int) -> Tensor:
        """Signed integer weights of rows ``r0:r1``, int8 ``(rows, K)``."""
        w = layer.weight[r0:r1]
        return unpack_int4(w) if layer.bits == 4 else w

    def float_rows(self, layer: QuantizedLinear, r0: int, r1: int, dtype: torch.dtype) -> Tensor:
        """The integers of rows ``r0:r1`` (a block of ``row_blocks``) as ``dtype``, shape
        ``(rows, K)``, possibly a transposed view; exact (|q| <= 128 fits bf16)."""
        return self.int_rows(layer, r0, r1).to(dtype)

    def use_integer_gemm(self, x: Tensor) -> bool:
        return self.prompt_rows is not None and x.shape[0] >= self.prompt_rows


def aligned(t: Tensor, to: int = ALIGN) -> Tensor:
    """``t`` contiguous at an address that is a multiple of ``to`` bytes (copied if not).

    A tensor memory-mapped from a file (the quantized cache, a ``.bin`` checkpoint) starts
    wherever the file put it, e.g. 8 bytes past a 64-byte boundary; torch's AVX512 int8 kernel
    reads the weight with aligned vector loads and crashes on such an address."""
    t = t.contiguous()
    if t.device.type == "cpu" and t.data_ptr() % to:
        t = t.clone()  # torch's CPU allocator aligns to 64 bytes
    return t


def dequant_linear(layer: QuantizedLinear, x: Tensor) -> Tensor:
    """The reference: dequantize block by block of output rows, then ``F.linear``."""
    step = max(16, fmt.CHUNK_ELEMS // layer.in_features)
    outs = []
    for r in range(0, layer.out_features, step):
        w = fmt.dequantize_weight(layer.weight[r : r + step], layer.weight_scale[r : r + step],
                                  layer.bits, x.dtype)
        bias = None if layer.bias is None else layer.bias[r : r + step].to(x.dtype)
        outs.append(F.linear(x, w, bias))
    return torch.cat(outs, dim=-1)


def integer_gemm(layer: QuantizedLinear, x: Tensor) -> Tensor:
    """``x @ q.T`` by the float GEMM on the integers converted block by block (exact), output
    rounded to ``x.dtype`` as the kernels round it, then ``post_scale`` as after them."""
    y = x.new_empty(x.shape[0], layer.out_features)
    for r0, r1 in layer.row_blocks():
        y[:, r0:r1] = F.linear(x, layer.backend.float_rows(layer, r0, r1, x.dtype))
    return post_scale(layer, y, x.dtype)


def post_scale(layer: QuantizedLinear, y: Tensor, dtype: torch.dtype) -> Tensor:
    """Apply the exact row scale (and bias) in fp32 to a kernel's ``x @ q.T``; round once."""
    out = y.float() * layer.weight_scale
    if layer.bias is not None:
        out += layer.bias.float()
    return out.to(dtype)


@dataclass(frozen=True)
class Dequant(Backend):
    name: ClassVar[str] = "dequant"
    fallback: ClassVar[bool] = True


@dataclass(frozen=True)
class Int8PackMM(Backend):
    name: ClassVar[str] = "int8pack_mm"

    def linear(self, layer: QuantizedLinear, x: Tensor) -> Tensor:
        if self.use_integer_gemm(x):
            return integer_gemm(layer, x)
        if self.max_rows is not None and x.shape[0] > self.max_rows:
            return dequant_linear(layer, x)
        dtype, n = x.dtype, layer.out_features
        if dtype == torch.bfloat16:  # bf16 cannot hold the fp16 scales: unit scales here
            ones = layer.shared(("ones", n, dtype), lambda: torch.ones(
                n, dtype=dtype, device=layer.weight.device))
            return post_scale(layer, torch._weight_int8pack_mm(x, layer.weight, ones), dtype)
        y = torch._weight_int8pack_mm(x, layer.weight, layer.weight_scale.to(dtype))
        return y if layer.bias is None else y + layer.bias.to(dtype)


@dataclass(frozen=True)
class Int4Packed(Backend):
    """torch's int4 kernels: unit scale tables, bf16 activations, their own packed layout."""

    group_size: int = 0  # K-group of the (unit) scale table

    def kernel(self, x: Tensor, weight: Tensor, table: Tensor) -> Tensor:
        raise NotImplementedError

    def stored_rows(self, weight: Tensor, r0: int, r1: int) -> Tensor:
        """The part of the stored weight holding rows ``r0:r1`` (aligned to ``row_group``)."""
        return weight[r0:r1]

    def unit_table(self, layer: QuantizedLinear, n: int, device: torch.device) -> Tensor:
        """int4 scale/zero table ``[K/group, n, 2]``: scale 1, zero 0 (so w = nibble - 8)."""
        groups = layer.in_features // self.group_size

        def make() -> Tensor:
            t = torch.zeros(groups, n, 2, dtype=torch.bfloat16, device=device)
            t[..., 0] = 1
            return t

        return layer.shared(("sz", groups, n, device), make)

    def linear(self, layer: QuantizedLinear, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype != torch.bfloat16:  # the int4 kernels were selected for bf16 activations
            return self.linear(layer, x.to(torch.bfloat16)).to(dtype)
        if self.use_integer_gemm(x):
            return integer_gemm(layer, x)
        table = self.unit_table(layer, layer.out_features, layer.weight.device)
        return post_scale(layer, self.kernel(x, layer.weight, table), dtype)

    def int_rows(self, layer: QuantizedLinear, r0: int, r1: int) -> Tensor:
        """Read the values back from the packed layout (no upstream copy is kept)."""
        k, group = layer.in_features, self.row_group
        parts = []
        full_end = r0 + (r1 - r0) // group * group
        for a, b in ((r0, full_end), (full_end, r1)):
            if a == b:
                continue
            rows = min(group, b - a)  # a block of whole groups, or the (shorter) tail group
            stored = self.stored_rows(layer.weight, a, b)
            order = layer.shared(("order", self.name, rows, k, stored.device),
                                 partial(self._nibble_order, rows, k, stored.device))
            if order is None:  # not a plain nibble permutation: run the kernel on I (slow)
                eye = torch.eye(k, dtype=torch.bfloat16, device=stored.device)
                s = self.kernel(eye, stored, self.unit_table(layer, b - a, stored.device))
                parts.append(s.T.to(torch.int8))  # (rows, K)
                continue
            nib = _nibbles(stored).view(-1, rows * k).index_select(1, order)
            parts.append(nib.view(b - a, k).to(torch.int8) - 8)
        return torch.cat(parts)

    def _nibble_order(self, rows: int, k: int, device: torch.device) -> Tensor | None:
        """Index ``i`` with ``nibbles(pack(q))[i] == q.flatten() + 8`` for a block of ``rows``
        rows, found by packing each position's own index 4 bits at a time, then checked on random
        values; None if the packing is not such a permutation."""
        n = rows * k
        pos = torch.arange(n, device=device)
        src = torch.zeros(n, dtype=torch.int64, device=device)  # source position of each nibble
        for shift in range(0, max(1, (n - 1).bit_length()), 4):
            digits = ((pos >> shift) & 15).to(torch.int8).view(rows, k) - 8
            src |= _nibbles(self.pack(pack_int4(digits))).long() << shift
        if not bool((torch.bincount(src, minlength=n) == 1).all()):
            return None
        order = torch.empty_like(src)
        order[src] = pos
        order = order.to(torch.int32)
        q = torch.randint(-8, 8, (rows, k), dtype=torch.int8, device=device)
        back = _nibbles(self.pack(pack_int4(q))).index_select(0, order)
        return order if torch.equal(back.view(rows, k).to(torch.int8) - 8, q) else None


@dataclass(frozen=True)
class Int4PackCPU(Int4Packed):
    name: ClassVar[str] = "int4pack_mm_cpu"
    # the CPU layout interleaves blocks of rows (32 on AVX2 builds; 128 covers wider ones)
    row_group: ClassVar[int] = 128

    def pack(self, q: Tensor) -> Tensor:
        """Upstream packed int4 → the CPU kernel's layout, in row blocks (bounded temporaries)."""
        n, half = q.shape
        out = torch.empty(n, half, dtype=torch.uint8)
        # blocks of whole 128-row groups convert independently (see ``row_group``)
        step = max(128, (fmt.CHUNK_ELEMS // (2 * half)) // 128 * 128)
        for r in range(0, n, step):
            u = q[r : r + step].view(torch.uint8) ^ 0x88  # signed s -> s + 8, even column high
            vals = torch.empty(u.shape[0], 2 * half, dtype=torch.int32)  # (rows, K) in [0, 15]
            vals[:, 0::2] = u >> 4
            vals[:, 1::2] = u & 15
            out[r : r + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals, 2)
        return out

    def kernel(self, x: Tensor, weight: Tensor, table: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, self.group_size, table)

    def int_rows(self, layer: QuantizedLinear, r0: int, r1: int) -> Tensor:
        planes = self._planes(layer, r0, r1, torch.int8)
        return super().int_rows(layer, r0, r1) if planes is None else planes

    def float_rows(self, layer: QuantizedLinear, r0: int, r1: int, dtype: torch.dtype) -> Tensor:
        planes = self._planes(layer, r0, r1, dtype)
        return super().float_rows(layer, r0, r1, dtype) if planes is None else planes

    def _planes(self, layer: QuantizedLinear, r0: int, r1: int, dtype: torch.dtype
                ) -> Tensor | None:
        """Rows ``r0:r1`` as ``dtype`` ``(rows, K)`` (a transposed view), read by nibble planes
        where the packing is plain blocks of ``b`` rows: for each block and each k, ``b / 2``
        bytes whose low nibbles are rows ``0..b/2-1`` and high nibbles the rest (what torch 2.x
        packs: b = 64 on AVX512, 32 on AVX2), checked once on random values. None elsewhere:
        then the generic read-back (``Int4Packed.int_rows``) runs."""
        k = layer.in_features
        b = layer.shared(("int4 cpu block", k), partial(self._block_rows, k))
        if not b or r0 % b or (r1 - r0) % b:
            return None
        return _block_planes(layer.weight[r0:r1], r1 - r0, k, b, dtype).t()

    def _block_rows(self, k: int) -> int:
        for b in (64, 32, 16, 128):
            q = torch.randint(-8, 8, (2 * b, k), dtype=torch.int8)
            try:
                got = _block_planes(self.pack(pack_int4(q)), 2 * b, k, b, torch.float32)
            except RuntimeError:  # the layout's sizes do not split that way
                continue
            if torch.equal(got.t(), q.float()):
                return b
        return 0


@dataclass(frozen=True)
class Int4PackCUDA(Int4Packed):
    name: ClassVar[str] = "int4pack_mm_cuda"
    row_group: ClassVar[int] = 8  # the layout's outer dimension tiles 8 rows
    inner_k_tiles: int = 0  # packing parameter

    def pack(self, q: Tensor) -> Tensor:
        u8 = (q.view(torch.uint8) ^ 0x88).contiguous()  # signed s -> s + 8, high nibble first
        return torch.ops.aten._convert_weight_to_int4pack(u8, self.inner_k_tiles)

    def stored_rows(self, weight: Tensor, r0: int, r1: int) -> Tensor:
        return weight[r0 // 8 : r1 // 8]

    def kernel(self, x: Tensor, weight: Tensor, table: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm(x.contiguous(), weight, self.group_size, table)


def _block_planes(stored: Tensor, rows: int, k: int, b: int, dtype: torch.dtype) -> Tensor:
    """``(K, rows)`` in ``dtype``: the transposed signed integers of ``rows`` stored rows
    packed as blocks of ``b`` rows (see ``Int4PackCPU.float_rows``)."""
    u = stored.contiguous().view(torch.uint8).view(rows // b, k, b // 2)
    out = torch.empty(k, rows // b, 2, b // 2, dtype=dtype, device=stored.device)
    out[:, :, 0].copy_((u & 15).permute(1, 0, 2))
    out[:, :, 1].copy_((u >> 4).permute(1, 0, 2))
    return out.view(k, rows).sub_(8)


def _nibbles(packed: Tensor) -> Tensor:
    """All 4-bit fields of a packed tensor, low nibble first in each byte, flattened."""
    b = packed.contiguous().view(torch.uint8).flatten()
    return torch.stack((b & 15, b >> 4), dim=-1).flatten()


# -- selection -------------------------------------------------------------------------------------
# integer_gemm from this many rows: below, the kernels were faster (bench_prefill.py, AVX512
# Zen 4: int8 crosses over at about 12 rows; int4, whose unpacking costs more, at about 76)
PROMPT_ROWS = {8: 16, 4: 80}


def select_backend(bits: int, in_features: int, out_features: int, device: torch.device,
                   dtype: torch.dtype) -> Backend:
    """The one place that picks the backend of a layer (see the module docstring)."""
    cpu = device.type == "cpu"
    # a prompt through oneDNN's bf16 GEMM on the exact integers (see the module docstring)
    prompt = PROMPT_ROWS[bits] if cpu and dtype == torch.bfloat16 and onednn_bf16() else None
    if bits == 8 and not _has_kernel("_weight_int8pack_mm", device):
        return Dequant(note=(
            f"this torch build has no {device.type.upper()} kernel for _weight_int8pack_mm"))
    if bits == 8:
        # fp32/fp16 activations: per-row kernels are fast for decode but scale linearly in the
        # number of rows on CPU (a 64-token prompt is 10x slower than dequantize + matmul);
        # on CUDA the kernel is a warp-per-output GEMV, cuBLAS wins for prompts.
        return Int8PackMM(max_rows=None if cpu and dtype == torch.bfloat16 else (2 if cpu else 16),
                          prompt_rows=prompt)
    k, n = in_features, out_features
    if cpu:
        # scales are all 1 (the row scale is applied after), so the group size is free: the
        # largest one the kernel takes is the fastest (fewer scale loads)
        gs = _largest_divisor(k, (256, 128, 64, 32))
        if dtype != torch.bfloat16:
            return Dequant(note=(
                f"torch's CPU int4 kernel is fast only with bfloat16 activations, not "
                f"{dtype_name(dtype)}; use --dtype bfloat16 for it"))
        if not gs or n % 16:
            return Dequant(note=(
                f"the CPU int4 kernel needs in_features % 32 == 0 and out_features % 16 == 0 "
                f"(this layer: {k} -> {n})"))
        return Int4PackCPU(group_size=gs, prompt_rows=prompt)
    if dtype != torch.bfloat16:
        return Dequant(note=(
            f"torch's CUDA int4 kernel needs bfloat16 activations, not {dtype_name(dtype)}; "
            "use --dtype bfloat16 for it"))
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return Dequant(note="torch's CUDA int4 kernel needs compute capability 8.0+")
    gs = _largest_divisor(k, (128, 64, 32))
    tiles = _largest_divisor(k // 16, (8, 4, 2)) if k % 16 == 0 else 0
    if not gs or not tiles or n % 8:
        return Dequant(note=(
            f"the CUDA int4 kernel needs in_features % 32 == 0 and out_features % 8 == 0 "
            f"(this layer: {k} -> {n})"))
    return Int4PackCUDA(group_size=gs, inner_k_tiles=tiles)


def _largest_divisor(k: int, options: Sequence[int]) -> int:
    return next((g for g in options if k % g == 0), 0)


def _has_kernel(op: str, device: torch.device) -> bool:
    """Whether torch ships ``aten::op`` for this device (older builds had int8 on CPU only)."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    if key == "CUDA" and torch.version.cuda is None:
        return True  # a CPU-only build cannot tell (and cannot run CUDA anyway)
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key))
    except (AttributeError, RuntimeError):  # private API moved: assume present, as in 2.13
        return True


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
