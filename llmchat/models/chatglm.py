"""ChatGLM-6B (THUDM/chatglm-6b, GLM v1), native PyTorch. Also the language model of VisualGLM-6B.

Departures from a standard pre-norm decoder (REFERENCE.md §2, hub revision 8b7d335):

* LayerNorm with bias, and a DeepNorm-style residual taken from the *normalised* input:
  ``a = LN1(x); h = a*alpha + attn(a); m = LN2(h); out = m*alpha + mlp(m)``.
* The fused ``query_key_value`` is interleaved per head: head h owns rows ``[q_h; k_h; v_h]``.
* 2D rotary positions: dims 0..D/2 of each head rotate by ``position_ids`` and dims D/2..D by
  ``block_position_ids``, both half-split (rotate_half) style.
* Prefix-LM: the prompt up to ``<sop>`` attends bidirectionally, generation is causal. The
  model builds positions and mask itself from the ids (``[gMASK]``/``[MASK]`` and ``<sop>``) and
  the cache state, so the generic generator needs to know nothing about them.
* Attention scales q by 1/(sqrt(D)*(layer+1)), fills masked scores with -10000, then multiplies
  by (layer+1) in fp32 before the softmax — kept as is so fp16 runs round like upstream.
* tanh-GELU MLP; ``lm_head`` is tied to the word embeddings.

The tokenizer, template and post-processing are in ``llmchat.tokenizers.chatglm`` (re-exported
below as this module's contract hooks); the sequence's position state is ``Cache``.

Departure: the RoPE angles are computed in fp32 (from the fp16-rounded ``inv_freq``, as upstream).
Upstream's fp16 path also rounds ``position * inv_freq`` to fp16, which is off by up to ~0.5 rad
near position 2000; in fp32 both agree exactly.

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
from llmchat.generate import InvalidScoreGuard
from llmchat.models.layers import (
    BIG,
    Range,
    check_values,
    embedding,
    renamed,
    require,
    require_keys,
)
from llmchat.tokenizers.chatglm import (  # noqa: F401 - the text hooks of the contract
    CURRENT_REVISION,
    build_prompt,
    encode_messages,
    holdback,
    load_tokenizer,
    postprocess,
    stop_ids,
)

# Upstream GLMBlock defaults num_layers=28 and ChatGLMModel never passes the real count, so the
# residual scale is sqrt(2*28) for every checkpoint, tiny test models included.
ALPHA = math.sqrt(2 * 28)


@dataclass(frozen=True)
class Config:
    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_heads: int = 32
    inner_hidden_size: int = 16384
    eps: float = 1e-5
    max_sequence_length: int = 2048
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    bos_token_id: int = 130004  # <sop>: the context ends before it
    eos_token_id: int = 130005  # <eop>

    # config.json key -> field
    _HF_KEYS = {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "inner_hidden_size": "inner_hidden_size",
        "layernorm_epsilon": "eps",
        "max_sequence_length": "max_sequence_length",
        "mask_token_id": "mask_token_id",
        "gmask_token_id": "gmask_token_id",
        "bos_token_id": "bos_token_id",
        "eos_token_id": "eos_token_id",
    }
    # Token ids are fixed by ice_text.model. Upstream's class defaults, which apply when
    # config.json omits a key, are the old revision's: vocab and ids 20000 higher.
    _TOKEN_KEYS = ("mask_token_id", "gmask_token_id", "bos_token_id", "eos_token_id")
    _OLD_OFFSET = 20000
    _RANGES: ClassVar[dict[str, Range]] = {
        "vocab_size": (int, 1, BIG),
        "hidden_size": (int, 1, 1 << 16),
        "num_layers": (int, 1, 256),
        "num_attention_heads": (int, 1, 1024),
        "inner_hidden_size": (int, 1, BIG),
        "layernorm_epsilon": (float, 0.0, 1.0),
        "max_sequence_length": (int, 1, BIG),
        **dict.fromkeys(_TOKEN_KEYS, (int, 0, BIG)),
        "quantization_bit": (int, 0, 16),  # read by the loader (pre-quantized weights)
    }

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Config:
        def unsupported(what: str) -> UnsupportedCheckpointError:
            return UnsupportedCheckpointError(f"unsupported ChatGLM-6B config: {what}")

        require_keys(hf, ("hidden_size", "num_layers", "num_attention_heads"))
        check_values(hf, cls._RANGES, "ChatGLM-6B")
        vocab = hf.get("vocab_size", cls.vocab_size + cls._OLD_OFFSET)
        ids = {k: hf.get(k, getattr(cls, k) + cls._OLD_OFFSET) for k in cls._TOKEN_KEYS}
        if vocab >= 150000 or any(v >= 150000 for v in ids.values()):
            raise UnsupportedCheckpointError(f"old ChatGLM-6B checkpoint: {CURRENT_REVISION}")
        for key in cls._TOKEN_KEYS:
            if ids[key] != (want := getattr(cls, key)):
                raise unsupported(f"{key} must be {want} (the ice_text.model id), got {ids[key]}")
        if not hf.get("position_encoding_2d", True):
            raise unsupported("position_encoding_2d must be true")
        if hf.get("pre_seq_len"):
            raise unsupported("P-tuning checkpoints (pre_seq_len) are not supported")
        if hf.get("quantization_embeddings"):
            raise unsupported("quantized embeddings (quantization_embeddings) are not supported")
        kw = renamed(hf, cls._HF_KEYS)
        kw.setdefault("inner_hidden_size", 4 * kw["hidden_size"])
        cfg = cls(**kw)
        require(
            cfg.hidden_size % cfg.num_heads == 0 and cfg.head_dim % 4 == 0, "ChatGLM-6B",
            f"hidden_size {cfg.hidden_size} / num_attention_heads {cfg.num_heads} must be a "
            "whole multiple of 4",
        )
        require(cfg.eos_token_id < cfg.vocab_size, "ChatGLM-6B",
                f"the token ids must be below vocab_size {cfg.vocab_size}")
        return cfg

    def layer_counts(self) -> dict[str, tuple[str, int]]:
        """Checkpoint key prefix -> (config.json key, layers it says), checked against the keys."""
        return {"transformer.layers": ("num_layers", self.num_layers)}


# -- positions, mask and rotary ----------------------------------------------------------------
class Cache(KVCache):
    """The KV cache plus the sequence's 2D-position state: the ``[gMASK]`` position and the
    last block position, (B,) device tensors the decode step reads and advances in place (so a
    captured step replays the update; ``state_version`` counts their reallocations)."""

    def __init__(self, cfg: Config, max_len: int, *, dtype: torch.dtype, device: Any) -> None:
        super().__init__(cfg.num_layers, cfg.num_heads, cfg.head_dim, max_len, dtype=dtype,
                         device=device)
        self.prefilled = False
        self.mask_position = torch.zeros(0, dtype=torch.long, device=device)
        self.block_position = torch.zeros(0, dtype=torch.long, device=device)

    def reset(self) -> None:
        super().reset()
        self.prefilled = False

    def device_state(self) -> tuple[Tensor, ...]:
        return (self.mask_position, self.block_position)

    def start(self, mask_position: Tensor, block_position: Tensor) -> None:
        """Record the prefill's ``[gMASK]`` and last block positions."""
        self.mask_position = self.keep(self.mask_position, mask_position)
        self.block_position = self.keep(self.block_position, block_position)
        self.prefilled = True

    def next_positions(self, t: int) -> tuple[Tensor, Tensor]:
        """Positions and block positions (B, T) of ``t`` tokens after the cached ones; the
        block position advances with them."""
        if not self.prefilled:
            raise ValueError("cached ChatGLM-6B step without a prefill")
        block = self.block_position[:, None] + 1 + torch.arange(t, device=self.device)[None, :]
        self.block_position.copy_(block[:, -1])  # in place: a captured step replays this
        return self.mask_position[:, None].expand(-1, t), block


