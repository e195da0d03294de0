"""transformers models holding the same weights as llmchat's native ones (test and benchmark
oracles only; llmchat itself never imports transformers).

In fp32, ``GlmForCausalLM`` computes exactly ChatGLM2-6B and ``Qwen2ForCausalLM`` computes
Qwen-7B-Chat within its ``seq_length`` (no NTK/logn), once the weights are mapped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def hf_glm(model: Any) -> nn.Module:
    """ChatGLM2 → ``GlmForCausalLM``: qkv rows split q|k|v, gate and up stay fused."""
    import transformers

    c = model.config
    hf_cfg = transformers.GlmConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_groups, head_dim=c.kv_channels, partial_rotary_factor=0.5,
        rms_norm_eps=c.eps, attention_bias=True, max_position_embeddings=c.seq_length,
        rope_theta=c.rope_theta, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=None, eos_token_id=2,
    )
    hf = transformers.GlmForCausalLM(hf_cfg)  # not meta: its rotary buffers are computed here
    d, h, g = c.kv_channels, c.num_heads, c.num_kv_groups
    ours = model.state_dict()  # plain tensors, also where the CPU weights are packed for oneDNN
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": ours["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": ours["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": ours["transformer.output_layer.weight"],
    }
    for i in range(c.num_layers):
        p, q = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        w = ours[q + "self_attention.query_key_value.weight"]
        b = ours[q + "self_attention.query_key_value.bias"]
        for name, (lo, hi) in {"q": (0, h * d), "k": (h * d, (h + g) * d),
                               "v": ((h + g) * d, (h + 2 * g) * d)}.items():
            sd[p + f"self_attn.{name}_proj.weight"] = w[lo:hi]
            sd[p + f"self_attn.{name}_proj.bias"] = b[lo:hi]
        sd[p + "self_attn.o_proj.weight"] = ours[q + "self_attention.dense.weight"]
        sd[p + "mlp.gate_up_proj.weight"] = ours[q + "mlp.dense_h_to_4h.weight"]
        sd[p + "mlp.down_proj.weight"] = ours[q + "mlp.dense_4h_to_h.weight"]
        sd[p + "input_layernorm.weight"] = ours[q + "input_layernorm.weight"]
        sd[p + "post_attention_layernorm.weight"] = ours[q + "post_attention_layernorm.weight"]
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def hf_qwen2(model: Any) -> nn.Module:
    """Qwen (v1) → ``Qwen2ForCausalLM``: c_attn split q|k|v; w2 is the gate, w1 the up."""
    import transformers

    c = model.config
    hc = transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size // 2, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_heads,
        rms_norm_eps=c.eps, rope_theta=c.rope_theta, tie_word_embeddings=False,
        max_position_embeddings=c.seq_length, use_sliding_window=False,
    )
    ref = transformers.Qwen2ForCausalLM(hc)
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"],
           "model.norm.weight": sd["transformer.ln_f.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.num_layers):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        for name, part in zip(("q", "k", "v"), sd[p + "attn.c_attn.weight"].chunk(3), strict=True):
            out[q + f"self_attn.{name}_proj.weight"] = part
        for name, part in zip(("q", "k", "v"), sd[p + "attn.c_attn.bias"].chunk(3), strict=True):
            out[q + f"self_attn.{name}_proj.bias"] = part
        out[q + "self_attn.o_proj.weight"] = sd[p + "attn.c_proj.weight"]
        out[q + "mlp.gate_proj.weight"] = sd[p + "mlp.w2.weight"]  # silu is applied to w2
        out[q + "mlp.up_proj.weight"] = sd[p + "mlp.w1.weight"]
        out[q + "mlp.down_proj.weight"] = sd[p + "mlp.c_proj.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
    ref.load_state_dict(out, strict=True)
    return ref.eval()
