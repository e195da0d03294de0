"""Sampling equals transformers' processors; the generator and stream decoder behave."""

from __future__ import annotations

import pytest
import torch

from llmchat.cache import KVCache
from llmchat.generate import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate_tokens,
    guard_invalid,
    make_sampler,
)
from llmchat.models import chatglm2
from llmchat.tokenizer import StreamDecoder, partial_suffix_len
from llmchat.types import GenerationConfig
from tests.checkpoints import build_state_dict

transformers = pytest.importorskip("transformers")


def logits_batch() -> torch.Tensor:
    return torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("k", [1, 5, 49, 50])
def test_top_k_equals_transformers(k: int) -> None:
    x = logits_batch()
    want = transformers.TopKLogitsWarper(top_k=k)(None, x.clone())
    assert torch.equal(apply_top_k(x, k), want)


@pytest.mark.parametrize("p", [0.1, 0.4, 0.7, 0.8, 0.95])
def test_top_p_equals_transformers(p: float) -> None:
    x = logits_batch()
    want = transformers.TopPLogitsWarper(top_p=p)(None, x.clone())
    assert torch.equal(apply_top_p(x, p), want)


@pytest.mark.parametrize("penalty", [1.1, 1.2, 0.9])
def test_repetition_penalty_equals_transformers(penalty: float) -> None:
    x = logits_batch()[:1]
    seen = torch.tensor([[3, 7, 7, 20, 49]])
    want = transformers.RepetitionPenaltyLogitsProcessor(penalty=penalty)(seen, x.clone())
    assert torch.equal(apply_repetition_penalty(x[0], seen[0], penalty), want[0])


def test_invalid_score_guard() -> None:
    x = torch.tensor([1.0, float("nan"), 2.0, 0.0, 0.0, 0.0, 1.0])
    out = guard_invalid(x, 5)
    assert out.argmax() == 5 and out[5] == 5e4 and out.sum() == 5e4
    y = torch.tensor([1.0, 2.0])
    assert guard_invalid(y, 0) is y


def test_sampler_greedy_seeded_and_min_length() -> None:
    x = torch.tensor([0.0, 3.0, 1.0, 2.9])
    seen = torch.tensor([], dtype=torch.long)
    greedy = make_sampler(GenerationConfig(temperature=0))
    assert greedy(x, seen, 1) == 1
    # min_length forbids the end token (id 1 here) until the sequence is long enough
    no_eos = make_sampler(GenerationConfig(temperature=0, min_length=10), eos_ids=[1])
    assert no_eos(x, seen, 5) == 3 and no_eos(x, seen, 10) == 1
    cfg = GenerationConfig(temperature=1.0, top_p=1.0, seed=1234)
    s1, s2 = make_sampler(cfg), make_sampler(cfg)
    draws = [s1(x, seen, 1) for _ in range(20)]
    assert draws == [s2(x, seen, 1) for _ in range(20)]
    other = make_sampler(cfg.with_(seed=99))
    assert [other(x, seen, 1) for _ in range(20)] != draws  # the seed matters
    # top_k=1 makes sampling deterministic whatever the seed
    assert make_sampler(GenerationConfig(temperature=5.0, top_k=1))(x, seen, 1) == 1


def test_sampler_distribution_matches_softmax() -> None:
    x = torch.tensor([0.0, 1.0, 2.0])
    s = make_sampler(GenerationConfig(temperature=1.0, top_p=1.0, seed=0))
    seen = torch.tensor([], dtype=torch.long)
    counts = torch.bincount(torch.tensor([s(x, seen, 1) for _ in range(3000)]), minlength=3)
    freq = counts.float() / 3000
    assert torch.allclose(freq, x.softmax(0), atol=0.04)


def tiny() -> chatglm2.Model:
    cfg = chatglm2.Config(
        vocab_size=96,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        kv_channels=8,
        num_kv_groups=2,
        ffn_hidden_size=48,
        seq_length=128,
    )
    m = chatglm2.Model(cfg)
    m.load_state_dict(build_state_dict(chatglm2.Model, cfg, seed=5, dtype=torch.float32))
    return m.eval()


def test_cached_generation_equals_uncached_greedy() -> None:
    model = tiny()
    prompt = [5, 9, 17, 3, 44]
    cache = model.make_cache(64, dtype=torch.float32, device="cpu")
    sample = make_sampler(GenerationConfig(temperature=0))
    got = list(
        generate_tokens(
            model, prompt, cache, sample=sample, max_new_tokens=20, stop_ids=frozenset()
        )
    )
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):  # no cache: re-run the whole sequence each step
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt) :]
    assert cache.offset == len(prompt) + 19  # the last token is never fed back


