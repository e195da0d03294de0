"""``QuantizedLinear`` (frozen int8/int4 weights, gradients to the input) and ``prepare_model``.

``prepare_model`` swaps the named ``nn.Linear`` modules of a meta-built model for empty
``QuantizedLinear`` modules and returns a ``QuantSummary`` of what it did. The loader then hands
each checkpoint tensor to ``QuantizedLinear.load_checkpoint_tensor``: a float weight is quantized
the moment it arrives and dropped (the full fp16 model is never held); a pre-quantized weight is
taken as it is. How a layer stores and computes is its ``Backend`` (``backends.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from llmchat.errors import CheckpointError, QuantizationError
from llmchat.quant import layout as fmt
from llmchat.quant.backends import Backend, dtype_name, select_backend
from llmchat.quant.layout import QMAX, quantize_weight, scale_rows

T = TypeVar("T")


class QuantizationWarning(UserWarning):
    """A quantized layer runs a slower fallback than the fast kernel (the message says why)."""


class QuantizedLinear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with q int8 or int4, stored as ``backend`` needs it.

    Buffers (all start on the meta device): ``weight`` — the upstream layout (int8
    ``[out, in]`` / packed ``[out, in/2]``) or the backend's packing (``Backend.pack``);
    ``weight_scale`` fp32 ``[out]`` (fp16 values); ``bias``. There are no parameters: in
    training, gradients flow to the input only.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, *,
                 prequantized: bool, dtype: torch.dtype, device: torch.device,
                 backend: Backend, shared: dict[Any, Any] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.prequantized = prequantized  # checkpoint holds weight + weight_scale
        self.dtype, self.device, self.backend = dtype, device, backend
        self._shared = shared if shared is not None else {}  # unit tables etc., per model
        meta = torch.device("meta")
        self.register_buffer("weight", torch.empty(
            out_features, in_features * bits // 8, dtype=torch.int8, device=meta))
        self.register_buffer("weight_scale", torch.empty(out_features, device=meta))
        self.bias: Tensor | None
        self.register_buffer("bias", torch.empty(out_features, device=meta) if bias else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, bias={self.bias is not None}, backend={self.backend.name}")

    def shared(self, key: Any, make: Callable[[], T]) -> T:
        """A value shared by the model's quantized layers (built once by ``make``)."""
        if key not in self._shared:
            self._shared[key] = make()
        value: T = self._shared[key]
        return value

    # -- loading --------------------------------------------------------------------------------
    def load_checkpoint_tensor(self, attr: str, tensor: Tensor, *, dtype: torch.dtype,
                               device: torch.device, key: str) -> dict[str, Tensor]:
        """Take one checkpoint tensor (called by the loader instead of assigning it).

        Returns what was taken in the upstream pre-quantized layout, by checkpoint key (a float
        weight becomes ``key`` int8 + ``….weight_scale`` fp16), for the quantized cache.
        """
        n, k = self.out_features, self.in_features
        if attr == "weight":
            if tensor.is_floating_point():
                if self.prequantized:
                    raise CheckpointError(
                        f"{key} is a {dtype_name(tensor.dtype)} tensor but config.json says the "
                        f"checkpoint is pre-quantized (quantization_bit {self.bits})")
                _check_shape(key, tensor, (n, k))
                q, scale = quantize_weight(tensor.to(device), self.bits)
                self.weight = self.backend.pack(q)
                self.weight_scale = scale.float()
                return {key: q, key.removesuffix("weight") + "weight_scale": scale}
            if tensor.dtype != torch.int8:
                raise CheckpointError(
                    f"{key} has dtype {dtype_name(tensor.dtype)}; expected int8 or floating point")
            if not self.prequantized:
                raise CheckpointError(
                    f"{key} is already quantized (int8) but config.json has no quantization_bit")
            _check_shape(key, tensor, (n, k * self.bits // 8))
            self.weight = self.backend.pack(tensor.to(device))
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
        return {key: tensor}

    # -- compute ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training: gradients flow to x only
            y: Tensor = _QuantizedLinearFn.apply(x, self)
            return y
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        y = self.backend.linear(self, x.reshape(-1, self.in_features))  # (M, K) -> (M, N)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``[out, in]`` this layer computes with (for tests and inspection)."""
        return torch.cat([self.weight_rows(r0, r1, dtype) for r0, r1 in self.row_blocks()])

    def row_blocks(self) -> list[tuple[int, int]]:
        """Output-row blocks of about ``CHUNK_ELEMS`` weights, aligned to the layout's row group."""
        group = self.backend.row_group
        step = max(group, fmt.CHUNK_ELEMS // max(self.in_features, 1) // group * group)
        n = self.out_features
        return [(r, min(r + step, n)) for r in range(0, n, step)]

    def weight_rows(self, r0: int, r1: int, dtype: torch.dtype) -> Tensor:
        """Rows ``r0:r1`` of the float weight: ``q * scale`` exact in fp32, rounded once to dtype
        (``r0`` must start a block of ``row_blocks``)."""
        return scale_rows(self.backend.int_rows(self, r0, r1), self.weight_scale[r0:r1], dtype)

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


def _check_shape(key: str, t: Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != want:
        raise CheckpointError(
            f"{key} has shape {tuple(t.shape)} in the checkpoint but config.json implies {want}")


# -- the entry point -------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantSummary:
    """What ``prepare_model`` did: the width, each backend's layers, the fallback reasons."""

    bits: int = 16  # 16: nothing was swapped
    layers: dict[str, list[str]] = field(default_factory=dict)  # backend name -> module names
    fallbacks: dict[str, str] = field(default_factory=dict)  # reason -> first layer it hit

    @property
    def count(self) -> int:
        return sum(map(len, self.layers.values()))

    def extra(self) -> dict[str, Any]:
        """``LoadInfo.extra`` entries (``quant_backend``, ``quant_layers``, ``quant_fallback``)."""
        if not self.layers:
            return {}
        out: dict[str, Any] = {"quant_backend": summarize(self.layers), "quant_layers": self.count}
        if self.fallbacks:
            out["quant_fallback"] = "; ".join(self.fallbacks)
        return out


def prepare_model(model: nn.Module, linears: Sequence[str], bits: int, *,
                  checkpoint_bits: int = 0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu",
                  skip: Callable[[str], bool] | None = None) -> QuantSummary:
    """Swap every ``nn.Linear`` whose name ends with one of ``linears`` for a ``QuantizedLinear``.

    ``bits``: 16, 8 or 4 from ``--quant``; ``checkpoint_bits``: 0, or the width the checkpoint
    is pre-quantized to (config ``quantization_bit``). ``--quant 16`` on a pre-quantized
    checkpoint means "as stored". ``skip(name)`` keeps matching modules in float (VisualGLM's
    vision tower).
    """
    width = resolve_bits(bits, checkpoint_bits)
    if width == 16:
        return QuantSummary()
    dev = torch.device(device)
    shared: dict[Any, Any] = {}
    summary = QuantSummary(bits=width)
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
        summary.layers.setdefault(backend.name, []).append(name)
        if backend.note:
            summary.fallbacks.setdefault(backend.note, name)
    if not summary.layers:
        raise QuantizationError(
            f"--quant {width}: no linear layer of this model matches {tuple(linears)}")
    for note, name in summary.fallbacks.items():
        warnings.warn(f"int{width}: {name} and similar layers use the dequantize+matmul "
                      f"fallback: {note}", QuantizationWarning, stacklevel=2)
    return summary


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
