"""A tiny VisualGLM-6B checkpoint in the upstream HF layout.

The real ``config.json`` with the sizes shrunk (LM, ``eva_config``, ``qformer_config``), the real
``ice_text.model``, and every key the upstream files carry, including the tied ``lm_head.weight``
and the per-layer ``rotary_emb.inv_freq`` buffers the loader must drop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.checkpoints import build_state_dict, save_checkpoint, shared, upstream_config

VISUALGLM_TINY = {
    "hidden_size": 32, "num_layers": 2, "num_attention_heads": 2, "inner_hidden_size": 64,
    "max_sequence_length": 512,
}
# The ViT and the Q-Former get different widths so a mixed-up cross-attention shape fails.
EVA_TINY = {
    "num_layers": 2, "hidden_size": 48, "num_attention_heads": 2, "inner_hidden_size": 64,
    "image_size": [28, 28], "patch_size": 14, "max_sequence_length": 5,
}
QFORMER_TINY = {
    "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "is_decoder": [True, False],
    "cross_attn_hidden_size": 48,
}


def visualglm_config(**overrides: Any) -> dict[str, Any]:
    cfg = upstream_config("visualglm-6b")
    cfg.update(VISUALGLM_TINY)
    cfg["eva_config"] = {**cfg["eva_config"], **EVA_TINY}
    cfg["qformer_config"] = {**cfg["qformer_config"], **QFORMER_TINY}
    cfg.update(overrides)
    return cfg


def visualglm_checkpoint(path: Path, *, fmt: str = "bin-sharded", seed: int = 0,
                         dtype: torch.dtype = torch.float16, **overrides: Any) -> Path:
    """A tiny VisualGLM-6B directory (sharded .bin + index by default) with the real tokenizer."""
    from llmchat.models import visualglm

    hf = visualglm_config(**overrides)
    cfg = visualglm.Config.from_hf(hf)
    sd = build_state_dict(visualglm.Model, cfg, seed=seed, std=0.3, dtype=dtype)
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()  # tied upstream
    rot = cfg.hidden_size // cfg.num_heads // 2
    inv_freq = (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).half()
    for i in range(cfg.num_layers):
        sd[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq
    tok = shared("tokenizers/chatglm-6b")
    return save_checkpoint(path, hf, sd, fmt=fmt, shards=3,
                           tokenizer_files=(tok / "ice_text.model", tok / "tokenizer_config.json"))
