"""Weight-only INT8/INT4 quantization: upstream ChatGLM semantics, PyTorch's own kernels.

Semantics (REFERENCE.md §2.7, §3.6), identical for quantizing on the fly and for the official
pre-quantized checkpoints: per output row, symmetric, ``scale = absmax / 127`` (int8) or
``absmax / 7`` (int4) rounded to fp16, ``q = round(W / scale)`` computed in fp16 like upstream
(which quantizes the fp16 model), int4 packed two per byte with the even column in the high
nibble: ``weight`` int8 ``[out, in * bits / 8]`` + ``weight_scale`` ``[out]`` (+ fp16 ``bias``).

``prepare_model`` swaps the named ``nn.Linear`` modules of a meta-built model for empty
``QuantizedLinear`` modules. The loader then hands each checkpoint tensor to
``QuantizedLinear.load_checkpoint_tensor``: a float weight is quantized the moment it arrives and
dropped (the full fp16 model is never held); a pre-quantized weight is taken as it is.

Kernels (``select_backend`` is the one place that decides, per layer, from device/dtype/shape):

* ``int8pack_mm`` — ``torch._weight_int8pack_mm`` (per-row int8, CPU and CUDA) on the upstream
  int8 layout itself. With bf16 activations the kernel's scales would have to be bf16, which
  cannot hold the fp16 scales exactly, so it runs with unit scales and the row scale is applied
  after the matmul in fp32. fp32/fp16 scales are exact, so they go into the kernel.
* ``int4pack_mm_cpu`` / ``int4pack_mm_cuda`` — ``torch._weight_int4pack_mm_for_cpu`` /
  ``torch._weight_int4pack_mm`` (CUDA: bf16 only, sm80+). THUDM's signed nibble s becomes
  s + 8 (``byte ^ 0x88``, lossless) with group scale 1 and zero 0, so the kernel computes
  ``x @ s.T`` exactly in its fp32 accumulator and the fp16 row scale is applied afterwards in
  fp32. Putting the row scale into the kernel's per-group table instead would round it to bf16
  (8 bits of mantissa instead of fp16's 11) and change the weights; this way they are exact.
* ``dequant`` — the reference: dequantize (``q * scale`` rounded once to the activation dtype,
  what upstream's own fallback does) and ``F.linear``. Used for tests, for shapes the kernels
  reject, for int4 where the fast kernel cannot run (CPU with fp32/fp16 activations is 10-20x
  slower through the kernel and scales badly with prompt length; CUDA needs bf16), and for
  long prompts where a kernel is slower than dequantize + matmul.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from llmchat.errors import CheckpointError, QuantizationError

QMAX = {8: 127, 4: 7}
CHUNK_ELEMS = 1 << 22  # rows are processed in blocks of about this many weights (bounded temps)


class QuantizationWarning(UserWarning):
    """A quantized layer runs a slower fallback than the fast kernel (the message says why)."""


# -- upstream format -------------------------------------------------------------------------------
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
    return (q.float() * scale.float()[:, None]).to(dtype)


# -- backend selection -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """How a quantized linear computes: ``name`` for ``--verbose``/``/show``; ``note``: why."""

    name: str  # int8pack_mm | int4pack_mm_cpu | int4pack_mm_cuda | dequant
    max_rows: int | None = None  # kernel for inputs of at most this many rows; dequant above
    group_size: int = 0  # int4 kernels: K-group of the (unit) scale table
    inner_k_tiles: int = 0  # int4 CUDA packing parameter
    note: str = ""

    @property
    def fallback(self) -> bool:
        return self.name == "dequant"


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


def select_backend(bits: int, in_features: int, out_features: int, device: torch.device,
                   dtype: torch.dtype) -> Backend:
    """The one place that picks the kernel for a layer (see the module docstring)."""
    cpu = device.type == "cpu"
    if bits == 8 and not _has_kernel("_weight_int8pack_mm", device):
        return Backend("dequant", note=(
            f"this torch build has no {device.type.upper()} kernel for _weight_int8pack_mm"))
    if bits == 8:
        # fp32/fp16 activations: per-row kernels are fast for decode but scale linearly in the
        # number of rows on CPU (a 64-token prompt is 10x slower than dequantize + matmul);
        # on CUDA the kernel is a warp-per-output GEMV, cuBLAS wins for prompts.
        rows = None if cpu and dtype == torch.bfloat16 else (2 if cpu else 16)
        return Backend("int8pack_mm", max_rows=rows)
    k, n = in_features, out_features
    if cpu:
        # scales are all 1 (the row scale is applied after), so the group size is free: the
        # largest one the kernel takes is the fastest (fewer scale loads)
        gs = _largest_divisor(k, (256, 128, 64, 32))
        if dtype != torch.bfloat16:
            return Backend("dequant", note=(
                f"torch's CPU int4 kernel is fast only with bfloat16 activations, not "
                f"{_dt(dtype)}; use --dtype bfloat16 for it"))
        if not gs or n % 16:
            return Backend("dequant", note=(
                f"the CPU int4 kernel needs in_features % 32 == 0 and out_features % 16 == 0 "
                f"(this layer: {k} -> {n})"))
        return Backend("int4pack_mm_cpu", group_size=gs)
    if dtype != torch.bfloat16:
        return Backend("dequant", note=(
            f"torch's CUDA int4 kernel needs bfloat16 activations, not {_dt(dtype)}; "
            "use --dtype bfloat16 for it"))
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return Backend("dequant", note="torch's CUDA int4 kernel needs compute capability 8.0+")
    gs = _largest_divisor(k, (128, 64, 32))
    tiles = _largest_divisor(k // 16, (8, 4, 2)) if k % 16 == 0 else 0
    if not gs or not tiles or n % 8:
        return Backend("dequant", note=(
            f"the CUDA int4 kernel needs in_features % 32 == 0 and out_features % 8 == 0 "
            f"(this layer: {k} -> {n})"))
    return Backend("int4pack_mm_cuda", group_size=gs, inner_k_tiles=tiles)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- the module ------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with q int8 or int4, stored as ``backend`` needs it.

    Buffers (all start on the meta device): ``weight`` — the upstream layout (int8
    ``[out, in]`` / packed ``[out, in/2]``) for ``int8pack_mm`` and ``dequant``, the kernel's
    packing for the int4 kernels; ``weight_scale`` fp32 ``[out]`` (fp16 values); ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, *,
                 prequantized: bool, dtype: torch.dtype, device: torch.device,
                 backend: Backend, shared: dict[Any, Tensor] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.prequantized = prequantized  # checkpoint holds weight + weight_scale
        self.dtype, self.device, self.backend = dtype, device, backend
        self._shared = shared if shared is not None else {}  # unit scale tables, per model
        meta = torch.device("meta")
        self.register_buffer("weight", torch.empty(
            out_features, in_features * bits // 8, dtype=torch.int8, device=meta))
        self.register_buffer("weight_scale", torch.empty(out_features, device=meta))
        self.bias: Tensor | None
        self.register_buffer("bias", torch.empty(out_features, device=meta) if bias else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, bias={self.bias is not None}, backend={self.backend.name}")

    # -- loading --------------------------------------------------------------------------------
    def load_checkpoint_tensor(self, attr: str, tensor: Tensor, *, dtype: torch.dtype,
                               device: torch.device, key: str) -> None:
        """Take one checkpoint tensor (called by the loader instead of assigning it)."""
        n, k = self.out_features, self.in_features
        if attr == "weight":
            if tensor.is_floating_point():
                if self.prequantized:
                    raise CheckpointError(
                        f"{key} is a {_dt(tensor.dtype)} tensor but config.json says the "
                        f"checkpoint is pre-quantized (quantization_bit {self.bits})")
                _check_shape(key, tensor, (n, k))
                q, scale = quantize_weight(tensor.to(device), self.bits)  # dropped by caller
                self._set_weight(q)
                self.weight_scale = scale.float()
                return
            if tensor.dtype != torch.int8:
                raise CheckpointError(
                    f"{key} has dtype {_dt(tensor.dtype)}; expected int8 or floating point")
            if not self.prequantized:
                raise CheckpointError(
                    f"{key} is already quantized (int8) but config.json has no quantization_bit")
            _check_shape(key, tensor, (n, k * self.bits // 8))
            self._set_weight(tensor.to(device))
        elif attr == "weight_scale":
            if not self.prequantized:
                raise CheckpointError(
                    f"unexpected {key}: config.json has no quantization_bit")
            _check_shape(key, tensor, (n,))
            self.weight_scale = tensor.to(device=device, dtype=torch.float32)
        elif attr == "bias" and self.bias is not None:
            _check_shape(key, tensor, (n,))
            self.bias = tensor.to(device=device, dtype=dtype)
        else:
            raise CheckpointError(f"unexpected key in the checkpoint: {key}")

    def _set_weight(self, q: Tensor) -> None:
        """Store upstream-layout q in the backend's layout."""
        self.weight = self._pack_int4(q) if self.backend.name.startswith("int4pack") else (
            q.contiguous())

    def _pack_int4(self, q: Tensor) -> Tensor:
        """Upstream packed int4 → the int4 kernel's layout."""
        if self.backend.name == "int4pack_mm_cpu":
            return _pack_int4_cpu(q)
        u8 = (q.view(torch.uint8) ^ 0x88).contiguous()  # signed s -> s + 8, high nibble first
        return torch.ops.aten._convert_weight_to_int4pack(u8, self.backend.inner_k_tiles)

    # -- compute ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training: gradients flow to x only
            return _QuantizedLinearFn.apply(x, self)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        b = self.backend
        if b.fallback or (b.max_rows is not None and x2.shape[0] > b.max_rows):
            y = self._dequant_linear(x2)
        else:
            y = self._kernel(x2)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _kernel(self, x: Tensor) -> Tensor:
        b, dtype = self.backend, x.dtype
        if b.name == "int8pack_mm":
            if dtype == torch.bfloat16:  # bf16 cannot hold the fp16 scales: unit scales here
                ones = self._unit((self.out_features,), dtype)
                y = torch._weight_int8pack_mm(x, self.weight, ones)
                return self._post_scale(y, dtype)
            y = torch._weight_int8pack_mm(x, self.weight, self.weight_scale.to(dtype))
            return y if self.bias is None else y + self.bias.to(dtype)
        if dtype != torch.bfloat16:  # the int4 kernels were selected for bf16 activations
            return self._kernel(x.to(torch.bfloat16)).to(dtype)
        table = self._unit_table(dtype)
        if b.name == "int4pack_mm_cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, b.group_size, table)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x.contiguous(), self.weight, b.group_size, table)
        return self._post_scale(y, dtype)

    def _post_scale(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """Apply the exact row scale (and bias) in fp32 to the kernel's ``x @ q.T``; round once."""
        out = y.float() * self.weight_scale
        if self.bias is not None:
            out += self.bias.float()
        return out.to(dtype)

    def _unit(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        key = (shape, dtype, self.weight.device)
        if key not in self._shared:
            self._shared[key] = torch.ones(shape, dtype=dtype, device=self.weight.device)
        return self._shared[key]

    def _unit_table(self, dtype: torch.dtype) -> Tensor:
        """int4 scale/zero table ``[K/group, N, 2]``: scale 1, zero 0 (so w = nibble - 8)."""
        groups = self.in_features // self.backend.group_size
        key = ("sz", groups, self.out_features, dtype, self.weight.device)
        if key not in self._shared:
            t = torch.zeros(groups, self.out_features, 2, dtype=dtype, device=self.weight.device)
            t[..., 0] = 1
            self._shared[key] = t
        return self._shared[key]

    def _dequant_linear(self, x: Tensor) -> Tensor:
        """The reference: dequantize block by block of output rows, then ``F.linear``."""
        if self.backend.name.startswith("int4pack"):  # no upstream layout kept: run the kernel
            return self._kernel(x)
        step = max(16, CHUNK_ELEMS // self.in_features)
        outs = []
        for r in range(0, self.out_features, step):
            w = dequantize_weight(self.weight[r : r + step], self.weight_scale[r : r + step],
                                  self.bits, x.dtype)
            bias = None if self.bias is None else self.bias[r : r + step].to(x.dtype)
            outs.append(F.linear(x, w, bias))
        return torch.cat(outs, dim=-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``[out, in]`` this layer computes with (for tests and inspection)."""
        return torch.cat([self.weight_rows(r0, r1, dtype) for r0, r1 in self.row_blocks()])

    # -- backward (weights frozen) ----------------------------------------------------------------
    def row_blocks(self) -> list[tuple[int, int]]:
        """Output-row blocks of about ``CHUNK_ELEMS`` weights, aligned to the layout's row group."""
        group = ROW_GROUP.get(self.backend.name, 1)
        step = max(group, CHUNK_ELEMS // max(self.in_features, 1) // group * group)
        n = self.out_features
        return [(r, min(r + step, n)) for r in range(0, n, step)]

    def weight_rows(self, r0: int, r1: int, dtype: torch.dtype) -> Tensor:
        """Rows ``r0:r1`` of the float weight: ``q * scale`` exact in fp32, rounded once to dtype
        (``r0`` must start a block of ``row_blocks``)."""
        scale = self.weight_scale[r0:r1]
        if not self.backend.name.startswith("int4pack"):
            return dequantize_weight(self.weight[r0:r1], scale, self.bits, dtype)
        s = self._int4_rows(r0, r1)  # (rows, K) signed values
        return (s.float() * scale.float()[:, None]).to(dtype)

    def _int4_rows(self, r0: int, r1: int) -> Tensor:
        """Signed int4 values of rows ``r0:r1`` read back from the kernel's packed layout."""
        k, group = self.in_features, ROW_GROUP[self.backend.name]
        cuda = self.backend.name == "int4pack_mm_cuda"
        parts = []
        full_end = r0 + (r1 - r0) // group * group
        for a, b in ((r0, full_end), (full_end, r1)):
            if a == b:
                continue
            rows = min(group, b - a)  # a block of whole groups, or the tail (shorter) group
            stored = self.weight[a // 8 : b // 8] if cuda else self.weight[a:b]
            order = self._nibble_order(rows)
            if order is None:  # layout not a plain nibble permutation: run the kernel on I
                parts.append(self._kernel_identity(stored, b - a))
                continue
            nib = _nibbles(stored).view(-1, rows * k).index_select(1, order)
            parts.append(nib.view(b - a, k).to(torch.int8) - 8)
        return torch.cat(parts)

    def _nibble_order(self, rows: int) -> Tensor | None:
        """Index ``i`` with ``nibbles(pack(q)).flatten()[i] == q.flatten()`` for a block of
        ``rows`` rows, found by packing the positions' own digits (4 bits at a time) and checked
        on random values; None if the packing is not such a permutation."""
        key = ("order", self.backend.name, rows, self.in_features, self.weight.device)
        if key in self._shared:
            return self._shared[key]
        n, dev = rows * self.in_features, self.weight.device
        pos = torch.arange(n, device=dev)
        src = torch.zeros(n, dtype=torch.int64, device=dev)  # source position of each nibble
        for shift in range(0, max(1, (n - 1).bit_length()), 4):
            digits = ((pos >> shift) & 15).to(torch.int8).view(rows, -1) - 8
            src |= _nibbles(self._pack_int4(pack_int4(digits))).long() << shift
        order: Tensor | None = None
        if bool((torch.bincount(src, minlength=n) == 1).all()):
            order = torch.empty_like(src)
            order[src] = pos
            order = order.to(torch.int32)
            q = torch.randint(-8, 8, (rows, self.in_features), dtype=torch.int8, device=dev)
            back = _nibbles(self._pack_int4(pack_int4(q))).index_select(0, order)
            if not torch.equal(back.view(rows, -1).to(torch.int8) - 8, q):
                order = None
        self._shared[key] = order
        return order

    def _kernel_identity(self, stored: Tensor, rows: int) -> Tensor:
        """Signed values of ``rows`` packed rows via the kernel on the identity (slow, exact)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=stored.device)
        groups = self.in_features // self.backend.group_size
        table = torch.zeros(groups, rows, 2, dtype=torch.bfloat16, device=stored.device)
        table[..., 0] = 1
        op = (torch.ops.aten._weight_int4pack_mm if self.backend.name == "int4pack_mm_cuda"
              else torch.ops.aten._weight_int4pack_mm_for_cpu)
        return op(eye, stored, self.backend.group_size, table).T.to(torch.int8)  # (rows, K)

    def grad_input(self, grad_y: Tensor, dtype: torch.dtype) -> Tensor:
        """``grad_y @ W`` with ``W`` dequantized block by block in ``dtype`` (the activations'),
        the blocks' products summed in fp32 and rounded once (bf16 GEMMs are slow on CPUs
        without bf16 units, and fp32 keeps the sum as exact as one bf16 matmul would)."""
        g = grad_y.reshape(-1, self.out_features).to(dtype).float()  # (M, N)
        gx: Tensor | None = None
        for r0, r1 in self.row_blocks():
            w = self.weight_rows(r0, r1, dtype).float()  # (rows, K), dtype's values
            gx = g[:, r0:r1] @ w if gx is None else gx.addmm_(g[:, r0:r1], w)
        assert gx is not None  # out_features > 0
        return gx.to(dtype).reshape(*grad_y.shape[:-1], self.in_features)


class _QuantizedLinearFn(torch.autograd.Function):
    """Frozen quantized weights: forward as in inference, backward to the input only (torch's
    packed kernels have no autograd)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mod: QuantizedLinear) -> Tensor:
        ctx.mod, ctx.dtype = mod, x.dtype
        return mod._forward(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor, None]:
        return ctx.mod.grad_input(grad_y, ctx.dtype), None


# Rows per independent block of each packed layout: the CPU kernel interleaves blocks of rows
# (32 on AVX2 builds; 128 covers wider ones), the CUDA one tiles 8 rows.
ROW_GROUP = {"int4pack_mm_cpu": 128, "int4pack_mm_cuda": 8}


def _nibbles(packed: Tensor) -> Tensor:
    """All 4-bit fields of a packed tensor, low nibble first in each byte, flattened."""
    b = packed.contiguous().view(torch.uint8).flatten()
    return torch.stack((b & 15, b >> 4), dim=-1).flatten()


def _pack_int4_cpu(q: Tensor) -> Tensor:
    """Upstream packed int4 → the CPU kernel's layout, in row blocks (bounded temporaries)."""
    n, half = q.shape
    out = torch.empty(n, half, dtype=torch.uint8)
    # The kernel's layout interleaves blocks of rows (32 on AVX2 builds; 128 covers wider ones),
    # so blocks of whole 128-row groups convert independently.
    step = max(128, (CHUNK_ELEMS // (2 * half)) // 128 * 128)
    for r in range(0, n, step):
        vals = unpack_int4(q[r : r + step]).to(torch.int32) + 8  # (rows, K) in [0, 15]
        out[r : r + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals, 2)
    return out


def _check_shape(key: str, t: Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != want:
        raise CheckpointError(
            f"{key} has shape {tuple(t.shape)} in the checkpoint but config.json implies {want}")


# -- the entry point -------------------------------------------------------------------------------
def prepare_model(model: nn.Module, linears: Sequence[str], bits: int, *,
                  checkpoint_bits: int = 0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu",
                  skip: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Swap every ``nn.Linear`` whose name ends with one of ``linears`` for a ``QuantizedLinear``.

    ``bits``: 16, 8 or 4 from ``--quant``; ``checkpoint_bits``: 0, or the width the checkpoint
    is pre-quantized to (config ``quantization_bit``). ``--quant 16`` on a pre-quantized
    checkpoint means "as stored". ``skip(name)`` keeps matching modules in float (VisualGLM's
    vision tower). Returns what it did (also set as ``model.quant_extra`` for ``LoadInfo``).
    """
    width = resolve_bits(bits, checkpoint_bits)
    if width == 16:
        return {}
    dev = torch.device(device)
    shared: dict[Any, Tensor] = {}
    backends: dict[str, list[str]] = {}
    notes: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or (skip is not None and skip(name)):
            continue
        if not any(name == s or name.endswith("." + s) for s in linears):
            continue
        if width == 4 and mod.in_features % 2:
            raise QuantizationError(
                f"int4 packs two weights per byte, but {name} has {mod.in_features} input "
                "features (odd); use --quant 8")
        backend = select_backend(width, mod.in_features, mod.out_features, dev, dtype)
        new = QuantizedLinear(mod.in_features, mod.out_features, mod.bias is not None, width,
                              prequantized=bool(checkpoint_bits), dtype=dtype, device=dev,
                              backend=backend, shared=shared)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        backends.setdefault(backend.name, []).append(name)
        if backend.note:
            notes.setdefault(backend.note, name)
    if not backends:
        raise QuantizationError(
            f"--quant {width}: no linear layer of this model matches {tuple(linears)}")
    for note, name in notes.items():
        warnings.warn(f"int{width}: {name} and similar layers use the dequantize+matmul "
                      f"fallback: {note}", QuantizationWarning, stacklevel=2)
    extra = {"quant_backend": summarize(backends), "quant_layers": sum(map(len, backends.values()))}
    if notes:
        extra["quant_fallback"] = "; ".join(notes)
    model.quant_extra = extra  # read by the loader into LoadInfo.extra
    return extra


def resolve_bits(bits: int, checkpoint_bits: int) -> int:
    """The width to run: ``bits`` from ``--quant``, reconciled with a pre-quantized checkpoint."""
    if bits not in (16, 8, 4):
        raise QuantizationError(f"invalid --quant {bits!r}; use 16, 8 or 4 (fp16, int8, int4)")
    if not checkpoint_bits:
        return bits
    if checkpoint_bits not in QMAX:
        raise QuantizationError(
            f"config.json has quantization_bit {checkpoint_bits}; llmchat reads 8 or 4")
    if bits not in (16, checkpoint_bits):
        raise QuantizationError(
            f"this checkpoint is pre-quantized to int{checkpoint_bits} (config.json "
            f"quantization_bit {checkpoint_bits}) and cannot be re-quantized to int{bits}: "
            f"use --quant {checkpoint_bits}, or the fp16 checkpoint for --quant {bits}")
    return checkpoint_bits


def summarize(backends: dict[str, list[str]]) -> str:
    """``int4pack_mm_cpu`` or ``int4pack_mm_cpu x110, dequant x2``."""
    if len(backends) == 1:
        return next(iter(backends))
    return ", ".join(f"{name} x{len(names)}" for name, names in backends.items())
