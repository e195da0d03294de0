"""Qwen-7B-Chat (Qwen/Qwen-7B-Chat, Qwen v1 ``QWenLMHeadModel``), native PyTorch.

A pre-norm decoder: RMSNorm (eps 1e-6), multi-head attention with a fused ``c_attn``
projection (always with a bias) split into contiguous ``[q | k | v]`` blocks, ``c_proj`` with a
bias only when ``no_bias`` is false, and the MLP ``c_proj(w1(x) * silu(w2(x)))`` (the gate is
``w2``). RoPE covers the whole head with half-split (rotate_half) pairs (j, j + D/2), computed
and applied in fp32. ``lm_head`` is untied. There is no BOS token.

Long contexts, as upstream (REFERENCE.md §4.3), only once the context exceeds ``seq_length``:

* dynamic NTK: at prefill, alpha = max(2^ceil(log2(L / seq_length) + 1) - 1, 1) from the total
  kv length L, and RoPE uses base * alpha^(D / (D - 2)). Decode steps reuse the prefill alpha
  (``Cache.ntk_alpha``), so alpha changes only with a new prompt.
* logn attention: while the kv length exceeds ``seq_length``, the query at 1-based position
  p > seq_length is scaled by log_{seq_length}(p).

Both config generations load: v1.0 (``n_embd``/``n_layer``/``n_head``/``ffn_hidden_size``/
``padded_vocab_size``, seq_length 2048, ``n_positions`` 6144) and v1.1 (``hidden_size``/...,
seq_length 8192, ``max_position_embeddings`` 32768). ``Model.max_positions`` is
``max_position_embeddings`` (v1.0: ``n_positions``), the longest context upstream can run
(with NTK + logn), not ``seq_length``, so the chat glue does not refuse long prompts upstream
accepts.

Departure from upstream: chunked prefill (offset > 0 with several new tokens) uses a proper
causal mask. Reference: REFERENCE.md §4, modeling_qwen.py / qwen_generation_utils.py of the hub
repo; transformers' ``Qwen2ForCausalLM`` computes the same function within ``seq_length``
(w2 = gate, w1 = up). The tokenizer, ChatML template and post-processing are in
``llmchat.tokenizers.qwen`` (re-exported below as contract hooks).

Shapes: B batch, T new tokens, S cached + new tokens, H heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmchat.cache import KVCache
from llmchat.errors import UnsupportedCheckpointError
from llmchat.models.layers import (
    BIG,
    Range,
    RMSNorm,
    causal_attention,
    check_settings,
    check_values,
    embedding,
    renamed,
    require,
    require_keys,
)
from llmchat.tokenizers.qwen import (  # noqa: F401 - the text hooks of the contract
    DEFAULT_SYSTEM,
    SPECIAL_START_ID,
    SPECIAL_TOKENS,
    build_prompt,
    encode_messages,
    holdback,
    load_tokenizer,
    postprocess,
    stop_ids,
)


@dataclass(frozen=True)
class Config:
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016  # w1 and w2 are each intermediate_size // 2 wide
    eps: float = 1e-6
    seq_length: int = 8192
    max_positions: int = 8192
    rope_theta: float = 10000.0
    no_bias: bool = True
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True

    # config.json key -> field: v1.1 names, then the v1.0 names (which win where present)
    _HF_KEYS = {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "intermediate_size": "intermediate_size",
        "max_position_embeddings": "max_positions",
        "kv_channels": "kv_channels",
        "layer_norm_epsilon": "eps",
        "seq_length": "seq_length",
        "rotary_emb_base": "rope_theta",
        "no_bias": "no_bias",
        "use_dynamic_ntk": "use_dynamic_ntk",
        "use_logn_attn": "use_logn_attn",
    }
    _V10_KEYS = {
        "padded_vocab_size": "vocab_size",
        "n_embd": "hidden_size",
        "n_layer": "num_layers",
        "n_head": "num_heads",
        "ffn_hidden_size": "intermediate_size",
        "n_positions": "max_positions",
    }
    # settings this implementation assumes: key -> (required value, default when absent)
    _REQUIRED = {
        "rotary_pct": (1.0, 1.0),
        "tie_word_embeddings": (False, False),
        "use_cache_quantization": (False, False),
        "apply_residual_connection_post_layernorm": (False, False),
        "pos_emb": ("rotary", "rotary"),
        "activation": ("swiglu", "swiglu"),
    }

    _RANGES: ClassVar[dict[str, Range]] = {
        **dict.fromkeys(("vocab_size", "padded_vocab_size"), (int, 1, BIG)),
        **dict.fromkeys(("hidden_size", "n_embd"), (int, 1, 1 << 16)),
        **dict.fromkeys(("num_hidden_layers", "n_layer"), (int, 1, 256)),
        **dict.fromkeys(("num_attention_heads", "n_head"), (int, 1, 1024)),
        **dict.fromkeys(("intermediate_size", "ffn_hidden_size"), (int, 2, BIG)),
        **dict.fromkeys(("max_position_embeddings", "n_positions", "seq_length"), (int, 1, BIG)),
        "kv_channels": (int, 4, 4096),
        "layer_norm_epsilon": (float, 0.0, 1.0),
        "rotary_emb_base": (float, 0.0, 1e9),
    }

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Config:
        check_values(hf, cls._RANGES, "Qwen")
        check_settings(hf, cls._REQUIRED, "Qwen")
        if hf.get("quantization_config"):
            raise UnsupportedCheckpointError(
                "unsupported Qwen checkpoint: GPTQ-quantized weights (quantization_config); "
                "use the fp16/bf16 checkpoint with --quant 8 or 4"
            )
        v10 = "n_embd" in hf
        # the v1.0 class defaults differ from v1.1 for settings its config may omit
        kw: dict[str, Any] = (
            {"eps": 1e-5, "use_dynamic_ntk": False, "use_logn_attn": False, "max_positions": 6144}
            if v10 else {}
        )
        kw.update(renamed(hf, cls._HF_KEYS))
        kw.update(renamed(hf, cls._V10_KEYS))  # v1.0 names win
        require_keys(hf, ("n_embd", "n_layer", "n_head") if v10 else (
            "hidden_size", "num_hidden_layers", "num_attention_heads"))
        if v10 and hf.get("vocab_size") not in (None, kw.get("vocab_size")):
            # v1.0 sizes wte by padded_vocab_size and lm_head by vocab_size
            raise UnsupportedCheckpointError(
                "unsupported Qwen config: vocab_size differs from padded_vocab_size"
            )
        kw["rope_theta"] = float(kw.get("rope_theta", 10000.0))
        cfg = cls(**kw)
        require(cfg.kv_channels * cfg.num_heads == cfg.hidden_size, "Qwen",
                f"kv_channels {cfg.kv_channels} * num_attention_heads {cfg.num_heads} must "
                f"equal hidden_size {cfg.hidden_size}")
        require(cfg.kv_channels % 2 == 0, "Qwen", f"kv_channels {cfg.kv_channels} must be even")
        require(cfg.intermediate_size % 2 == 0, "Qwen",
                f"intermediate_size {cfg.intermediate_size} must be even")
        require(cfg.vocab_size >= SPECIAL_START_ID + len(SPECIAL_TOKENS), "Qwen",
                f"vocab_size {cfg.vocab_size} must hold the "
                f"{SPECIAL_START_ID + len(SPECIAL_TOKENS)} tokenizer ids")
        return cfg

    def layer_counts(self) -> dict[str, tuple[str, int]]:
        """Checkpoint key prefix -> (config.json key, layers it says), checked against the keys."""
        return {"transformer.h": ("num_hidden_layers", self.num_layers)}

    def ntk_factor(self, kv_len: int) -> float:
        """The dynamic-NTK factor for a prompt of ``kv_len`` tokens (1 when it is off)."""
        return ntk_alpha(kv_len, self.seq_length) if self.use_dynamic_ntk else 1.0


# -- long-context helpers ------------------------------------------------------------------------
def ntk_alpha(kv_len: int, seq_length: int) -> float:
    """Upstream's dynamic-NTK factor for a prompt of ``kv_len`` tokens (1 within seq_length)."""
    return float(max(2 ** math.ceil(math.log(kv_len / seq_length, 2) + 1) - 1, 1))


