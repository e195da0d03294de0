"""The key/value cache shared by every decoder; models subclass it for per-sequence state.

The buffers are preallocated for ``max_len`` positions (doubling on demand up to ``limit``), so
the one-token decode step always sees tensors of the same shape (what CUDA graph capture
needs). Layers write their new keys/values at ``offset`` with ``update`` and attend over what
it returns, masked with ``key_mask()`` when that is not None; the model calls ``advance`` once
per forward, after the last layer.

A model whose positions depend on more than the offset keeps that state in a typed subclass
with named fields, which it updates itself (ChatGLM-6B's 2D positions: ``chatglm.Cache``;
Qwen's dynamic-NTK factor: ``qwen.Cache``). Device tensors a decode step advances in place are
listed by ``device_state()``, so a captured step can be warmed up and put back.

A *static* step (``with cache.static_step():``, one token) is addressed through the device
tensor ``pos`` instead of the Python int ``offset``: keys/values are written at ``pos`` and
``update`` returns the whole buffer, with ``key_mask()`` hiding the unwritten slots. Nothing in
such a step depends on Python-side values, so it can be captured once in a CUDA graph and
replayed (``llmchat.graphs.StaticDecoder``); the caller advances ``offset`` after each replay.
Only this file reads the static flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
        self.state_version = 0  # bumped when a device_state() tensor is reallocated

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def reset(self) -> None:
        """Start a new sequence (subclasses also forget their per-sequence state)."""
        self.offset = self.prefix_len  # the prefix slots stay written across sequences

    def reusable(self, prompt_len: int) -> bool:
        """Whether keys/values cached for an earlier prompt stay valid for a new prompt of
        ``prompt_len`` tokens sharing its start (Qwen: only under the same NTK factor)."""
        return True

    def device_state(self) -> tuple[torch.Tensor, ...]:
        """Per-sequence device tensors a decode step updates in place (none here)."""
        return ()

    def keep(self, cur: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """``new`` stored in the state tensor ``cur``: in place when it fits, so a captured
        step over ``cur`` stays valid; else a copy, and ``state_version`` changes."""
        if cur.shape == new.shape and cur.dtype == new.dtype:
            return cur.copy_(new)
        self.state_version += 1
        return new.clone()

    @contextmanager
    def static_step(self) -> Iterator[None]:
        """Address the cache through ``pos`` for one static (capturable) decode step."""
        self.static = True
        try:
            yield
        finally:
            self.static = False

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

    def positions(self, t: int) -> torch.Tensor:
        """Absolute positions of the next ``t`` tokens, shape (T,)."""
        if self.static:
            return self.pos.view(1) - self.prefix_len
        start = self.offset - self.prefix_len
        return torch.arange(start, start + t, device=self.device)

    def valid_mask(self) -> torch.Tensor:
        """(1, 1, 1, max_len) bool, True for the keys a static step may attend to."""
        return (torch.arange(self.max_len, device=self.device) <= self.pos).view(1, 1, 1, -1)

    def key_mask(self) -> torch.Tensor | None:
        """Which keys ``update`` returned a new token may see: None when all of them (the
        written slots), in a static step ``valid_mask()`` over the whole buffer."""
        return self.valid_mask() if self.static else None

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
