"""Token generation: prefill, cached decode and sampling. Knows nothing about chat or text.

Sampling follows transformers' ``generate`` processor order, which the upstream ``chat()``
methods rely on: repetition penalty (over prompt and reply), min-length, the GLM nan/inf guard,
then temperature, top-k, top-p; greedy (argmax) when temperature is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmchat.cache import KVCache
from llmchat.errors import CheckpointError
from llmchat.types import GenerationConfig


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: scores of seen ids are divided by
    ``penalty`` when positive and multiplied by it when negative."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    score = logits.gather(-1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, seen, score)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits (ties with the k-th kept), as TopKLogitsWarper."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -float("inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter as TopPLogitsWarper: drop the low tail whose mass is <= 1 - p."""
    if p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, -float("inf"))


def guard_invalid(logits: Tensor, fallback_id: int, *, check_inf: bool = True) -> Tensor:
    """ChatGLM's InvalidScoreLogitsProcessor: on nan/inf, zero everything and favour one id.

    ``check_inf=False`` is VisualGLM's variant (nan only), which lets min-length's -inf through.
    """
    bad = ~torch.isfinite(logits) if check_inf else torch.isnan(logits)
    if bool(bad.any()):  # one device sync per token
        logits = torch.zeros_like(logits)
        logits[..., fallback_id] = 5e4
    return logits


@dataclass(frozen=True)
class InvalidScoreGuard:
    """An architecture's nan/inf guard (``guard_invalid``): the id it favours, and whether inf
    trips it too (VisualGLM checks nan only)."""

    fallback_id: int
    check_inf: bool = True

    def __call__(self, logits: Tensor) -> Tensor:
        return guard_invalid(logits, self.fallback_id, check_inf=self.check_inf)


Sampler = Callable[[Tensor, Tensor, int], int]


def make_sampler(
    config: GenerationConfig,
    *,
    eos_ids: Sequence[int] = (),
    invalid_guard: InvalidScoreGuard | None = None,
    device: torch.device | str = "cpu",
) -> Sampler:
    """Build ``sample(logits (V,) float32, seen_ids (N,) long, length) -> token id``.

    ``length`` is the current total length (prompt + generated), used by ``min_length``.
    A dedicated generator seeded from ``config.seed`` makes sampling reproducible.
    """
    gen = torch.Generator(device=device)
    if config.seed is not None:
        gen.manual_seed(config.seed)
    else:
        gen.seed()
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)

    def sample(logits: Tensor, seen: Tensor, length: int) -> int:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
        if length < config.min_length and eos.numel():
            logits = logits.index_fill(-1, eos, -float("inf"))
        if invalid_guard is not None:
            logits = invalid_guard(logits)
        if config.temperature == 0:
            return int(torch.argmax(logits, dim=-1))
        logits = logits / config.temperature
        logits = apply_top_k(logits, config.top_k)
        logits = apply_top_p(logits, config.top_p)
        probs = logits.softmax(dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))

    return sample


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    prompt: Sequence[int],
    cache: KVCache,
    *,
    sample: Sampler,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    prefill: Callable[[Tensor, KVCache], Tensor] | None = None,
    step: Callable[[int], Tensor] | None = None,
    cached: int = 0,
) -> Iterator[int]:
    """Yield generated token ids until a stop id (not yielded) or ``max_new_tokens``.

    ``model(input_ids (1, T), cache, last_only=...) -> logits (1, T or 1, V)`` must advance
    ``cache``; the prefill asks for the last position only (no (T, vocab) logits matrix).
    ``prefill`` replaces the first call (VisualGLM splices image embeddings there); ``step``
    replaces the one-token decode calls (``graphs.StaticDecoder``, a captured CUDA graph).
    ``cached``: the first ``cached`` prompt tokens are already in ``cache`` (at ``cache.offset``),
    so the prefill runs over the rest only.
    """
    device = cache.device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    seen = torch.empty(len(prompt) + max_new_tokens, dtype=torch.long, device=device)
    seen[: len(prompt)] = ids[0]
    n = len(prompt)
    if cached:
        assert prefill is None and cache.offset - cache.prefix_len == cached < len(prompt)
    first = prefill(ids, cache) if prefill else model(ids[:, cached:], cache, last_only=True)
    logits = first[0, -1].float()
    if not bool(torch.isfinite(logits).all()):  # one check, at the first step only
        raise CheckpointError(
            "the model computed NaN/Inf scores for the prompt: the checkpoint's weights are "
            "broken (or overflow in this dtype; try --dtype float32)"
        )
    for i in range(max_new_tokens):
        token = sample(logits, seen[:n], n)
        if token in stop_ids:
            return
        yield token
        if i + 1 == max_new_tokens:
            return
        seen[n] = token
        n += 1
        out = step(token) if step is not None else model(ids.new_tensor([[token]]), cache)
        logits = out[0, -1].float()