class Cache(KVCache):
    """The KV cache plus the sequence's dynamic-NTK factor, decided at prefill from the whole
    prompt and kept for the decode steps (cached keys carry the rotary of that factor)."""

    def __init__(self, cfg: Config, max_len: int, *, dtype: torch.dtype, device: Any) -> None:
        super().__init__(cfg.num_layers, cfg.num_heads, cfg.kv_channels, max_len, dtype=dtype,
                         device=device)
        self.cfg = cfg
        self.ntk_alpha = 1.0

    def reset(self) -> None:
        super().reset()
        self.ntk_alpha = 1.0

    def rope_alpha(self, t: int) -> float:
        """The NTK factor for ``t`` new tokens: set at prefill (offset 0), then kept."""
        if self.offset == 0:
            self.ntk_alpha = self.cfg.ntk_factor(t)
        return self.ntk_alpha

    def reusable(self, prompt_len: int) -> bool:
        """Reuse keys only while a new prompt of ``prompt_len`` tokens gets the same alpha."""
        return self.cfg.ntk_factor(prompt_len) == self.ntk_alpha


def rope_cos_sin(positions: Tensor, dim: int, theta: float, alpha: float) -> tuple[Tensor, Tensor]:
    """fp32 cos/sin of shape (T, dim) for full-width half-split rotary with NTK factor alpha."""
    base = theta * alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** (
        torch.arange(0, dim, 2, device=positions.device).float() / dim
    )
    freqs = torch.outer(positions.float(), inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D): pairs (j, j + D/2) share an angle
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) in fp32 with rotate_half, then cast back to x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def logn_scale(offset: int, t: int, seq_length: int, device: Any) -> Tensor:
    """log_{seq_length}(p) for 1-based positions p = offset+1 .. offset+t, 1 up to seq_length."""
    p = torch.arange(offset + 1, offset + t + 1, device=device, dtype=torch.float64)
    scale = torch.where(p > seq_length, p.log() / math.log(seq_length), torch.ones_like(p))
    return scale.float()  # (T,)


