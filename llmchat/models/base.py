"""The ``ChatModel`` interface and the glue that turns any architecture module into one.

Every ``llmchat/models/<arch>.py`` exports the names of ``Arch`` below (mlx-lm style; the text
hooks are re-exported from ``llmchat/tokenizers/<arch>.py``); ``contract(module)`` collects them
into one typed object and fails loudly when a required one is missing, so a fifth model cannot
silently lose a hook. ``TransformerChatModel.generate`` encodes the prompt, runs
``generate.generate_tokens`` over the model's KV cache (a typed ``KVCache`` subclass where the
model keeps per-sequence state) and streams the detokenized, post-processed text as a ``Reply``.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmchat.cache import KVCache
from llmchat.errors import ContextOverflowError, ImageError, UsageError
from llmchat.generate import InvalidScoreGuard, generate_tokens, make_sampler
from llmchat.graphs import StaticDecoder
from llmchat.tokenizer import StreamDecoder, Tokenizer
from llmchat.types import GenerationConfig, Message, Reply, ReplyStats

if TYPE_CHECKING:
    from llmchat.registry import ModelSpec

CACHE_ROUND = 256  # KV cache headroom over the prompt; beyond it the cache doubles on demand


@dataclass(frozen=True)
class Arch:
    """What an architecture module provides. Required names are upper-case constants or
    functions of the module; the optional ones default to the values given here.

    * ``Config.from_hf(config_json) -> Config`` with ``layer_counts()``; ``Model(config)``:
      parameter names equal the checkpoint's (after ``checkpoint_key``), ``forward(ids (B, T),
      cache=None, last_only=False) -> logits`` advancing the cache, ``make_cache(max_len, *,
      dtype, device)`` (a ``KVCache``, or a typed subclass holding the model's per-sequence
      state), ``static_key(cache)`` (None: no static decode step), ``max_positions: int |
      None``; no buffers (built on the meta device, loaded by assignment).
    * ``checkpoint_key(key) -> name | None`` (None: drop); ``QUANT_LINEARS``: suffixes of the
      linears ``--quant`` replaces (``quant_skip(name)`` excludes some, e.g. a vision tower).
    * ``load_tokenizer(dir)``, ``build_prompt(messages) -> str`` (golden-tested),
      ``encode_messages(tok, messages) -> ids``, ``postprocess(text)``, ``holdback(text)`` (how
      many trailing characters post-processing may still change), ``stop_ids(tok)``.
    * ``INVALID_SCORES``: the nan/inf guard, a ``generate.InvalidScoreGuard`` (None: none);
      ``SUPPORTS_SYSTEM`` (``DEFAULT_SYSTEM`` when none is given); ``DROP_LAST_TOKEN_AT_LENGTH``
      (Qwen's ``_decode_chatml`` quirk);
      ``ChatModelClass`` where the glue needs more (VisualGLM's image splice).
    * ``CAUSAL_PROMPT``: the prompt is causal, so the keys/values of a conversation's earlier
      tokens do not change when it grows and are reused across turns (ChatGLM2, Qwen; not the
      prefix-LM ChatGLM-6B/VisualGLM). The cache's ``reusable(prompt_len)`` may refuse (Qwen:
      only while the dynamic-NTK factor stays the same).
    """

    name: str
    Config: Any
    Model: Any
    checkpoint_key: Callable[[str], str | None]
    quant_linears: tuple[str, ...]
    load_tokenizer: Callable[..., Any]
    build_prompt: Callable[[Sequence[Message]], str]
    encode_messages: Callable[[Any, Sequence[Message]], list[int]]
    postprocess: Callable[[str], str]
    holdback: Callable[[str], int]
    stop_ids: Callable[[Any], frozenset[int]]
    invalid_scores: InvalidScoreGuard | None
    supports_system: bool
    drop_last_token_at_length: bool = False
    causal_prompt: bool = False
    quant_skip: Callable[[str], bool] | None = None
    default_system: str | None = None
    chat_model_class: type[TransformerChatModel] | None = None


_REQUIRED = {
    "Config": "Config", "Model": "Model", "checkpoint_key": "checkpoint_key",
    "quant_linears": "QUANT_LINEARS", "load_tokenizer": "load_tokenizer",
    "build_prompt": "build_prompt", "encode_messages": "encode_messages",
    "postprocess": "postprocess", "holdback": "holdback", "stop_ids": "stop_ids",
    "invalid_scores": "INVALID_SCORES", "supports_system": "SUPPORTS_SYSTEM",
}
_OPTIONAL = {
    "drop_last_token_at_length": "DROP_LAST_TOKEN_AT_LENGTH", "quant_skip": "quant_skip",
    "chat_model_class": "ChatModelClass", "default_system": "DEFAULT_SYSTEM",
    "causal_prompt": "CAUSAL_PROMPT",
}
_MODEL_METHODS = ("make_cache", "static_key", "forward")


def contract(module: ModuleType) -> Arch:
    """The ``Arch`` of an architecture module; a missing required name is a ``TypeError``."""
    cached = module.__dict__.get("_llmchat_arch")
    if isinstance(cached, Arch):
        return cached
    missing = [n for n in _REQUIRED.values() if not hasattr(module, n)]
    model_cls = getattr(module, "Model", None)
    missing += [f"Model.{n}" for n in _MODEL_METHODS
                if model_cls is not None and not callable(getattr(model_cls, n, None))]
    config_cls = getattr(module, "Config", None)
    if config_cls is not None and not callable(getattr(config_cls, "layer_counts", None)):
        missing.append("Config.layer_counts")
    if missing:
        raise TypeError(f"{module.__name__} does not implement the model contract: "
                        f"missing {', '.join(missing)}")
    fields_ = {k: getattr(module, n) for k, n in _REQUIRED.items()}
    fields_ |= {k: getattr(module, n) for k, n in _OPTIONAL.items() if hasattr(module, n)}
    arch = Arch(name=module.__name__.rsplit(".", 1)[-1], **fields_)
    module._llmchat_arch = arch  # type: ignore[attr-defined]
    return arch


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
    """A chat model: messages in, a streaming ``Reply`` out. It keeps no conversation state;
    ``llmchat.conversation.Conversation`` owns the history, fitting and recording."""

    def __init__(self, name: str, *, defaults: GenerationConfig, info: LoadInfo,
                 supports_system: bool = False, supports_images: bool = False,
                 default_system: str | None = None) -> None:
        self.name = name
        self.default_system = default_system  # applied when the conversation sets none
        self.defaults = defaults
        self.info = info
        self.supports_system = supports_system
        self.supports_images = supports_images

    @abstractmethod
    def generate(self, messages: Sequence[Message], config: GenerationConfig) -> Reply:
        """The assistant reply to ``messages`` (history + new user turn), not yet started:
        iterate it for text deltas."""

    def stream_chat(self, messages: Sequence[Message], config: GenerationConfig) -> Iterator[str]:
        yield from self.generate(messages, config)

    def chat(self, messages: Sequence[Message], config: GenerationConfig) -> str:
        return self.generate(messages, config).consume().text

    def context_budget(self, config: GenerationConfig) -> int:
        """Tokens a prompt and its reply may use together."""
        return config.max_length

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Prompt length of ``messages`` in tokens (for fitting and the context meter)."""
        return sum(len(m.content) for m in messages)


def common_prefix(a: Sequence[int], b: Sequence[int], *, limit: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, at most ``limit``."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return max(n, 0)


@dataclass
class KVSlot:
    """One conversation's kept keys/values: the cache, the token ids it holds keys/values for
    (in its first slots; causal prompts only), the length of the prompt that filled it, and the
    captured decode step over its buffers."""

    cache: KVCache | None = None
    ids: list[int] = field(default_factory=list)
    prompt_len: int = 0
    decoder: StaticDecoder | None = None


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
        self.arch = contract(module)
        super().__init__(spec.name, defaults=spec.generation, info=info,
                         supports_system=self.arch.supports_system,
                         supports_images=spec.supports_images,
                         default_system=self.arch.default_system)
        self.spec = spec
        self.module = module
        self.model = model
        self.tokenizer = tokenizer
        self._slot = KVSlot()  # the active conversation's cache
        self.kv_reuse = self.arch.causal_prompt and os.environ.get("LLMCHAT_KV_REUSE", "1") != "0"
        # ``kv_slots`` caches are kept (the server's several conversations); the active one is
        # ``_slot``, the others wait here, most recently used first.
        self.kv_slots = 1
        self._parked: list[KVSlot] = []
        self.prefix: Any = None  # llmchat.ptuning.Prefix, in the cache dtype, or None

    def set_prefix(self, directory: str | None) -> None:
        """Load (or, with None, drop) a P-tuning prefix; the next reply uses it."""
        if directory is None:
            self.prefix = None
            self.info.extra.pop("prefix", None)
            self._forget()  # the caches hold keys/values computed next to the old prefix
            return
        from llmchat.ptuning import load_prefix

        self.use_prefix(load_prefix(directory, self.module.__name__, self.model.config))

    def use_prefix(self, prefix: Any) -> None:
        self.prefix = prefix.to(self.cache_dtype, self.device)  # upstream casts it likewise
        self.info.extra["prefix"] = f"{prefix.name} (P-tuning v2, {prefix.pre_seq_len} tokens)"
        self._forget()

    def _forget(self) -> None:
        """No cached keys/values may be reused (the prefix changed)."""
        self._slot.ids = []
        self._parked.clear()

    # -- prompt ---------------------------------------------------------------------------
    def check_messages(self, messages: Sequence[Message]) -> None:
        if not messages or messages[-1].role != "user":
            raise UsageError("the conversation must end with a user message")
        if not messages[-1].content.strip() and messages[-1].image is None:
            raise UsageError("empty message")
        for m in messages:  # one rule for every tokenizer: text must be encodable Unicode
            try:
                m.content.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise UsageError(f"a {m.role} message is not valid Unicode text (character "
                                 f"{exc.start})") from None
        if not self.supports_system and any(m.role == "system" for m in messages):
            raise UsageError(f"{self.name} has no system role; --system is not available")
        if not self.supports_images and any(m.image for m in messages):
            raise ImageError(f"{self.name} does not support images")

    def context_budget(self, config: GenerationConfig) -> int:
        """``max_length``, but never past the positions the model has (ChatGLM-6B: 2048)."""
        limit = self.model.max_positions
        return min(config.max_length, limit) if limit else config.max_length

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids, special tokens included, exactly as upstream builds them."""
        return list(self.arch.encode_messages(self.tokenizer, messages))

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(self.encode(messages))

    # -- generation -----------------------------------------------------------------------
    def _get_cache(self, ids: list[int], total: int, *, reuse: bool = True
                   ) -> tuple[KVCache, int]:
        """A cache for the prompt ``ids`` that may grow to ``total`` positions, and how many of
        the prompt's first tokens it already holds (the longest common prefix with what the
        last reply left there, when the prompt is causal). A new cache starts at the prompt
        plus ``CACHE_ROUND`` positions and doubles on demand."""
        prompt = len(ids)
        p = self.prefix.pre_seq_len if self.prefix is not None else 0
        total += p  # the prefix takes the first cache slots (positions do not count it)
        start = min(total, -(-(prompt + p + CACHE_ROUND) // CACHE_ROUND) * CACHE_ROUND)
        kept = self._pick_slot(ids) if reuse and self.kv_reuse else 0
        slot = self._slot
        cache = slot.cache
        if kept:
            cache.offset = cache.prefix_len + kept
            cache.limit = max(total, cache.max_len)
            return cache, kept
        if cache is None or cache.max_len < start:
            slot.decoder = None  # it holds the old buffers (and a graph over them)
            slot.cache = None  # free the old buffers before allocating the new ones
            try:
                cache = self.model.make_cache(start, dtype=self.cache_dtype, device=self.device)
            except torch.cuda.OutOfMemoryError:
                if not self._parked:
                    raise
                self._parked.clear()  # the waiting conversations give their memory back
                cache = self.model.make_cache(start, dtype=self.cache_dtype, device=self.device)
            slot.cache = cache
        cache.limit = max(total, cache.max_len)
        if self.prefix is not None:
            cache.set_prefix(self.prefix.k, self.prefix.v)
        elif cache.prefix_len:
            cache.set_prefix(None, None)
        cache.reset()
        return cache, 0

    def _pick_slot(self, ids: list[int]) -> int:
        """Make the kept cache sharing the longest prefix with ``ids`` the active one and return
        how many prompt tokens it holds; with none, park the active cache (up to ``kv_slots``,
        dropping the least recently used) so that a new conversation gets fresh buffers. With
        several slots a cache is taken over only by its own conversation's follow-up (holding
        the prompt that filled it, but for the last two tokens, whose re-tokenization next to
        the reply may differ), not by another one that shares just the template."""
        slots = [self._slot, *self._parked]
        best, kept = 0, 0
        for i, slot in enumerate(slots):
            if slot.cache is None or not slot.ids:
                continue
            n = common_prefix(slot.ids, ids, limit=len(ids) - 1)
            if self.kv_slots > 1 and n < min(slot.prompt_len, len(ids)) - 2:
                continue
            if n > kept and slot.cache.reusable(len(ids)):
                best, kept = i, n
        if not kept and self.kv_slots > 1 and self._slot.cache is not None and self._slot.ids:
            best = len(slots)  # a new conversation: keep the active one waiting
            slots.append(KVSlot())
        if best:
            self._slot = slots.pop(best)
            self._parked = [s for s in slots if s.cache is not None][: self.kv_slots - 1]
        return kept

    def decode_step(self, cache: KVCache) -> StaticDecoder | None:
        """On CUDA, the captured one-token step for this cache (reused across replies while the
        cache is); elsewhere None: the eager step. ``LLMCHAT_CUDA_GRAPHS=0`` turns it off."""
        if self.device.type != "cuda" or os.environ.get("LLMCHAT_CUDA_GRAPHS", "1") == "0":
            return None
        slot = self._slot
        if slot.decoder is None or slot.decoder.cache is not cache:
            slot.decoder = StaticDecoder(self.model, cache, capture=True)
        return slot.decoder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def cache_dtype(self) -> torch.dtype:
        return getattr(torch, self.info.dtype)

    def _track(self, tokens: Iterator[int], ids: list[int], generated: list[int],
               cache: KVCache) -> Iterator[int]:
        """Pass ``tokens`` through, then remember which ids the cache holds keys/values for. A
        stream closed at a token boundary leaves the cache consistent; an error mid-forward
        (Ctrl-C) may not, so then nothing is kept."""
        try:
            for token in tokens:
                generated.append(token)
                yield token
        except GeneratorExit:
            self._remember(ids, generated, cache)
            raise
        self._remember(ids, generated, cache)

    def _remember(self, ids: list[int], generated: list[int], cache: KVCache) -> None:
        self._slot.ids = [*ids, *generated][: cache.offset - cache.prefix_len]
        self._slot.prompt_len = len(ids)

    def prefill_fn(self, messages: Sequence[Message]) -> Any:
        """Hook for the first forward (VisualGLM splices image embeddings here)."""
        return None

    def generate(self, messages: Sequence[Message], config: GenerationConfig) -> Reply:
        self.check_messages(messages)
        ids = self.encode(messages)
        budget = self.context_budget(config)
        if len(ids) >= budget:
            raise ContextOverflowError(
                f"the prompt is {len(ids)} tokens, over the context budget of {budget} "
                "(raise --max-length or shorten the conversation)"
            )
        max_new = budget - len(ids)
        if config.max_new_tokens is not None:
            max_new = min(max_new, config.max_new_tokens)
        prefill = self.prefill_fn(messages)
        return Reply(lambda reply: self._stream(reply, ids, max_new, config, prefill),
                     ReplyStats(prompt_tokens=len(ids), finish_reason="interrupted"))

    def _stream(self, reply: Reply, ids: list[int], max_new: int, config: GenerationConfig,
                prefill: Any) -> Iterator[str]:
        stats = reply.stats
        t0 = time.perf_counter()
        # a custom prefill (VisualGLM's image splice) computes the whole prompt itself
        cache, cached = self._get_cache(ids, len(ids) + max_new, reuse=prefill is None)
        stats.cached_tokens = cached
        self._slot.ids = []  # until this reply leaves the cache consistent
        step = self.decode_step(cache)
        stats.decode_path = step.path if step is not None else "eager"
        arch = self.arch
        stop = frozenset(arch.stop_ids(self.tokenizer))
        sample = make_sampler(config, eos_ids=sorted(stop), invalid_guard=arch.invalid_scores,
                              device=self.device)
        decoder = StreamDecoder(self.tokenizer.decode, arch.postprocess, arch.holdback)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # Qwen's upstream _decode_chatml cuts the reply one token short when no end token was
        # generated (see README, model notes): the newest token is pushed one step late, and
        # dropped if the reply ends at the length limit.
        pending: int | None = None
        generated: list[int] = []
        tokens = generate_tokens(self.model, ids, cache, sample=sample, max_new_tokens=max_new,
                                 stop_ids=stop, prefill=prefill, step=step, cached=cached)
        for token in self._track(tokens, ids, generated, cache):
            if stats.completion_tokens == 0:
                stats.ttft_s = time.perf_counter() - t0
            stats.completion_tokens += 1
            if arch.drop_last_token_at_length:
                token, pending = pending, token
                if token is None:
                    continue
            delta = decoder.push(token)
            stats.total_s = time.perf_counter() - t0
            stats.decode_s = stats.total_s - stats.ttft_s
            if delta or reply.every_token:
                yield delta
        stats.finish_reason = "length" if stats.completion_tokens >= max_new else "stop"
        tail = ""
        if pending is not None and stats.finish_reason == "stop":
            tail = decoder.push(pending)
        rest = tail + decoder.flush()
        stats.total_s = time.perf_counter() - t0
        if stats.completion_tokens == 0:
            stats.ttft_s = stats.total_s
        stats.decode_s = stats.total_s - stats.ttft_s
        if self.device.type == "cuda":
            stats.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        reply.finish(decoder.final)
        if rest:
            yield rest
