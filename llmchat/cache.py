"""A preallocated, static key/value cache shared by every decoder.

The buffers are allocated once for ``max_len`` positions, so memory does not grow during a
conversation and the one-token decode step always sees tensors of the same shape (what CUDA
graph capture needs). Layers write their new keys/values at ``offset`` and read ``[:offset+T]``;
the model advances ``offset`` once per forward, after the last layer.
"""

from __future__ import annotations

from typing import Any

import torch


class KVCache:
    """Keys and values laid out as ``(layers, B, H_kv, max_len, D)``."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.offset = 0
        # Per-sequence facts a model derives at prefill and reuses when decoding
        # (ChatGLM-6B's context length and mask position, Qwen's NTK factor).
        self.meta: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def reset(self) -> None:
        self.offset = 0
        self.meta.clear()

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` of shape (B, H_kv, T, D) at ``offset``; return all keys/values so far."""
        t = k.shape[2]
        end = self.offset + t
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len} positions")
        self.k[layer, :, :, self.offset : end] = k
        self.v[layer, :, :, self.offset : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.offset += t

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
