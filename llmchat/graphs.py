"""The one-token decode step over a static KV cache, captured as a CUDA graph.

Eager batch-1 decoding on a GPU is bound by kernel-launch overhead (hundreds of small kernels
per token), not by memory bandwidth. In a static step (``KVCache.static_step``) a decode step
has fixed shapes and reads all per-step state from device tensors, so it can be
recorded once with ``torch.cuda.CUDAGraph`` and replayed per token — one launch instead of
hundreds (the gpt-fast recipe, without torch.compile's start-up cost).

The same static step also runs eagerly (``capture=False``), which is how the CPU tests check that
it computes exactly what the dynamic path computes. Every model has ``static_key(cache)`` (the
contract checks it): None means "this step cannot be static" (e.g. Qwen's logn scaling past
seq_length), and a change of key (Qwen's NTK factor) triggers a new capture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from llmchat.cache import KVCache


class StaticDecoder:
    """``step(token) -> logits (1, 1, V)``, advancing the cache by one position."""

    def __init__(self, model: nn.Module, cache: KVCache, *, capture: bool) -> None:
        self.model = model
        self.cache = cache
        self.capture = capture and cache.device.type == "cuda"
        self.token = torch.zeros((1, 1), dtype=torch.long, device=cache.device)
        self.graph: Any = None
        self.key: object | None = None
        self.logits: Tensor | None = None
        self.static_steps = 0
        self.eager_steps = 0

    @property
    def path(self) -> str:
        if self.static_steps and self.capture:
            return "cuda-graph"
        return "static-eager" if self.static_steps else "eager"

    def _eager(self, token: int) -> Tensor:
        self.eager_steps += 1
        return self.model(self.token.new_full((1, 1), token), self.cache)

    def _run_static(self) -> Tensor:
        with self.cache.static_step():
            return self.model(self.token, self.cache)

    def _snapshot(self) -> list[Tensor]:
        return [t.clone() for t in self.cache.device_state()]

    def _restore(self, saved: list[Tensor]) -> None:
        for cur, old in zip(self.cache.device_state(), saved, strict=True):
            cur.copy_(old)

    def _warm_up(self) -> None:
        """Run the static step twice (CUDA graphs want warmed-up kernels and allocator), then put
        back the device state it advanced (``cache.device_state()``; the caller resets ``pos``).
        Run with ``pos`` at the first free slot, so the keys/values it writes are overwritten or
        masked."""
        saved = self._snapshot()
        for _ in range(2):
            self._run_static()
            self._restore(saved)

    def _capture(self, key: object) -> None:
        """Warm up on a side stream, then record one static step."""
        self.graph = None
        dev = self.cache.device
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            self._warm_up()
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        saved = self._snapshot()
        with torch.cuda.graph(graph):
            self.logits = self._run_static()
        self._restore(saved)
        self.graph, self.key = graph, key

    def __call__(self, token: int) -> Tensor:
        key = self.model.static_key(self.cache)
        if key is None or self.cache.offset >= self.cache.max_len:
            return self._eager(token)
        self.cache.pos.fill_(self.cache.offset)  # warm-ups write at pos: the free slots
        if self.capture:
            key = (key, self.cache.k.data_ptr())  # a regrown cache has new buffers
            if self.graph is None or key != self.key:
                self._capture(key)
                self.cache.pos.fill_(self.cache.offset)  # the warm-up runs advanced it
        self.token.fill_(token)
        if self.capture:
            self.graph.replay()
            out = self.logits
            assert out is not None
        else:
            out = self._run_static()
        self.cache.offset += 1
        self.static_steps += 1
        return out
