"""ChatGLM-6B: the block against upstream reference tensors, positions and mask, the real
tokenizer, the chat template, response post-processing and streaming, and loading a tiny
upstream-layout checkpoint through the loader and the CLI."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from llmchat.errors import UnsupportedCheckpointError
from llmchat.models import chatglm
from llmchat.models.base import TransformerChatModel
from llmchat.models.chatglm import Config, Model, build_prompt, holdback, postprocess
from llmchat.tokenizer import StreamDecoder
from llmchat.tokenizers import chatglm as glm_text
from llmchat.types import Message
from tests.checkpoints import REPO, shared, upstream_config
from tests.ckpt_chatglm import chatglm_checkpoint

# The golden file's config (chatglm.cpp make_data_glm_model): ids 0, 1, 2 are read as
# "text, [gMASK], <sop>", which gives its position ids [[0,1,1],[0,0,1]] and mask.
GOLDEN_CFG = Config(
    vocab_size=5,
    hidden_size=32,
    num_layers=1,
    num_heads=8,
    inner_hidden_size=128,
    mask_token_id=0,
    gmask_token_id=1,
    bos_token_id=2,
    eos_token_id=3,
)
# A small random model with a small vocabulary for the cache tests.
TINY = Config(
    vocab_size=300,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    inner_hidden_size=256,
    mask_token_id=290,
    gmask_token_id=291,
    bos_token_id=294,
    eos_token_id=295,
)


def user(q: str) -> Message:
    return Message("user", q)


def conversation(*turns: str) -> list[Message]:
    """Alternating user/assistant contents, ending with a user message."""
    return [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def tok() -> glm_text.ChatGLMTokenizer:
    return chatglm.load_tokenizer(shared("tokenizers/chatglm-6b"))


def random_model(cfg: Config = TINY, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


# -- (1) the model against the upstream reference tensors --------------------------------------
def load_golden() -> tuple[Model, list[tuple[torch.Tensor, torch.Tensor]]]:
    raw = shared("golden/chatglm.cpp/glm_model.data").read_bytes()
    model = Model(GOLDEN_CFG).eval()
    offset = 0

    def take(shape: tuple[int, ...], dtype: type = np.float32) -> torch.Tensor:
        nonlocal offset
        n = int(np.prod(shape))
        arr = np.frombuffer(raw, dtype=dtype, count=n, offset=offset).reshape(shape)
        offset += n * 4
        return torch.from_numpy(arr.copy())

    names = [
        "input_layernorm.weight",
        "input_layernorm.bias",
        "attention.query_key_value.weight",
        "attention.query_key_value.bias",
        "attention.dense.weight",
        "attention.dense.bias",
        "post_attention_layernorm.weight",
        "post_attention_layernorm.bias",
        "mlp.dense_h_to_4h.weight",
        "mlp.dense_h_to_4h.bias",
        "mlp.dense_4h_to_h.weight",
        "mlp.dense_4h_to_h.bias",
    ]
    order = [
        "transformer.word_embeddings.weight",
        *(f"transformer.layers.0.{n}" for n in names),
        "transformer.final_layernorm.weight",
        "transformer.final_layernorm.bias",
    ]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(order) == sorted(shapes)
    model.load_state_dict({k: take(shapes[k]) for k in order}, strict=True)
    steps = []
    for t in (3, 1, 1):
        x = take((1, t), np.int32).long()
        steps.append((x, take((1, t, 32))))
    assert offset == len(raw), "the reference file was not consumed exactly"
    return model, steps


@pytest.mark.parametrize("use_embeds", [False, True])
def test_matches_upstream_reference_tensors(use_embeds: bool) -> None:
    model, steps = load_golden()
    assert [x.tolist() for x, _ in steps] == [[[0, 1, 2]], [[3]], [[4]]]
    captured: list[torch.Tensor] = []
    model.transformer.final_layernorm.register_forward_hook(
        lambda mod, args, out: captured.append(out)
    )
    cache = model.make_cache(8, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for x, _ in steps:
            embeds = model.transformer.word_embeddings(x) if use_embeds else None
            model(x, cache, input_embeds=embeds)
    assert cache.offset == 5
    for out, (_, want) in zip(captured, steps, strict=True):
        assert out.shape == want.shape
        torch.testing.assert_close(out, want, atol=5e-4, rtol=0)
        assert (out - want).abs().max() < 1e-5  # in practice it agrees to float32 rounding


def test_positions_over_a_plain_kv_cache() -> None:
    """A KVCache that is not the model's Cache (a training prefix cache) serves a prefill, as it
    did before the position state was typed; a cached step over one is a clear error."""
    from llmchat.cache import KVCache

    cfg = GOLDEN_CFG
    cache = KVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, 16)
    ids = torch.tensor([[4, 3, 4, 1, 2]])
    pos, block, _ = chatglm.glm_positions(ids, cfg, cache)
    assert pos.tolist() == [[0, 1, 2, 3, 3]] and block.tolist() == [[0, 0, 0, 0, 1]]
    cache.advance(5)
    with pytest.raises(ValueError, match="need the model's Cache"):
        chatglm.glm_positions(torch.tensor([[4]]), cfg, cache)


def test_positions_and_mask_follow_upstream() -> None:
    cfg = GOLDEN_CFG
    cache = Model(cfg).make_cache(16, dtype=torch.float32, device="cpu")
    ids = torch.tensor([[4, 3, 4, 1, 2]])  # text, [gMASK] at 3, <sop> at 4
    pos, block, mask = chatglm.glm_positions(ids, cfg, cache)
    assert pos.tolist() == [[0, 1, 2, 3, 3]] and block.tolist() == [[0, 0, 0, 0, 1]]
    assert mask is not None and mask.shape == (1, 1, 5, 5)
    # the context (before <sop>) is visible to every row; the rest is causal
    want = [[0, 0, 0, 0, 1]] * 4 + [[0, 0, 0, 0, 0]]
    assert mask[0, 0].int().tolist() == want
    cache.advance(5)
    for block_want in (2, 3):
        pos, block, mask = chatglm.glm_positions(torch.tensor([[4]]), cfg, cache)
        assert (pos.tolist(), block.tolist(), mask) == ([[3]], [[block_want]], None)
        cache.advance(1)
    # two new tokens at once: causal between them, everything cached visible
    pos, block, mask = chatglm.glm_positions(torch.tensor([[4, 4]]), cfg, cache)
    assert pos.tolist() == [[3, 3]] and block.tolist() == [[4, 5]]
    assert mask is not None and mask[0, 0].int().tolist() == [[0] * 8 + [1], [0] * 9]
    # [MASK] stands in when there is no [gMASK]; the first occurrence counts
    pos, block, _ = chatglm.glm_positions(torch.tensor([[4, 0, 0, 2, 3]]), cfg, None)
    assert pos.tolist() == [[0, 1, 2, 1, 1]] and block.tolist() == [[0, 0, 0, 1, 2]]
    with pytest.raises(ValueError, match="gMASK"):
        chatglm.glm_positions(torch.tensor([[4, 3, 2]]), cfg, None)


def test_rope_rotates_each_half_by_its_own_positions() -> None:
    """Independent per-pair formulation: dims j and j+4 of each 8-dim half rotate together by
    position * fp16(inv_freq_j); the first half uses position ids, the second block ids."""
    d = 16
    x = torch.randn(1, 2, 3, d, dtype=torch.float64).float()
    pos, block = torch.tensor([[0, 5, 7]]), torch.tensor([[0, 1, 9]])
    cos, sin = chatglm.rope_cos_sin(pos, block, d)
    got = chatglm.apply_rope(x, cos, sin)
    want = x.clone()
    inv = [float(torch.tensor(1 / 10000 ** (2 * j / 8)).half()) for j in range(4)]
    for t in range(3):
        for half, p in ((0, pos[0, t]), (8, block[0, t])):
            for j in range(4):
                a = float(p) * inv[j]
                u, v = x[..., t, half + j], x[..., t, half + j + 4]
                want[..., t, half + j] = u * np.cos(a) - v * np.sin(a)
                want[..., t, half + j + 4] = v * np.cos(a) + u * np.sin(a)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert inv[1] != 1 / 10000 ** (2 / 8)  # the fp16 rounding of inv_freq is really applied


# -- (4) cached decoding, prefix-LM, input embeddings -------------------------------------------
def test_cached_decode_equals_uncached_logits() -> None:
    model = random_model()
    prompt = [5, 17, 42, 291, 294]
    gen = [7, 250, 13]
    with torch.no_grad():
        full = model(torch.tensor([prompt + gen]))  # (1, 8, V) in one uncached pass
        cache = model.make_cache(16, dtype=torch.float32, device="cpu")
        steps = [model(torch.tensor([prompt]), cache)]
        steps += [model(torch.tensor([[t]]), cache) for t in gen]
        cached = torch.cat(steps, dim=1)
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
        # a two-token chunk after the prefill gives the same logits too
        cache.reset()
        model(torch.tensor([prompt]), cache)
        chunk = model(torch.tensor([gen[:2]]), cache)
        torch.testing.assert_close(chunk, full[:, 5:7], atol=1e-4, rtol=1e-4)
        last = model(torch.tensor([prompt]), None, last_only=True)
        assert last.shape == (1, 1, TINY.vocab_size)
        torch.testing.assert_close(last, full[:, 4:5], atol=1e-4, rtol=1e-4)


def test_prompt_attends_bidirectionally_generation_causally() -> None:
    model = random_model()
    base = [5, 17, 42, 291, 294, 7, 8]
    changed_ctx = [5, 17, 43, 291, 294, 7, 8]  # a later context token changes
    changed_gen = [5, 17, 42, 291, 294, 7, 9]  # the last generated token changes
    with torch.no_grad():
        a, b, c = (model(torch.tensor([ids])) for ids in (base, changed_ctx, changed_gen))
    assert not torch.allclose(a[:, 0], b[:, 0])  # position 0 sees the later context token
    torch.testing.assert_close(a[:, :6], c[:, :6])  # nothing sees a later generated token


def test_input_embeds_replace_the_lookup() -> None:
    model = random_model()
    ids = torch.tensor([[5, 17, 42, 291, 294]])
    with torch.no_grad():
        emb = model.transformer.word_embeddings(ids)
        torch.testing.assert_close(model(ids, input_embeds=emb), model(ids))
        spliced = emb.clone()
        spliced[:, 1] = torch.randn(TINY.hidden_size)
        assert not torch.allclose(model(ids, input_embeds=spliced), model(ids))


def test_float16_tracks_float32() -> None:
    model = random_model()
    ids = torch.tensor([[5, 17, 42, 291, 294, 7]])
    with torch.no_grad():
        ref = model(ids)
        half = model.half()(ids).float()
    assert torch.isfinite(half).all()
    assert (half - ref).abs().max() < 0.02 * ref.abs().max()


# -- config and checkpoint keys ------------------------------------------------------------------
def test_config_from_upstream_json() -> None:
    cfg = Config.from_hf(upstream_config("chatglm-6b"))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (
        130528,
        4096,
        28,
        32,
        128,
    )
    assert (cfg.inner_hidden_size, cfg.eps, cfg.max_sequence_length) == (16384, 1e-5, 2048)
    assert (cfg.gmask_token_id, cfg.mask_token_id, cfg.bos_token_id, cfg.eos_token_id) == (
        130001,
        130000,
        130004,
        130005,
    )
    assert abs(chatglm.ALPHA - 7.483314773547883) < 1e-12


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {
                "vocab_size": 150528,
                "gmask_token_id": 150001,
                "bos_token_id": 150004,
                "eos_token_id": 150005,
                "mask_token_id": 150000,
            },
            "vocab_size 130528",
        ),
        ({"vocab_size": None}, "130528"),  # absent: upstream's default is the old 150528
        ({"position_encoding_2d": False}, "position_encoding_2d"),
        ({"pre_seq_len": 128}, "P-tuning"),
        ({"quantization_embeddings": True}, "quantization_embeddings"),
        ({"eos_token_id": 2}, "eos_token_id"),
        ({"num_attention_heads": None}, "num_attention_heads"),
    ],
)
def test_config_refuses_unsupported_settings(change: dict, message: str) -> None:
    hf = upstream_config("chatglm-6b")
    for k, v in change.items():
        if v is None:
            hf.pop(k)
        else:
            hf[k] = v
    with pytest.raises(UnsupportedCheckpointError, match=re.escape(message)):
        Config.from_hf(hf)


def test_checkpoint_keys_match_the_upstream_index() -> None:
    index = json.loads(
        shared("configs-upstream/chatglm-6b/pytorch_model.bin.index.json").read_text()
    )["weight_map"]
    with torch.device("meta"):
        model = Model(Config.from_hf(upstream_config("chatglm-6b")))
    mapped = {chatglm.checkpoint_key(k) for k in index} - {None}
    assert mapped == set(dict(model.named_parameters()))
    assert chatglm.checkpoint_key("lm_head.weight") is None
    assert chatglm.checkpoint_key("transformer.layers.3.attention.rotary_emb.inv_freq") is None
    assert not list(model.buffers())  # nothing to materialise after a meta-device build


# -- (2) tokenizer --------------------------------------------------------------------------------
def test_reference_token_ids(tok: glm_text.ChatGLMTokenizer) -> None:
    assert chatglm.encode_messages(tok, [user("你好")]) == [5, 74874, 130001, 130004]
    assert chatglm.encode_messages(tok, [user("def f():\n    return 1")]) == [
        1616,
        502,
        125936,
        4,
        130011,
        2091,
        5,
        9,
        130001,
        130004,
    ]
    assert tok.encode("\t")[-1] == 130008 and tok.encode("a" + " " * 80 + "b")[1] == 130087
    assert chatglm.stop_ids(tok) == frozenset({130005})


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n\tif x:\n\t\treturn  x  *  2\n" + " " * 100 + "pass",
        "    indented\n        twice\n",
        "你好，世界！".replace("，", ",").replace("！", "!"),
        "中文和 English 混合, 以及 emoji 😀🎉👍🏽",
        "line one\n\nline three\n",
        "a" + " " * 81 + "b" + " " * 2 + "c",
        "tabs\t\tand spaces  \t mixed",
    ],
)
def test_tokenizer_round_trips(tok: glm_text.ChatGLMTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert max(ids) < 130344 and 3 not in ids
    assert tok.decode(ids) == text
    # specials and the padding rows decode to nothing
    assert tok.decode([130001, 130004, *ids, 3, 130005, 130400]) == text


def test_tokenizer_normalises_fullwidth_punctuation(tok: glm_text.ChatGLMTokenizer) -> None:
    # NFKC inside the sp model: why process_response turns the marks back to full width
    assert tok.decode(tok.encode("你好，世界！")) == "你好,世界!"
    assert postprocess(tok.decode(tok.encode("你好，世界！"))) == "你好，世界！"


def test_tokenizer_refuses_other_revisions(tmp_path: Path) -> None:
    src = shared("tokenizers/chatglm-6b/ice_text.model")
    old = tmp_path / "old"
    old.mkdir()
    (old / "ice_text.model").write_bytes(src.read_bytes())
    (old / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 20000}))
    with pytest.raises(UnsupportedCheckpointError, match="vocab_size 130528"):
        chatglm.load_tokenizer(old)
    other = tmp_path / "other"
    other.mkdir()  # a different sentencepiece model under the expected name
    (other / "ice_text.model").write_bytes(
        shared("tokenizers/chatglm2-6b/tokenizer.model").read_bytes()
    )
    with pytest.raises(UnsupportedCheckpointError, match="5e974d9a"):
        chatglm.load_tokenizer(other)


# -- (3) template, process_response, streaming ---------------------------------------------------
def test_template_golden_strings() -> None:
    assert build_prompt([user("你好")]) == "你好"
    assert build_prompt(conversation("你好", "你好👋！", "你是谁")) == (
        "[Round 0]\n问：你好\n答：你好👋！\n[Round 1]\n问：你是谁\n答："
    )
    assert build_prompt(conversation("q1", "r1", "q2", "r2", "q3", "r3", "q4")) == (
        "[Round 0]\n问：q1\n答：r1\n[Round 1]\n问：q2\n答：r2\n"
        "[Round 2]\n问：q3\n答：r3\n[Round 3]\n问：q4\n答："
    )


def test_encode_messages_appends_gmask_sop(tok: glm_text.ChatGLMTokenizer) -> None:
    msgs = conversation("你好", "你好!", "再见")
    ids = chatglm.encode_messages(tok, msgs)
    assert ids[-2:] == [130001, 130004] and 130001 not in ids[:-2]
    assert tok.decode(ids) == unicodedata.normalize("NFKC", build_prompt(msgs))  # 问： -> 问:


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("  你好,世界!  ", "你好，世界！"),
        ("Hello, world! How are you?", "Hello, world! How are you?"),
        ("答案:是;对吗?", "答案：是；对吗？"),
        ("a,中 b:c 中?d", "a，中 b:c 中？d"),
        ("我的知识截止到[[训练时间]],对", "我的知识截止到2023年，对"),
        ("3:00 在 12:30", "3:00 在 12:30"),
        ("好;;好", "好；；好"),
        ("好!!!", "好！!!"),
        ("\n\n 你好 \n", "你好"),
    ],
)
def test_process_response_cases(raw: str, want: str) -> None:
    assert postprocess(raw) == want


def charwise_process_response(text: str) -> str:
    """Independent statement of the rule: a mark turns full-width iff a neighbour is CJK."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    wide = dict(glm_text.PUNCT)
    cjk = [("\u4e00" <= c <= "\u9fff") for c in text]
    return "".join(
        wide[c]
        if c in wide and ((i > 0 and cjk[i - 1]) or (i + 1 < len(text) and cjk[i + 1]))
        else c
        for i, c in enumerate(text)
    )