def test_generation_stops_on_stop_id_and_is_deterministic() -> None:
    model = tiny()
    cache = model.make_cache(64, dtype=torch.float32, device="cpu")
    sample = make_sampler(GenerationConfig(temperature=0))
    full = list(
        generate_tokens(
            model, [1, 2, 3], cache, sample=sample, max_new_tokens=10, stop_ids=frozenset()
        )
    )
    cache.reset()
    again = list(
        generate_tokens(
            model, [1, 2, 3], cache, sample=sample, max_new_tokens=10, stop_ids=frozenset()
        )
    )
    assert full == again
    cache.reset()
    stopped = list(
        generate_tokens(
            model, [1, 2, 3], cache, sample=sample, max_new_tokens=10, stop_ids=frozenset({full[3]})
        )
    )
    assert stopped == full[: full.index(full[3])]


def test_kv_cache_overflow_is_an_error_not_corruption() -> None:
    cache = KVCache(1, 1, 2, 4)  # no limit: never grows
    cache.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    cache.advance(3)
    with pytest.raises(RuntimeError, match="overflow"):
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_stream_decoder_holds_incomplete_utf8_and_holdback() -> None:
    data = "a😀b".encode()

    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    dec = StreamDecoder(decode, str.strip, lambda t: partial_suffix_len(t, "XYZ"))
    deltas = [dec.push(b) for b in data]
    assert deltas == ["a", "", "", "", "😀", "b"]
    dec2 = StreamDecoder(decode, str.strip, lambda t: partial_suffix_len(t, "XYZ"))
    out = [dec2.push(b) for b in b"okXY"] + [dec2.flush()]
    assert out == ["o", "k", "", "", "XY"]
    assert partial_suffix_len("abcXY", "XYZ") == 2 and partial_suffix_len("abc", "XYZ") == 0


def test_kv_cache_grows_on_demand_up_to_its_limit() -> None:
    model = tiny()
    prompt = [5, 9, 17, 3, 44]
    sample = make_sampler(GenerationConfig(temperature=0))
    big = model.make_cache(64, dtype=torch.float32, device="cpu")
    want = list(
        generate_tokens(model, prompt, big, sample=sample, max_new_tokens=40, stop_ids=frozenset())
    )
    small = model.make_cache(8, dtype=torch.float32, device="cpu")
    small.limit = 48
    got = list(
        generate_tokens(
            model, prompt, small, sample=sample, max_new_tokens=40, stop_ids=frozenset()
        )
    )
    assert got == want and small.max_len == 48  # 8 -> 16 -> 32 -> 48 (capped)
    capped = model.make_cache(8, dtype=torch.float32, device="cpu")
    capped.limit = 20
    with pytest.raises(RuntimeError, match="overflow"):
        list(
            generate_tokens(
                model,
                list(range(1, 25)),
                capped,
                sample=sample,
                max_new_tokens=1,
                stop_ids=frozenset(),
            )
        )


STREAM_TEXTS = [
    "第一行。\n第二行 with English words.\n\n    indented code()\n\tTabbed, and 标点！\n",
    "def f(x):\n    return x  # 注释\n\n\nclass A:\n        pass\n  two spaces\n",
    "emoji 😀\n🎉 party\n 空格开头\nHello .\nWorld ,\n[[训练时间]]\nend",
    "- item one\n- item two\n\n```python\nprint('hi')\n```\n最后一段，没有换行",
]


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2-6b", "qwen-7b-chat"])
def test_stream_decoder_line_freezing_is_exact_for_real_tokenizers(name: str) -> None:
    """Decoding from the last line end (with the anchor token) equals decoding everything."""
    import importlib

    from tests.checkpoints import shared

    module = importlib.import_module(
        {"chatglm-6b": "llmchat.models.chatglm", "chatglm2-6b": "llmchat.models.chatglm2",
         "qwen-7b-chat": "llmchat.models.qwen"}[name])
    tok = module.load_tokenizer(shared(f"tokenizers/{name}"))
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        dec = StreamDecoder(tok.decode, module.postprocess, module.holdback)
        deltas = []
        for i, t in enumerate(ids):
            deltas.append(dec.push(t))
            assert dec.raw() == tok.decode(ids[: i + 1])
        deltas.append(dec.flush())
        assert dec._anchor is not None  # freezing happened
        assert "".join(deltas) == module.postprocess(tok.decode(ids)) == dec.text()
