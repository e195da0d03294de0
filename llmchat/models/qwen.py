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

Departures from upstream: chunked prefill (offset > 0 with several new tokens) uses a proper
causal mask; ids the tokenizer does not know (the padded rows 151851..151935) decode to nothing
instead of raising. Reference: REFERENCE.md §4, modeling_qwen.py / tokenization_qwen.py /
qwen_generation_utils.py of the hub repo; transformers' ``Qwen2ForCausalLM`` computes the same
function within ``seq_length`` (w2 = gate, w1 = up).

Shapes: B batch, T new tokens, S cached + new tokens, H heads, D head dim.
"""

from __future__ import annotations

import binascii
import math
import unicodedata
from base64 import b64decode
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmchat.cache import KVCache
from llmchat.errors import TokenizerError, UnsupportedCheckpointError
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
from llmchat.types import Message, split_turns


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

    def alpha_for(self, kv_len: int) -> float:
        cfg = self.cfg
        return ntk_alpha(kv_len, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0

    def reset(self) -> None:
        super().reset()
        self.ntk_alpha = 1.0

    def rope_alpha(self, t: int) -> float:
        """The NTK factor for ``t`` new tokens: set at prefill (offset 0), then kept."""
        if self.offset == 0:
            self.ntk_alpha = self.alpha_for(t)
        return self.ntk_alpha

    def reusable(self, prompt_len: int) -> bool:
        """Reuse keys only while a new prompt of ``prompt_len`` tokens gets the same alpha."""
        return self.alpha_for(prompt_len) == self.ntk_alpha


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
            alpha = ntk_alpha(t, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
            positions = torch.arange(t, device=input_ids.device)
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


# -- tokenizer ---------------------------------------------------------------------------------
# Upstream tokenization_qwen.py PAT_STR (digits split one by one, cl100k-like otherwise).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_START_ID = 151643
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))
TOKENIZER_FILE = "qwen.tiktoken"


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse ``base64(token) rank`` lines, naming the first malformed line."""
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'base64-token rank'")
            ranks[b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error) as exc:
            raise TokenizerError(f"{path} line {n} is malformed ({exc}): {line[:60]!r}") from None
    if not ranks:
        raise TokenizerError(f"{path} holds no tokens")
    return ranks


class QwenTokenizer:
    """tiktoken BPE over ``qwen.tiktoken`` plus upstream's 208 special tokens."""

    def __init__(self, path: Path) -> None:
        import tiktoken

        ranks = read_tiktoken_ranks(path)
        if max(ranks.values()) >= SPECIAL_START_ID or len(set(ranks.values())) != len(ranks):
            raise TokenizerError(f"{path}: ranks must be unique and below {SPECIAL_START_ID}")
        if len(ranks) != SPECIAL_START_ID:  # unique and below it: then exactly 0..151642
            # a cut file leaves ids the model emits without text (empty replies)
            raise TokenizerError(
                f"{path} has {len(ranks):,} token ranks; the Qwen vocabulary needs all "
                f"{SPECIAL_START_ID:,} (ids 0..{SPECIAL_START_ID - 1}) besides the "
                f"{len(SPECIAL_TOKENS)} special tokens: the file is cut short or not Qwen's"
            )
        self.special = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special
        )
        self.eos_id = self.special[ENDOFTEXT]
        self.im_start_id = self.special[IM_START]
        self.im_end_id = self.special[IM_END]
        self.vocab_size = self.enc.n_vocab  # 151851
        self._known = set(ranks.values()) | set(self.special.values())

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """NFC-normalise and encode; special-token text is plain text unless allowed."""
        text = unicodedata.normalize("NFC", text)
        allowed: Any = "all" if allow_special else set()
        return list(self.enc.encode(text, allowed_special=allowed, disallowed_special=()))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes -> UTF-8 with U+FFFD for incomplete sequences (StreamDecoder holds them back)."""
        return self.enc.decode([i for i in ids if i in self._known], errors="replace")


def load_tokenizer(model_dir: Path) -> QwenTokenizer:
    return QwenTokenizer(Path(model_dir) / TOKENIZER_FILE)


# -- chat format (ChatML, upstream make_context) ------------------------------------------------
DEFAULT_SYSTEM = "You are a helpful assistant."
MAX_WINDOW_SIZE = 6144  # generation_config.json max_window_size


def _system(messages: Sequence[Message]) -> tuple[str, list[tuple[str, str]], str]:
    system, history, query = split_turns(list(messages))
    return (DEFAULT_SYSTEM if system is None else system), history, query


def build_prompt(messages: Sequence[Message]) -> str:
    """The ChatML text of the whole conversation (before window truncation)."""
    system, history, query = _system(messages)
    parts = [f"<|im_start|>system\n{system}<|im_end|>"]
    for q, r in history:
        parts.append(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>")
    parts.append(f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n")
    return "\n".join(parts)


def encode_messages(
    tok: QwenTokenizer, messages: Sequence[Message], *, max_window_size: int = MAX_WINDOW_SIZE
) -> list[int]:
    """Upstream ``make_context``: role and content encoded separately (specials as plain text),
    parts joined by "\\n"; past turns kept newest-first while they fit ``max_window_size``."""
    system, history, query = _system(messages)
    nl = tok.encode("\n")

    def part(role: str, content: str) -> list[int]:
        return [tok.im_start_id, *tok.encode(role), *nl, *tok.encode(content), tok.im_end_id]

    system_ids = part("system", system)
    context: list[int] = []
    for q, r in reversed(history):
        turn = nl + part("user", q) + nl + part("assistant", r)
        if len(system_ids) + len(turn) + len(context) >= max_window_size:
            break  # as upstream: stop at the first turn that does not fit
        context = turn + context
    return [*system_ids, *context, *nl, *part("user", query), *nl, tok.im_start_id,
            *tok.encode("assistant"), *nl]


def postprocess(text: str) -> str:
    """Upstream ``_decode_chatml``: the reply up to the first stop token, stripped."""
    return text.strip()


def holdback(text: str) -> int:
    return 0  # strip() already keeps trailing whitespace back while streaming


def stop_ids(tok: QwenTokenizer) -> frozenset[int]:
    return frozenset({tok.im_end_id, tok.im_start_id, tok.eos_id})


INVALID_SCORES = None  # upstream has no nan/inf guard
SUPPORTS_SYSTEM = True
CAUSAL_PROMPT = True  # a conversation's earlier keys/values are reused on the next turn
# Upstream _decode_chatml cuts the reply's last token when no end token was generated (the
# reply hit max_new_tokens); chat() shows and keeps that shorter reply, and so do we.
DROP_LAST_TOKEN_AT_LENGTH = True