def test_process_response_matches_the_rule_on_random_text() -> None:
    rng = random.Random(0)
    alphabet = ["中", "文", "a", "1", ",", "!", ":", ";", "?", " ", "，", "\n"]
    for _ in range(2000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert postprocess(s) == charwise_process_response(s), repr(s)


# single characters plus multi-character pieces that form the placeholder and the clean-ups
PIECES = [*"中a,!:;? \n.'ntmsvre[年", "[[", "训练", "时间", "]]", "好,", "'s", "n't", " ' "]


def stream(pieces: list[str], hold: bool = True) -> tuple[str, str]:
    """Stream ``pieces`` as tokens through the model's decode-side functions."""
    dec = StreamDecoder(
        lambda ids: glm_text.clean_up_spaces("".join(pieces[i] for i in ids)),
        postprocess,
        holdback if hold else (lambda text: 0),
    )
    out = "".join(dec.push(i) for i in range(len(pieces))) + dec.flush()
    return out, dec.text()


def test_streaming_holdback_makes_deltas_equal_the_final_reply() -> None:
    rng = random.Random(1)
    for _ in range(4000):
        pieces = [rng.choice(PIECES) for _ in range(rng.randint(1, 12))]
        joined, final = stream(pieces)
        assert joined == final, pieces
    # without the holdback the streamed text would disagree with the final reply
    cases = (
        ["a", ",", "中"],
        ["[[", "训练", "时间", "]]"],
        ["It", " '", "s"],
        ["x", " ' ", "."],
        ["x", " n", " '", " ", "t"],
    )
    for case in cases:
        assert stream(case, hold=False)[0] != stream(case)[1], case
        assert stream(case)[0] == stream(case)[1]
    assert holdback("ok,") == 1 and holdback("好，") == 0 and holdback("x[[训练") == 4
    assert holdback("It '") == 2 and holdback("do n") == 2 and holdback("done") == 0


def test_decode_applies_transformers_clean_up(tok: glm_text.ChatGLMTokenizer) -> None:
    ids = tok.encode("Hello , world . It ' s a test ! Is n't it ?")
    assert tok.decode(ids) == "Hello, world. It's a test! Isn't it?"
    assert glm_text.clean_up_spaces("x  .") == "x ."  # one pass, as str.replace


def test_streaming_with_the_real_tokenizer(tok: glm_text.ChatGLMTokenizer) -> None:
    text = "你好👋!我是人工智能助手 ChatGLM-6B,很高兴见到你:\n\tdef f():  return [[训练时间]]?好"
    ids = tok.encode(text)
    dec = StreamDecoder(tok.decode, postprocess, holdback)
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) + dec.flush() == postprocess(tok.decode(ids))
    assert "！" in dec.text() and "2023年？好" in dec.text()


