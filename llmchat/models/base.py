"""The ``ChatModel`` interface and the glue that turns any architecture module into one.

Every ``llmchat/models/<arch>.py`` exports the same small contract (mlx-lm style):

* ``Config`` — a dataclass with ``from_hf(config_json: dict) -> Config`` that renames the
  checkpoint's keys and raises ``UnsupportedCheckpointError`` for settings it does not implement.
* ``Model(config)`` — an ``nn.Module`` whose parameter names equal the checkpoint's key names
  (after ``checkpoint_key``), with ``forward(input_ids (B, T), cache=None) -> logits (B, T, V)``
  that advances the cache, ``make_cache(max_len, *, dtype, device) -> KVCache`` and
  ``max_positions: int | None``. It registers no buffers: RoPE tables are computed on the fly,
  so the model can be built on the meta device and loaded by assignment.
* ``checkpoint_key(key) -> str | None`` — the parameter a checkpoint key loads into (None: drop).
* ``QUANT_LINEARS`` — suffixes of the ``nn.Linear`` modules that ``--quant`` replaces.
* ``load_tokenizer(model_dir) -> Tokenizer``
* ``build_prompt(messages) -> str`` — the chat template as a pure function (golden-tested).
* ``encode_messages(tokenizer, messages) -> list[int]`` — prompt ids, special tokens included.
* ``postprocess(text) -> str`` and ``holdback(text) -> int`` — upstream response clean-up and
  how many trailing characters it may still change while streaming.
* ``stop_ids(tokenizer) -> frozenset[int]``, ``INVALID_FALLBACK_ID: int | None``,
  ``SUPPORTS_SYSTEM: bool``.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmchat.cache import KVCache
from llmchat.errors import ContextOverflowError, ImageError, UsageError
from llmchat.generate import generate_tokens, make_sampler
from llmchat.graphs import StaticDecoder
from llmchat.tokenizer import StreamDecoder, Tokenizer
from llmchat.types import GenerationConfig, Message, ReplyStats

if TYPE_CHECKING:
    from llmchat.registry import ModelSpec

# Room kept for the reply when old turns are dropped to fit the context budget.
REPLY_RESERVE = 256
CACHE_ROUND = 256  # KV cache headroom over the prompt; beyond it the cache doubles on demand


@dataclass
class LoadInfo:
    """How the model was loaded, for headers, ``/show`` and ``--json``."""

    path: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    quant: int = 16
    weight_bytes: int = 0
    load_s: float = 0.0
    peak_rss_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ChatModel(ABC):
    """A chat model: messages in, streamed reply text out."""

    name: str = "model"
    supports_system: bool = False
    supports_images: bool = False
    defaults: GenerationConfig = GenerationConfig()
    info: LoadInfo = LoadInfo()
    last_stats: ReplyStats = ReplyStats()

    @abstractmethod
    def stream_chat(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[str]:
        """Yield text deltas of the assistant reply to ``messages`` (history + new user turn)."""

    def chat(self, messages: Sequence[Message], config: GenerationConfig) -> str:
        return "".join(self.stream_chat(messages, config))

    def context_budget(self, config: GenerationConfig) -> int:
        """Tokens a prompt and its reply may use together."""
        return config.max_length

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt length of ``messages`` in tokens (for the context meter)."""
        return sum(len(m.content) for m in messages)

    def fit(
        self, messages: Sequence[Message], config: GenerationConfig
    ) -> tuple[list[Message], int]:
        """Drop the oldest turns until the prompt leaves room for a reply.

        Returns the kept messages and the number of dropped user turns. The system message and
        the newest user turn are always kept; if those alone do not fit, raise
        ``ContextOverflowError``.
        """
        msgs = list(messages)
        budget = self.context_budget(config)
        reserve = min(config.max_new_tokens or REPLY_RESERVE, REPLY_RESERVE, budget // 2)
        dropped = 0
        while True:
            n = self.count_tokens(msgs)
            if n + reserve <= budget:
                return msgs, dropped
            first = next((i for i, m in enumerate(msgs) if m.role != "system"), None)
            if first is None or first >= len(msgs) - 1:
                if n < budget:  # only the newest turn left: use what room there is
                    return msgs, dropped
                raise ContextOverflowError(
                    f"the message is {n} tokens and does not fit the context budget of "
                    f"{budget} tokens (raise --max-length or shorten it)"
                )
            # Drop the oldest user message and everything up to the next user message.
            end = first + 1
            while end < len(msgs) - 1 and msgs[end].role != "user":
                end += 1
            carried = [m for m in msgs[first:end] if m.image is not None]
            del msgs[first:end]
            if carried and not any(m.image for m in msgs):  # keep the conversation's image
                i = next(i for i, m in enumerate(msgs) if m.role == "user")
                msgs[i] = Message("user", msgs[i].content, carried[-1].image)
            dropped += 1


class TransformerChatModel(ChatModel):
    """Glue any architecture module (see the module docstring) to the generic generator."""

    def __init__(
        self,
        spec: ModelSpec,
        module: ModuleType,
        model: nn.Module,
        tokenizer: Tokenizer,
        info: LoadInfo,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.module = module
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.defaults = spec.generation
        self.supports_system = bool(getattr(module, "SUPPORTS_SYSTEM", False))
        self.supports_images = spec.supports_images
        self.last_stats = ReplyStats()
        self._cache: KVCache | None = None
        self._encoded: dict[tuple[Message, ...], list[int]] = {}
        self._decoder: StaticDecoder | None = None

    # -- prompt ---------------------------------------------------------------------------
    def check_messages(self, messages: Sequence[Message]) -> None:
        if not messages or messages[-1].role != "user":
            raise UsageError("the conversation must end with a user message")
        if not messages[-1].content.strip() and messages[-1].image is None:
            raise UsageError("empty message")
        if not self.supports_system and any(m.role == "system" for m in messages):
            raise UsageError(f"{self.name} has no system role; --system is not available")
        if not self.supports_images and any(m.image for m in messages):
            raise ImageError(f"{self.name} does not support images")

    def context_budget(self, config: GenerationConfig) -> int:
        """``max_length``, but never past the positions the model has (ChatGLM-6B: 2048)."""
        limit = getattr(self.model, "max_positions", None)
        return min(config.max_length, limit) if limit else config.max_length

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids; memoised, since fit() and stream_chat() encode the same conversation."""
        key = tuple(messages)
        ids = self._encoded.get(key)
        if ids is None:
            if len(self._encoded) >= 16:
                self._encoded.clear()
            ids = self._encoded[key] = list(self.module.encode_messages(self.tokenizer, messages))
        return list(ids)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(self.encode(messages))

    # -- generation -----------------------------------------------------------------------
    def _get_cache(self, prompt: int, total: int) -> KVCache:
        """A cache for ``prompt`` tokens that may grow to ``total``: it starts at the prompt plus
        ``CACHE_ROUND`` positions and doubles on demand, and is reused across replies."""
        start = min(total, -(-(prompt + CACHE_ROUND) // CACHE_ROUND) * CACHE_ROUND)
        if self._cache is None or self._cache.max_len < start:
            self._decoder = None  # it holds the old buffers (and a graph over them)
            self._cache = None  # free the old buffers before allocating the new ones
            self._cache = self.model.make_cache(start, dtype=self.cache_dtype, device=self.device)
        self._cache.reset()
        self._cache.limit = max(total, self._cache.max_len)
        return self._cache

    def decode_step(self, cache: KVCache) -> StaticDecoder | None:
        """On CUDA, the captured one-token step for this cache (reused across replies while the
        cache is); elsewhere None: the eager step. ``LLMCHAT_CUDA_GRAPHS=0`` turns it off."""
        if self.device.type != "cuda" or os.environ.get("LLMCHAT_CUDA_GRAPHS", "1") == "0":
            return None
        if self._decoder is None or self._decoder.cache is not cache:
            self._decoder = StaticDecoder(self.model, cache, capture=True)
        return self._decoder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def cache_dtype(self) -> torch.dtype:
        return getattr(torch, self.info.dtype)

    def prefill_fn(self, messages: Sequence[Message]) -> Any:
        """Hook for the first forward (VisualGLM splices image embeddings here)."""
        return None

    def stream_chat(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[str]:
        self.check_messages(messages)
        stats = ReplyStats()
        self.last_stats = stats
        t0 = time.perf_counter()
        ids = self.encode(messages)
        stats.prompt_tokens = len(ids)
        if len(ids) >= config.max_length:
            raise ContextOverflowError(
                f"the prompt is {len(ids)} tokens, over the context budget of "
                f"{config.max_length} (raise --max-length or shorten the conversation)"
            )
        max_new = config.max_length - len(ids)
        if config.max_new_tokens is not None:
            max_new = min(max_new, config.max_new_tokens)
        limit = getattr(self.model, "max_positions", None)
        if limit is not None:
            if len(ids) >= limit:
                raise ContextOverflowError(
                    f"the prompt is {len(ids)} tokens; the model has {limit} positions"
                )
            max_new = min(max_new, limit - len(ids))
        cache = self._get_cache(len(ids), len(ids) + max_new)
        step = self.decode_step(cache)
        stop = frozenset(self.module.stop_ids(self.tokenizer))
        sample = make_sampler(
            config,
            eos_ids=sorted(stop),
            invalid_fallback_id=getattr(self.module, "INVALID_FALLBACK_ID", None),
            invalid_check_inf=getattr(self.module, "INVALID_CHECK_INF", True),
            device=self.device,
        )
        decoder = StreamDecoder(self.tokenizer.decode, self.module.postprocess,
                                self.module.holdback)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        stats.finish_reason = "interrupted"
        t_first = None
        for token in generate_tokens(
            self.model, ids, cache, sample=sample, max_new_tokens=max_new, stop_ids=stop,
            prefill=self.prefill_fn(messages), step=step,
        ):
            if t_first is None:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - t0
            stats.completion_tokens += 1
            delta = decoder.push(token)
            stats.total_s = time.perf_counter() - t0
            stats.decode_s = stats.total_s - stats.ttft_s
            if delta:
                yield delta
        stats.finish_reason = "length" if stats.completion_tokens >= max_new else "stop"
        rest = decoder.flush()
        stats.total_s = time.perf_counter() - t0
        if t_first is None:
            stats.ttft_s = stats.total_s
        stats.decode_s = stats.total_s - stats.ttft_s
        if self.device.type == "cuda":
            stats.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        stats.extra["reply"] = decoder.final
        stats.extra["decode_path"] = step.path if step is not None else "eager"
        if rest:
            yield rest
