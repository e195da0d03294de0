"""Native ChatGLM2-6B: golden tensors, transformers oracle, tokenizer, template, generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmchat.cache import KVCache
from llmchat.models import chatglm2
from llmchat.tokenizer import StreamDecoder
from llmchat.tokenizers import chatglm2 as glm2_text
from llmchat.types import Message
from tests.checkpoints import build_state_dict, chatglm2_config, shared

TINY = chatglm2.Config(
    vocab_size=128,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    kv_channels=16,
    num_kv_groups=2,
    ffn_hidden_size=96,
    seq_length=256,
)


def tiny_model(cfg: chatglm2.Config = TINY, seed: int = 0, std: float = 0.1) -> chatglm2.Model:
    # std 0.1 keeps logits O(1), so 1e-5 compares the math, not fp32 rounding of huge values
    model = chatglm2.Model(cfg)
    sd = build_state_dict(chatglm2.Model, cfg, seed=seed, dtype=torch.float32, std=std)
    model.load_state_dict(sd)
    return model.eval()


def read_golden(path: Path) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    raw = path.read_bytes()
    off = 0

    def take(shape: list[int], dtype: type = np.float32) -> torch.Tensor:
        nonlocal off
        n = int(np.prod(shape))
        arr = np.frombuffer(raw, dtype, n, off)
        off += n * 4
        return torch.from_numpy(arr.copy()).reshape(shape)

    p = "transformer.encoder.layers.0."
    sd = {
        "transformer.embedding.word_embeddings.weight": take([5, 32]),
        p + "input_layernorm.weight": take([32]),
        p + "self_attention.query_key_value.weight": take([48, 32]),
        p + "self_attention.query_key_value.bias": take([48]),
        p + "self_attention.dense.weight": take([32, 32]),
        p + "post_attention_layernorm.weight": take([32]),
        p + "mlp.dense_h_to_4h.weight": take([96, 32]),
        p + "mlp.dense_4h_to_h.weight": take([32, 48]),
        "transformer.encoder.final_layernorm.weight": take([32]),
    }
    io = [
        take([1, 3], np.int32),
        take([1, 3, 32]),
        take([1, 1], np.int32),
        take([1, 1, 32]),
        take([1, 1], np.int32),
        take([1, 1, 32]),
    ]
    assert off == len(raw), "golden file not fully consumed"
    return sd, io


def test_block_matches_chatglm_cpp_golden_tensors() -> None:
    sd, (x1, y1, x2, y2, x3, y3) = read_golden(shared("golden/chatglm.cpp/glm2_model.data"))
    cfg = chatglm2.Config(
        vocab_size=5,
        hidden_size=32,
        num_layers=1,
        num_heads=8,
        kv_channels=4,
        num_kv_groups=2,
        ffn_hidden_size=48,
    )
    model = chatglm2.Model(cfg)
    sd["transformer.output_layer.weight"] = torch.zeros(5, 32)
    model.load_state_dict(sd)
    outs: list[torch.Tensor] = []
    model.transformer.encoder.final_layernorm.register_forward_hook(lambda m, i, o: outs.append(o))
    cache = model.make_cache(8, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for x in (x1, x2, x3):  # prefill of 3 tokens, then two cached steps at positions 3, 4
            model(x.long(), cache)
    for got, want in zip(outs, (y1, y2, y3), strict=True):
        torch.testing.assert_close(got, want, atol=5e-4, rtol=0)
        assert (got - want).abs().max() < 1e-5  # in fact exact up to fp32 rounding


def hf_glm(model: chatglm2.Model) -> torch.nn.Module:
    """transformers' GlmForCausalLM with the same weights (the oracle; equal in fp32)."""
    pytest.importorskip("transformers")
    from benchmarks.oracles import hf_glm as to_hf

    return to_hf(model)


def test_logits_equal_transformers_glm_prefill_and_cached_decode() -> None:
    model = tiny_model()
    hf = hf_glm(model)
    ids = torch.randint(0, TINY.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        cache = model.make_cache(64, dtype=torch.float32, device="cpu")
        got_prefill = model(ids[:, :30], cache)
        got_steps = [model(ids[:, i : i + 1], cache) for i in range(30, 40)]
    torch.testing.assert_close(got_prefill, want[:, :30], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(got_steps, 1), want[:, 30:], atol=1e-5, rtol=1e-5)


def test_cached_chunks_equal_full_forward() -> None:
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(TINY.num_layers, TINY.num_kv_groups, TINY.kv_channels, 32, batch=2)
        parts = [model(ids[:, :10], cache), model(ids[:, 10:17], cache), model(ids[:, 17:], cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.offset == 24
    assert model(ids[:, :5], None, last_only=True).shape == (2, 1, TINY.vocab_size)


def test_half_precision_forward_runs_and_tracks_fp32() -> None:
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).float()
        bf = model.to(torch.bfloat16)(ids).float()
    assert bf.dtype == torch.float32 and torch.isfinite(bf).all()
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), bf.flatten(), dim=0)
    assert cos > 0.99