class Attention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=not cfg.no_bias)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], logn: Tensor | None, layer: int,
        cache: KVCache | None,
    ) -> Tensor:
        b, t, hidden = x.shape
        h, d = self.cfg.num_heads, self.cfg.kv_channels
        q, k, v = self.c_attn(x).split(hidden, dim=-1)  # contiguous [q | k | v]
        q = q.view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, h, d).transpose(1, 2)
        v = v.view(b, t, h, d).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, D)
        if logn is not None:
            q = q * logn.to(q.dtype)[:, None]  # (T, 1) broadcast over heads and dims
        out = causal_attention(q, k, v, cache)  # (B, H, T, D)
        return self.c_proj(out.transpose(1, 2).reshape(b, t, hidden))


class MLP(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        inner, bias = cfg.intermediate_size // 2, not cfg.no_bias
        self.w1 = nn.Linear(cfg.hidden_size, inner, bias=bias)
        self.w2 = nn.Linear(cfg.hidden_size, inner, bias=bias)
        self.c_proj = nn.Linear(inner, cfg.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))  # the gate is w2


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.eps, cast_first=True)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.eps, cast_first=True)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], logn: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, logn, self.layer, cache)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.wte = embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.eps, cast_first=True)


class Model(nn.Module):
    """Parameter names equal the checkpoint keys (``transformer.h.0.attn.c_attn.weight``...)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Upstream runs past seq_length (NTK + logn) up to its position tables' size.
        self.max_positions: int | None = cfg.max_positions

    def make_cache(self, max_len: int, *, dtype: torch.dtype, device: Any) -> Cache:
        return Cache(self.config, max_len, dtype=dtype, device=device)

    def static_key(self, cache: Cache) -> object | None:
        """A static (capturable) decode step bakes in the prefill's NTK alpha, so a new alpha
        needs a new capture; past seq_length logn scaling varies per step: decode eagerly."""
        cfg = self.config
        if cfg.use_logn_attn and cache.offset + 1 > cfg.seq_length:
            return None
        return cache.ntk_alpha

    def forward(
        self, input_ids: Tensor, cache: Cache | None = None, *, last_only: bool = False
    ) -> Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position when ``last_only``."""
        cfg = self.config
        offset = cache.offset if cache is not None else 0
        t = input_ids.shape[1]
        kv_len = offset + t
        if cache is not None:
            alpha, positions = cache.rope_alpha(t), cache.positions(t)
        else:
            alpha, positions = cfg.ntk_factor(t), torch.arange(t, device=input_ids.device)
        rope = rope_cos_sin(positions, cfg.kv_channels, cfg.rope_theta, alpha)
        logn = None
        if cfg.use_logn_attn and kv_len > cfg.seq_length:
            logn = logn_scale(offset, t, cfg.seq_length, input_ids.device)
        tr = self.transformer
        x = tr.wte(input_ids)  # (B, T, hidden)
        for block in tr.h:
            x = block(x, rope, logn, cache)
        if cache is not None:
            cache.advance(t)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(tr.ln_f(x))


def checkpoint_key(key: str) -> str | None:
    """Checkpoint key -> parameter name (the same); None for upstream's derived buffers."""
    if key.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
        return None
    return key


QUANT_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


INVALID_SCORES = None  # upstream has no nan/inf guard
SUPPORTS_SYSTEM = True
CAUSAL_PROMPT = True  # a conversation's earlier keys/values are reused on the next turn
# Upstream _decode_chatml cuts the reply's last token when no end token was generated (the
# reply hit max_new_tokens); chat() shows and keeps that shorter reply, and so do we.
DROP_LAST_TOKEN_AT_LENGTH = True