# -- (5) a tiny upstream-layout checkpoint through the loader -----------------------------------
@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chatglm_checkpoint(tmp_path_factory.mktemp("glm") / "chatglm-6b")


@pytest.fixture(scope="module")
def glm_chat(glm_dir: Path) -> TransformerChatModel:
    from llmchat.loader import load

    cm = load(model_path=glm_dir, device="cpu", dtype="float32")
    assert isinstance(cm, TransformerChatModel)
    return cm


GREEDY = {"temperature": 0.0, "max_new_tokens": 8}


def test_tiny_checkpoint_has_the_upstream_layout(glm_dir: Path) -> None:
    index = json.loads((glm_dir / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert index["lm_head.weight"] == "pytorch_model-00002-of-00002.bin"
    assert index["transformer.word_embeddings.weight"] == "pytorch_model-00001-of-00002.bin"
    assert "transformer.layers.1.attention.rotary_emb.inv_freq" in index
    assert json.loads((glm_dir / "config.json").read_text())["vocab_size"] == 130528
    assert (glm_dir / "ice_text.model").is_file()


def greedy_reference(chat_model: TransformerChatModel, messages: list[Message], n: int) -> str:
    """Uncached greedy decoding straight on the model: a check on the cached generator."""
    model, tok = chat_model.model, chat_model.tokenizer
    ids = chatglm.encode_messages(tok, messages)
    gen: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + gen]))[0, -1].argmax())
            if token == tok.eos_id:
                break
            gen.append(token)
    return postprocess(tok.decode(gen))