def glm_positions(
    input_ids: Tensor, cfg: Config, cache: KVCache | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Position ids (B, T), block position ids (B, T) and the mask (B, 1, T, S), True = masked.

    At prefill (no cache or an empty one) the context is everything before ``<sop>``: it gets
    positions 0.., is visible to every query, and ``<sop>`` plus later tokens sit at the
    ``[gMASK]`` position with block positions 1, 2, ... A ``Cache`` records them, and cached
    steps continue from it; another ``KVCache`` (a training prefix cache) serves a prefill
    only. Returns None for the mask when nothing is masked.
    """
    b, t = input_ids.shape
    dev = input_ids.device
    ar = torch.arange(t, device=dev)
    prefix = cache.prefix_len if cache is not None else 0  # P-tuning prefix slots
    if cache is None or cache.offset == prefix:
        has_g = (input_ids == cfg.gmask_token_id).any(dim=1)
        mark = torch.where(
            has_g[:, None], input_ids == cfg.gmask_token_id, input_ids == cfg.mask_token_id
        )  # (B, T)
        sop = input_ids == cfg.bos_token_id
        if not (mark.any(dim=1).all() and sop.any(dim=1).all()):
            raise ValueError("ChatGLM-6B input needs a [gMASK] or [MASK] and a <sop> token")
        mask_pos = mark.int().argmax(dim=1)  # first occurrence, (B,)
        ctx = sop.int().argmax(dim=1)  # context length = index of <sop>, (B,)
        after = ar[None, :] >= ctx[:, None]  # (B, T)
        pos = torch.where(after, mask_pos[:, None], ar[None, :])
        block = (ar[None, :] - ctx[:, None] + 1).clamp(min=0)
        # causal, except that context columns are visible to every row
        masked = (ar[None, None, :] > ar[None, :, None]) & (ar[None, None, :] >= ctx[:, None, None])
        if isinstance(cache, Cache):
            cache.start(mask_pos, block[:, -1])
        if prefix:  # the prefix columns come first and are always visible (upstream :960-964)
            masked = F.pad(masked.expand(b, t, t), (prefix, 0), value=False)
        return pos, block, masked[:, None]  # mask (B, 1, T, P + T)
    if not isinstance(cache, Cache):
        raise ValueError("cached ChatGLM-6B steps need the model's Cache (Model.make_cache)")
    pos, block = cache.next_positions(t)
    visible = cache.key_mask()
    if visible is not None:  # a static step over the whole buffer: hide the unwritten slots
        return pos, block, ~visible
    if t == 1:
        return pos, block, None  # a single new token sees everything
    s = cache.offset + t
    masked = torch.arange(s, device=dev)[None, :] > (cache.offset + ar)[:, None]  # (T, S)
    return pos, block, masked[None, None].expand(b, 1, t, s)


def rope_cos_sin(pos: Tensor, block: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (B, 1, T, D): the first D/2 for ``pos``, the last D/2 for ``block``."""
    rot = head_dim // 2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2, device=pos.device).float() / rot)
    inv_freq = inv_freq.half().float()  # upstream stores inv_freq in fp16
    both = torch.stack((pos, block), dim=-1).float()  # (B, T, 2)
    freqs = both[..., None] * inv_freq  # (B, T, 2, rot/2)
    emb = torch.cat((freqs, freqs), dim=-1).flatten(-2)  # (B, T, D): [p | p | b | b] halves
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each D/2 half of x (B, H, T, D) in rotate_half style: pairs (j, j + D/4)."""
    # in the model dtype as upstream for fp16/fp32; bf16 (not an upstream mode) in fp32
    dt = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
    xc, cos, sin = x.to(dt), cos.to(dt), sin.to(dt)
    q = x.shape[-1] // 4
    x1, x2, x3, x4 = xc.split(q, dim=-1)
    rotated = torch.cat((-x2, x1, -x4, x3), dim=-1)  # rotate_half within each half
    return (xc * cos + rotated * sin).to(x.dtype)


# -- modules -----------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, cfg: Config, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        b, t, _ = x.shape
        h, d = self.cfg.num_heads, self.cfg.head_dim
        qkv = self.query_key_value(x).view(b, t, h, 3 * d)  # per head [q_h; k_h; v_h]
        q, k, v = (y.transpose(1, 2) for y in qkv.split(d, dim=-1))  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, S, D)
        coeff = float(self.layer + 1)
        scores = (q / (math.sqrt(d) * coeff)) @ k.transpose(-1, -2)  # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(mask, -10000.0)
        probs = (scores.float() * coeff).softmax(dim=-1).to(v.dtype)
        out = probs @ v  # (B, H, T, D)
        return self.dense(out.transpose(1, 2).reshape(b, t, h * d))


class MLP(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size, bias=True)
        self.dense_4h_to_h = nn.Linear(cfg.inner_hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        # the tanh approximation, which upstream writes out as a jit-scripted formula
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.attention = SelfAttention(cfg, layer)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        a = self.input_layernorm(x)
        h = a * ALPHA + self.attention(a, cos, sin, mask, cache)  # residual on the normalised a
        m = self.post_attention_layernorm(h)
        return m * ALPHA + self.mlp(m)


class Transformer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.word_embeddings = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)


class Model(nn.Module):
    """Parameter names equal the checkpoint keys; ``lm_head`` is the word-embedding matrix."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.max_positions: int | None = cfg.max_sequence_length  # the trained context
        self.tied_output = True  # the output layer streams the embedding matrix (benchmarks)

    def static_key(self, cache: Cache) -> object | None:
        """Decode steps read only the cache's device state: capturable until that state is
        reallocated."""
        return cache.state_version

    def make_cache(self, max_len: int, *, dtype: torch.dtype, device: Any) -> Cache:
        return Cache(self.config, max_len, dtype=dtype, device=device)

    def forward(
        self,
        input_ids: Tensor,
        cache: Cache | None = None,
        *,
        input_embeds: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits (B, T, V), or (B, 1, V) when ``last_only``.

        ``input_ids`` (B, T) always set the positions and mask; ``input_embeds`` (B, T, hidden),
        when given, replace the word-embedding lookup (VisualGLM splices image features there).
        """
        tr = self.transformer
        pos, block, mask = glm_positions(input_ids, self.config, cache)
        cos, sin = rope_cos_sin(pos, block, self.config.head_dim)
        x = tr.word_embeddings(input_ids) if input_embeds is None else input_embeds  # (B, T, hid)
        for layer in tr.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if last_only:
            x = x[:, -1:]
        return F.linear(tr.final_layernorm(x), tr.word_embeddings.weight)  # tied lm_head


def checkpoint_key(key: str) -> str | None:
    """Checkpoint key -> parameter name; the tied ``lm_head`` and rotary buffers are dropped."""
    if key == "lm_head.weight" or key.endswith("rotary_emb.inv_freq"):
        return None
    return key


QUANT_LINEARS = (
    "attention.query_key_value",
    "attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)


INVALID_SCORES = InvalidScoreGuard(5)  # upstream InvalidScoreLogitsProcessor: id 5 on nan/inf
SUPPORTS_SYSTEM = False
