"""ChatGLM2-6B (THUDM/chatglm2-6b), native PyTorch.

A pre-norm decoder with RMSNorm, SwiGLU and multi-query attention in ``multi_query_group_num``
KV groups (2 at 6B: query head h uses group h // (heads / groups)). The fused
``query_key_value`` projection (the only one with a bias) is laid out as contiguous blocks
``[q: heads*D | k: groups*D | v: groups*D]``. Rotary embeddings cover the first half of each
head (64 of 128 dims) with GPT-J-style interleaved pairs (2i, 2i+1); the rest passes through.
Positions are plain 0..L-1 with a causal mask, and ``output_layer`` is untied.

Departure from upstream: the RoPE angles and cos/sin are computed and applied in fp32. Upstream
casts its cos/sin table to fp16 (to mimic complex32), which loses the angle precision beyond
~2k positions; in fp32 both agree exactly. Reference: REFERENCE.md §3, modeling_chatglm.py of
the hub repo; transformers' ``GlmForCausalLM`` computes the same function.

Shapes: B batch, T new tokens, S cached + new tokens, H query heads, G kv groups, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmchat.cache import KVCache
from llmchat.errors import UnsupportedCheckpointError
from llmchat.generate import InvalidScoreGuard
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
from llmchat.tokenizers.chatglm2 import (  # noqa: F401 - the text hooks of the contract
    build_prompt,
    encode_messages,
    holdback,
    load_tokenizer,
    postprocess,
    stop_ids,
)


@dataclass(frozen=True)
class Config:
    vocab_size: int = 65024
    hidden_size: int = 4096
    num_layers: int = 28
    num_heads: int = 32
    kv_channels: int = 128
    num_kv_groups: int = 2
    ffn_hidden_size: int = 13696
    eps: float = 1e-5
    seq_length: int = 32768
    rope_theta: float = 10000.0

    # config.json key -> field
    _HF_KEYS = {
        "padded_vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "kv_channels": "kv_channels",
        "multi_query_group_num": "num_kv_groups",
        "ffn_hidden_size": "ffn_hidden_size",
        "layernorm_epsilon": "eps",
        "seq_length": "seq_length",
    }
    # settings this implementation assumes: key -> (required value, default when absent)
    _REQUIRED = {
        "rmsnorm": (True, True),
        "add_bias_linear": (False, False),
        "add_qkv_bias": (True, False),
        "multi_query_attention": (True, False),
        "post_layer_norm": (True, True),
        "original_rope": (True, True),
        "apply_residual_connection_post_layernorm": (False, False),
    }

    _RANGES: ClassVar[dict[str, Range]] = {
        "padded_vocab_size": (int, 1, BIG),
        "hidden_size": (int, 1, 1 << 16),
        "num_layers": (int, 1, 256),
        "num_attention_heads": (int, 1, 1024),
        "kv_channels": (int, 2, 4096),
        "multi_query_group_num": (int, 1, 1024),
        "ffn_hidden_size": (int, 1, BIG),
        "layernorm_epsilon": (float, 0.0, 1.0),
        "seq_length": (int, 1, BIG),
        "rope_ratio": (float, 0.0, 1e6),
        "quantization_bit": (int, 0, 16),  # read by the loader (pre-quantized weights)
    }

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Config:
        check_settings(hf, cls._REQUIRED, "ChatGLM2")
        if hf.get("pre_seq_len"):
            raise UnsupportedCheckpointError("unsupported ChatGLM2 config: P-tuning (pre_seq_len)")
        require_keys(hf, ("padded_vocab_size", "hidden_size", "num_layers", "num_attention_heads"))
        check_values(hf, cls._RANGES, "ChatGLM2")
        kw = renamed(hf, cls._HF_KEYS)
        kw["rope_theta"] = 10000.0 * float(hf.get("rope_ratio", 1.0))
        cfg = cls(**kw)
        require(cfg.num_heads % cfg.num_kv_groups == 0, "ChatGLM2",
                f"num_attention_heads {cfg.num_heads} must be a multiple of "
                f"multi_query_group_num {cfg.num_kv_groups}")
        require(cfg.kv_channels % 4 == 0, "ChatGLM2",
                f"kv_channels {cfg.kv_channels} must be a multiple of 4 (half-width rotary pairs)")
        return cfg

    def layer_counts(self) -> dict[str, tuple[str, int]]:
        """Checkpoint key prefix -> (config.json key, layers it says), checked against the keys."""
        return {"transformer.encoder.layers": ("num_layers", self.num_layers)}


def rope_cos_sin(positions: Tensor, rot_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """fp32 cos/sin of shape (T, rot_dim/2) for the interleaved half-width rotary."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, rot_dim, 2, dtype=torch.float32, device=positions.device) / rot_dim
    )
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, rot_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the first 2 * cos.shape[-1] dims of x (B,h,T,D)."""
    rot = cos.shape[-1] * 2
    xr = x[..., :rot].float().unflatten(-1, (-1, 2))  # (B, h, T, rot/2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.kv_channels
        self.query_key_value = nn.Linear(
            cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_groups) * d, bias=True
        )
        self.dense = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, cache: KVCache | None
    ) -> Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        d, h, g = cfg.kv_channels, cfg.num_heads, cfg.num_kv_groups
        q, k, v = self.query_key_value(x).split((h * d, g * d, g * d), dim=-1)
        q = q.view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, g, d).transpose(1, 2)  # (B, G, T, D)
        v = v.view(b, t, g, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, G, S, D)
        out = causal_attention(q, k, v, cache)  # (B, H, T, D); head i uses group i // (H/G)
        return self.dense(out.transpose(1, 2).reshape(b, t, h * d))


class MLP(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.eps, cast_first=False)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.eps, cast_first=False)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, self.layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.word_embeddings = embedding(cfg.vocab_size, cfg.hidden_size)


class Encoder(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.eps, cast_first=False)


class Transformer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embedding = Embedding(cfg)
        self.encoder = Encoder(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class Model(nn.Module):
    """Parameter names equal the checkpoint keys (``transformer.encoder.layers.0....``)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.max_positions: int | None = cfg.seq_length

    def make_cache(self, max_len: int, *, dtype: torch.dtype, device: Any) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.num_kv_groups, c.kv_channels, max_len,
                       dtype=dtype, device=device)

    def static_key(self, cache: KVCache) -> object | None:
        """Decode steps depend on no per-sequence Python state but the prefix length (positions
        subtract it): capturable, once per prefix length."""
        return cache.prefix_len

    def forward(
        self, input_ids: Tensor, cache: KVCache | None = None, *, last_only: bool = False
    ) -> Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position when ``last_only``."""
        tr = self.transformer
        t = input_ids.shape[1]
        if cache is not None:
            positions = cache.positions(t)
        else:
            positions = torch.arange(t, device=input_ids.device)
        cos, sin = rope_cos_sin(positions, self.config.kv_channels // 2, self.config.rope_theta)
        x = tr.embedding.word_embeddings(input_ids)  # (B, T, hidden)
        for block in tr.encoder.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.advance(t)
        if last_only:
            x = x[:, -1:]
        return tr.output_layer(tr.encoder.final_layernorm(x))


def checkpoint_key(key: str) -> str | None:
    """Checkpoint key -> parameter name (the same), or None for the unused rotary buffer."""
    if key.endswith("rotary_pos_emb.inv_freq"):
        return None
    return key


QUANT_LINEARS = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)


INVALID_SCORES = InvalidScoreGuard(5)  # upstream InvalidScoreLogitsProcessor: id 5 on nan/inf
SUPPORTS_SYSTEM = False
CAUSAL_PROMPT = True  # a conversation's earlier keys/values are reused on the next turn
