"""A tiny ChatGLM-6B checkpoint in the upstream hub layout (reused by the VisualGLM tests).

The upstream config.json with only the sizes shrunk (the real 130528-row vocabulary and token
ids stay), the real ``ice_text.model``, and a state dict keyed like the hub's: every
``transformer.*`` tensor, the per-layer ``attention.rotary_emb.inv_freq`` buffers, and a stored
``lm_head.weight`` (a copy of the tied word embeddings) in the last shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.checkpoints import build_state_dict, save_checkpoint, shared, upstream_config

# head dim 16, so each of the two rotary halves has 8 dims
CHATGLM_TINY = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_layers": 2,
    "inner_hidden_size": 256,
}


def chatglm_config(**overrides: Any) -> dict[str, Any]:
    cfg = upstream_config("chatglm-6b")
    cfg.update(CHATGLM_TINY)
    cfg.update(overrides)
    return cfg


def chatglm_state_dict(hf: dict[str, Any], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp16 weights with upstream key names and order (lm_head last, as in the index)."""
    from llmchat.models import chatglm

    cfg = chatglm.Config.from_hf(hf)
    sd = build_state_dict(chatglm.Model, cfg, seed=seed)
    rot = cfg.head_dim // 2
    inv_freq = (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).half()
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        out[key] = t
        if key.endswith("attention.query_key_value.bias"):  # the unused rotary buffer
            out[key.replace("query_key_value.bias", "rotary_emb.inv_freq")] = inv_freq.clone()
    out["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()
    return out


def chatglm_checkpoint(
    path: Path,
    *,
    fmt: str = "bin-sharded",
    seed: int = 0,
    state_dict: dict[str, torch.Tensor] | None = None,
    **overrides: Any,
) -> Path:
    """A tiny ChatGLM-6B directory: config.json, weights in ``fmt``, ice_text.model."""
    hf = chatglm_config(**overrides)
    if state_dict is None:
        state_dict = chatglm_state_dict(hf, seed=seed)
    tok = shared("tokenizers/chatglm-6b")
    files = tuple(f for f in (tok / "ice_text.model", tok / "tokenizer_config.json") if f.exists())
    return save_checkpoint(path, hf, state_dict, fmt=fmt, tokenizer_files=files)