def test_rope_table_stays_exact_at_long_positions() -> None:
    # fp32 angles: position 30000 must rotate by exactly 30000 * inv_freq (mod 2π)
    pos = torch.tensor([30000])
    cos, sin = chatglm2.rope_cos_sin(pos, 64, 10000.0)
    want = torch.tensor(30000.0, dtype=torch.float64) * (
        1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    )
    assert torch.allclose(cos[0].double(), want.cos(), atol=5e-3)
    assert torch.allclose(sin[0].double(), want.sin(), atol=5e-3)


def test_config_from_upstream_json_and_unsupported_settings() -> None:
    cfg = chatglm2.Config.from_hf(chatglm2_config())
    assert (cfg.hidden_size, cfg.num_kv_groups, cfg.vocab_size) == (64, 2, 65024)
    full = chatglm2.Config.from_hf(
        chatglm2_config(
            hidden_size=4096,
            num_layers=28,
            num_attention_heads=32,
            kv_channels=128,
            ffn_hidden_size=13696,
            seq_length=32768,
        )
    )
    assert full == chatglm2.Config()
    from llmchat.errors import UnsupportedCheckpointError

    for bad in (
        {"rmsnorm": False},
        {"add_bias_linear": True},
        {"multi_query_attention": False},
        {"original_rope": False},
        {"pre_seq_len": 128},
    ):
        with pytest.raises(UnsupportedCheckpointError):
            chatglm2.Config.from_hf(chatglm2_config(**bad))


# -- tokenizer and template -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok() -> glm2_text.ChatGLM2Tokenizer:
    return chatglm2.load_tokenizer(shared("tokenizers/chatglm2-6b"))


def test_reference_token_ids(tok: glm2_text.ChatGLM2Tokenizer) -> None:
    ids = chatglm2.encode_messages(tok, [Message("user", "你好")])
    assert ids == [
        64790,
        64792,
        790,
        30951,
        517,
        30910,
        30939,
        30996,
        13,
        13,
        54761,
        31211,
        39701,
        13,
        13,
        55437,
        31211,
    ]
    assert (tok.gmask_id, tok.sop_id, tok.eos_id, tok.vocab_size) == (64790, 64792, 2, 64794)


@pytest.mark.parametrize(
    "text",
    [
        "你好，世界！",
        "def f(x):\n\treturn x  # 注释",
        "emoji 😀🎉 ok",
        "  leading and trailing  ",
        "混合 English 和 中文 123",
    ],
)
def test_tokenizer_round_trip(tok: glm2_text.ChatGLM2Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_decode_drops_special_ids(tok: glm2_text.ChatGLM2Tokenizer) -> None:
    ids = tok.encode("你好")
    assert tok.decode([tok.gmask_id, tok.sop_id, *ids, tok.eos_id]) == "你好"


def test_template_golden_strings() -> None:
    one = [Message("user", "你好")]
    assert chatglm2.build_prompt(one) == "[Round 1]\n\n问：你好\n\n答："
    three = [
        Message("user", "你好"),
        Message("assistant", "你好👋！"),
        Message("user", "晚上睡不着"),
        Message("assistant", "试试运动。"),
        Message("user", "还有呢"),
    ]
    assert chatglm2.build_prompt(three) == (
        "[Round 1]\n\n问：你好\n\n答：你好👋！\n\n"
        "[Round 2]\n\n问：晚上睡不着\n\n答：试试运动。\n\n"
        "[Round 3]\n\n问：还有呢\n\n答："
    )


def test_postprocess_and_holdback() -> None:
    assert chatglm2.postprocess("  我训练于[[训练时间]]。 \n") == "我训练于2023年。"
    assert chatglm2.holdback("时间是[[训练") == 4
    assert chatglm2.holdback("完成[[训练时间]]") == 0


def test_stream_decoder_never_emits_replacement_chars(tok: glm2_text.ChatGLM2Tokenizer) -> None:
    text = "我训练于[[训练时间]]，🎉 emoji 和中文 ok"
    ids = tok.encode(text)
    dec = StreamDecoder(tok.decode, chatglm2.postprocess, chatglm2.holdback)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == chatglm2.postprocess(text) == dec.text()
    assert "[[" not in "".join(deltas)
