"""A preallocated, static key/value cache shared by every decoder.

The buffers are allocated once for ``max_len`` positions, so memory does not grow during a
conversation and the one-token decode step always sees tensors of the same shape (what CUDA
graph capture needs). Layers write their new keys/values at ``offset`` and read ``[:offset+T]``;
the model advances ``offset`` once per forward, after the last layer.

In *static* mode (``static = True``, one token per step) the cache is addressed through the
device tensor ``pos`` instead of the Python int ``offset``: keys/values are written at ``pos``
and attention runs over the whole buffer with ``valid_mask()``. Nothing in such a step depends
on Python-side values, so it can be captured once in a CUDA graph and replayed
(``llmchat.graphs.StaticDecoder``); the caller advances ``offset`` after each replay.
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
        self.limit: int | None = None  # growth cap (positions); None: never grow
        self.offset = 0
        self.prefix_len = 0  # P-tuning prefix keys/values held in slots [0, P) (set_prefix)
        self.static = False
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # device mirror of offset
        # Per-sequence facts a model derives at prefill and reuses when decoding
        # (Qwen's NTK factor). Cleared by reset().
        self.meta: dict[str, Any] = {}
        # Per-sequence device tensors a decode step reads and updates in place (ChatGLM-6B's
        # mask and block positions). They keep their storage across sequences, so a captured
        # step stays valid; ``state_version`` changes when one has to be reallocated.
        self.state: dict[str, torch.Tensor] = {}
        self.state_version = 0

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def reset(self) -> None:
        self.offset = self.prefix_len  # the prefix slots stay written across sequences
        self.meta.clear()

    def set_prefix(self, k: torch.Tensor | None, v: torch.Tensor | None) -> None:
        """Hold a P-tuning prefix, keys/values (layers, H_kv, P, D), in the first P slots (None:
        no prefix) and reset. Positions stay those of the token index: ``positions`` and the
        models subtract ``prefix_len``."""
        self.prefix_len = 0
        self.offset = 0
        if k is not None and v is not None:
            p = k.shape[2]
            if p > self.max_len:
                self.grow(p)
            self.k[:, :, :, :p] = k[:, None].to(self.k.dtype)
            self.v[:, :, :, :p] = v[:, None].to(self.v.dtype)
            self.prefix_len = p
        self.reset()

    def set_state(self, key: str, value: torch.Tensor) -> torch.Tensor:
        """Store ``value`` in the persistent state tensor ``key`` (in place when it fits)."""
        cur = self.state.get(key)
        if cur is not None and cur.shape == value.shape and cur.dtype == value.dtype:
            return cur.copy_(value)
        self.state[key] = value.clone()
        self.state_version += 1
        return self.state[key]

    def positions(self, t: int) -> torch.Tensor:
        """Absolute positions of the next ``t`` tokens, shape (T,)."""
        if self.static:
            return self.pos.view(1) - self.prefix_len
        start = self.offset - self.prefix_len
        return torch.arange(start, start + t, device=self.device)

    def valid_mask(self) -> torch.Tensor:
        """(1, 1, 1, max_len) bool, True for the keys a static step may attend to."""
        return (torch.arange(self.max_len, device=self.device) <= self.pos).view(1, 1, 1, -1)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` of shape (B, H_kv, T, D) at ``offset``; return all keys/values so far
        (in static mode: the whole buffer, to be masked with ``valid_mask``)."""
        if self.static:
            self.k[layer].index_copy_(2, self.pos.view(1), k)
            self.v[layer].index_copy_(2, self.pos.view(1), v)
            return self.k[layer], self.v[layer]
        t = k.shape[2]
        end = self.offset + t
        if end > self.max_len:
            self.grow(end)
        self.k[layer, :, :, self.offset : end] = k
        self.v[layer, :, :, self.offset : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def grow(self, needed: int) -> None:
        """Reallocate for at least ``needed`` positions (doubling, up to ``limit``), so a reply
        only pays for the context it uses; the kept prefix is copied once."""
        if self.limit is None or needed > self.limit:
            raise RuntimeError(f"KV cache overflow: {needed} > {self.limit or self.max_len} "
                               "positions")
        size = min(max(needed, 2 * self.max_len), self.limit)
        shape = (*self.k.shape[:3], size, self.k.shape[4])
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, :, :, : self.offset] = old[:, :, :, : self.offset]
            setattr(self, name, new)
            del old
        self.max_len = size

    def advance(self, t: int) -> None:
        if self.static:
            self.pos.add_(t)  # the caller advances ``offset`` after a (replayed) static step
        else:
            self.offset += t

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
