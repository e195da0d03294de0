"""Small pieces shared by the decoders (kept here so each model file stays about its model)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmchat.cache import KVCache
from llmchat.errors import UnsupportedCheckpointError


# -- reading config.json ------------------------------------------------------------------------
def require_keys(hf: dict[str, Any], keys: Sequence[str]) -> None:
    """config.json must carry these (sizes we cannot guess)."""
    for key in keys:
        if key not in hf:
            raise UnsupportedCheckpointError(f"config.json has no {key!r}")


def check_settings(hf: dict[str, Any], required: dict[str, tuple[Any, Any]], model: str) -> None:
    """``required``: key -> (the value this implementation assumes, upstream's default)."""
    for key, (want, default) in required.items():
        got = hf.get(key, default)
        if got != want:
            raise UnsupportedCheckpointError(
                f"unsupported {model} config: {key} is {got!r}, llmchat needs {want!r}"
            )


# (kind, lowest, highest) for a config.json value; kind int or float (finite)
Range = tuple[type, float, float]
BIG = 1 << 20  # generous bound for widths and counts that real checkpoints keep far below


def check_values(hf: dict[str, Any], ranges: dict[str, Range], model: str, where: str = "") -> None:
    """Each present (non-null) key must be a number of its kind within its range.

    One rule for every size, count, id and epsilon, so that a hostile config.json fails here with
    the key, its value and what is allowed, before anything is built from it."""
    for key, (kind, lo, hi) in ranges.items():
        got = hf.get(key)
        if got is None:
            continue
        if kind is int:
            ok = isinstance(got, int) and not isinstance(got, bool) and lo <= got <= hi
            allowed = f"an integer from {lo:,} to {hi:,}"
        else:
            ok = (isinstance(got, (int, float)) and not isinstance(got, bool)
                  and math.isfinite(got) and lo < got <= hi)
            allowed = f"a finite number above {lo:g} and at most {hi:g}"
        if not ok:
            raise UnsupportedCheckpointError(
                f"invalid {model} config.json: {where}{key} is {_show(got)}; it must be {allowed}"
            )


def require(ok: bool, model: str, what: str) -> None:
    """A cross-field rule (divisibility, agreement): ``what`` says which keys and why."""
    if not ok:
        raise UnsupportedCheckpointError(f"invalid {model} config.json: {what}")


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def renamed(hf: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """Config fields from config.json via a ``{json key: field}`` map (absent/null skipped)."""
    return {dst: hf[src] for src, dst in keys.items() if hf.get(src) is not None}



def embedding(num: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` without random init: the checkpoint fills it. (On the meta device,
    torch's first ``normal_`` costs ~2 s of one-off set-up, paid by every CLI start otherwise.)"""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None) -> Tensor:
    """Scaled dot-product attention of T new queries (B, H, T, D) over the cached and new keys.

    Keys/values may have fewer heads than the queries (grouped/multi-query attention: query head
    h uses kv head h // (H / G)); SDPA broadcasts them without materialising copies.
    """
    b, h, t, d = q.shape
    g = k.shape[1]
    gqa = g != h
    mask = cache.key_mask() if cache is not None else None  # static step: (1, 1, 1, S)
    if t == 1:
        if gqa:  # fold each group's H/G query heads into the query-length axis: no K/V copies
            out = F.scaled_dot_product_attention(q.reshape(b, g, h // g, d), k, v, attn_mask=mask)
            return out.reshape(b, h, 1, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = k.shape[2]
    if s == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class RMSNorm(nn.Module):
    """RMS normalisation computed in fp32. Upstream models differ in where they cast back:
    ChatGLM2 multiplies by the weight in fp32 and then casts (``cast_first=False``); Qwen casts
    the normalised input back first and multiplies in the model dtype (``cast_first=True``)."""

    def __init__(self, dim: int, eps: float, *, cast_first: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.cast_first = cast_first

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.cast_first:
            return normed.to(x.dtype) * self.weight
        return (self.weight * normed).to(x.dtype)
