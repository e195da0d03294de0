"""Tiny random-weight Qwen-7B-Chat checkpoints in the upstream layout.

``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``, the real v1.1
``config.json`` with only the sizes shrunk (or a v1.0-keys variant, REFERENCE.md §4.1), the
chat ``generation_config.json`` and the real ``qwen.tiktoken``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.checkpoints import build_state_dict, save_checkpoint, shared, upstream_config

QWEN_TINY = {
    "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 16,
    "intermediate_size": 192,
}

# v1.1 key -> v1.0 key (chat-v1.0-2023-08-04/config.json)
V10_RENAMES = {
    "hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
    "intermediate_size": "ffn_hidden_size", "max_position_embeddings": "n_positions",
}
V10_EXTRA = {
    "activation": "swiglu", "apply_residual_connection_post_layernorm": False,
    "bias_dropout_fusion": True, "bos_token_id": 151643, "eos_token_id": 151643,
    "params_dtype": "torch.bfloat16", "pos_emb": "rotary", "tokenizer_type": "QWenTokenizer",
    "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.1,
}


def qwen_config(*, v10: bool = False, **overrides: Any) -> dict[str, Any]:
    """The upstream v1.1 config with tiny sizes, or the same model under v1.0 key names."""
    cfg = upstream_config("qwen-7b-chat")
    cfg.update(QWEN_TINY)
    if v10:
        for new in ("attn_dropout_prob", "emb_dropout_prob", "tokenizer_class"):
            cfg.pop(new, None)
        for new, old in V10_RENAMES.items():
            cfg[old] = cfg.pop(new)
        cfg["padded_vocab_size"] = cfg["vocab_size"]
        cfg["seq_length"] = 2048
        cfg["n_positions"] = 6144
        cfg.update(V10_EXTRA)
    cfg.update(overrides)
    return cfg


def qwen_checkpoint(path: Path, fmt: str = "safetensors-sharded", v10: bool = False, *,
                    seed: int = 0, std: float = 0.5,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    **overrides: Any) -> Path:
    """Write a tiny Qwen-7B-Chat directory; ``overrides`` are config.json keys."""
    from llmchat.models import qwen

    hf = qwen_config(v10=v10, **overrides)
    if state_dict is None:
        cfg = qwen.Config.from_hf(hf)
        state_dict = build_state_dict(qwen.Model, cfg, seed=seed, std=std)
    gen = shared("configs-upstream/qwen-7b-chat/generation_config.json").read_text()
    return save_checkpoint(
        path, hf, state_dict, fmt=fmt,
        tokenizer_files=(shared("tokenizers/qwen-7b-chat/qwen.tiktoken"),),
        extra_files={"generation_config.json": gen},
    )


def read_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())