def test_loader_and_greedy_multi_turn_chat(glm_dir: Path, glm_chat: TransformerChatModel) -> None:
    cm = glm_chat
    assert cm.name == "chatglm-6b" and not cm.supports_system
    assert cm.defaults.top_p == 0.7 and cm.defaults.temperature == 0.95
    params = dict(cm.model.named_parameters())
    assert "lm_head.weight" not in params
    torch.testing.assert_close(  # the stored fp16 weights arrive as float32
        params["transformer.word_embeddings.weight"],
        torch.load(glm_dir / "pytorch_model-00001-of-00002.bin", weights_only=True)[
            "transformer.word_embeddings.weight"
        ].float(),
    )
    config = cm.defaults.with_(**GREEDY)
    messages = [user("你好")]
    for q in ("介绍一下你自己", "谢谢"):
        out = cm.generate(messages, config)
        deltas = list(out)
        reply = out.text
        assert "".join(deltas) == reply
        assert reply == greedy_reference(cm, messages, 8)
        assert out.stats.prompt_tokens == len(chatglm.encode_messages(cm.tokenizer, messages))
        messages = [*messages, Message("assistant", reply), user(q)]
    assert build_prompt(messages).startswith("[Round 0]\n问：你好\n答：")
    assert cm.chat(messages, config) == greedy_reference(cm, messages, 8)


def test_loader_refuses_old_vocab_checkpoint(tmp_path: Path) -> None:
    from llmchat.loader import load

    hf = upstream_config("chatglm-6b")
    hf.update(
        vocab_size=150528,
        gmask_token_id=150001,
        bos_token_id=150004,
        eos_token_id=150005,
        mask_token_id=150000,
    )
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedCheckpointError, match="5e974d9a"):
        load(model_path=tmp_path, device="cpu", dtype="float32")


# -- (6) the CLI ------------------------------------------------------------------------------
@pytest.mark.skipif(not (REPO / "llmchat" / "cli.py").exists(), reason="llmchat/cli.py missing")
def test_cli_piped_multi_turn_chat(glm_dir: Path, glm_chat: TransformerChatModel) -> None:
    cm = glm_chat
    config = cm.defaults.with_(**GREEDY)
    messages: list[Message] = []
    expected = []
    for q in ("你好", "你是谁"):
        messages.append(user(q))
        reply = cm.chat(messages, config)
        expected.append(reply)
        messages.append(Message("assistant", reply))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmchat",
            "chat",
            "--model-path",
            str(glm_dir),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
        ],
        input="你好\n你是谁\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(r + "\n" for r in expected)
