"""KV reuse across turns (causal prompts): the same replies as recomputing everything."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmchat.conversation import Conversation
from llmchat.loader import load
from llmchat.types import GenerationConfig
from tests.checkpoints import chatglm2_checkpoint
from tests.ckpt_chatglm import chatglm_checkpoint
from tests.ckpt_qwen import qwen_checkpoint

BUILDERS = {"chatglm2": chatglm2_checkpoint, "qwen": qwen_checkpoint, "chatglm": chatglm_checkpoint}
QUESTIONS = ["你好", "介绍一下你自己", "What is 2+2?", "谢谢，再见"]


def run(path: Path, reuse: bool, close_second: bool = False) -> tuple[list[str], list[int]]:
    model = load(model_path=path, device="cpu", dtype="float32")
    model.kv_reuse = reuse and model.kv_reuse
    conv = Conversation(model, model.defaults.with_(temperature=0, max_new_tokens=12,
                                                    repetition_penalty=1.1))
    replies, cached = [], []
    for i, q in enumerate(QUESTIONS):
        if close_second and i == 1:  # a reply stopped after two deltas leaves no turn
            r = conv.send(q)
            it = iter(r)
            next(it, None)
            r.close()
        r = conv.send(q).consume()
        replies.append(r.text)
        cached.append(r.stats.cached_tokens)
    return replies, cached


@pytest.mark.parametrize("name", ["chatglm2", "qwen"])
def test_reuse_gives_the_same_replies(name: str, tmp_path: Path) -> None:
    path = BUILDERS[name](tmp_path / name)
    fresh, none_cached = run(path, reuse=False)
    reused, cached = run(path, reuse=True)
    assert reused == fresh
    assert none_cached == [0, 0, 0, 0]
    assert cached[0] == 0 and all(c > 10 for c in cached[1:])
    stopped, _ = run(path, reuse=True, close_second=True)
    assert stopped == fresh


def test_prefix_lm_models_reuse_nothing(tmp_path: Path) -> None:
    path = chatglm_checkpoint(tmp_path / "glm")
    _, cached = run(path, reuse=True)
    assert cached == [0, 0, 0, 0]


def test_qwen_reuses_only_while_the_ntk_factor_holds(tmp_path: Path) -> None:
    path = qwen_checkpoint(tmp_path / "qwen")
    model = load(model_path=path, device="cpu", dtype="float32")
    seq = model.model.config.seq_length
    conv = Conversation(model, GenerationConfig(temperature=0, max_new_tokens=4,
                                                max_length=8 * seq))
    conv.send("hi").consume()
    long = conv.send("长" * (2 * seq)).consume()  # past seq_length: a new NTK alpha
    assert long.stats.cached_tokens == 0


def interleaved(path: Path, slots: int, reuse: bool = True) -> tuple[list[str], list[int]]:
    """Three conversations taking turns (A1 B1 C1 A2 B2 C2 A3 ...), one model, ``slots`` caches."""
    model = load(model_path=path, device="cpu", dtype="float32")
    model.kv_reuse = reuse
    model.kv_slots = slots
    config = model.defaults.with_(temperature=0, max_new_tokens=6)
    convs = [Conversation(model, config) for _ in range(3)]
    replies, cached = [], []
    for q in QUESTIONS[:3]:
        for i, conv in enumerate(convs):
            r = conv.send(f"{q} {i}").consume()
            replies.append(r.text)
            cached.append(r.stats.cached_tokens)
    return replies, cached


def test_several_slots_serve_interleaved_conversations(tmp_path: Path) -> None:
    path = chatglm2_checkpoint(tmp_path / "glm2")
    fresh, none = interleaved(path, slots=3, reuse=False)
    three, cached3 = interleaved(path, slots=3)
    one, cached1 = interleaved(path, slots=1)
    two, cached2 = interleaved(path, slots=2)
    assert three == one == two == fresh and not any(none)
    # three slots: each conversation's follow-up finds its own cache
    assert cached3[:3] == [0, 0, 0] and all(c > 20 for c in cached3[3:])
    # one slot: a follow-up shares only the template's first tokens with the cache's conversation
    assert all(c < 20 for c in cached1) and any(cached1)
    # two slots, three conversations in turn: the one needed next was always just evicted (LRU)
    assert not any(cached2)
