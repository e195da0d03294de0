"""Small pieces shared by the decoders (kept here so each model file stays about its model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmchat.cache import KVCache


def causal_attention(q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None) -> Tensor:
    """Scaled dot-product attention of T new queries (B, H, T, D) over the cached and new keys.

    Keys/values may have fewer heads than the queries (grouped/multi-query attention: query head
    h uses kv head h // (H / G)); SDPA broadcasts them without materialising copies.
    """
    gqa = k.shape[1] != q.shape[1]
    if cache is not None and cache.static:  # one token over the whole static buffer
        return F.scaled_dot_product_attention(q, k, v, attn_mask=cache.valid_mask(),
                                              enable_gqa=gqa)
    t, s = q.shape[2], k.shape[2]
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if s == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
