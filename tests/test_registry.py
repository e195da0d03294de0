"""Presets, detection from real upstream config.json files, and the plain data types."""

from __future__ import annotations

import pytest

from llmchat.errors import UnknownModelError, UnsupportedCheckpointError, UsageError
from llmchat.registry import detect, models, resolve
from llmchat.types import GenerationConfig, Message, parse_quant, split_turns
from tests.checkpoints import upstream_config


@pytest.mark.parametrize("folder,name", [
    ("chatglm-6b", "chatglm-6b"), ("chatglm-6b-int4", "chatglm-6b"),
    ("chatglm2-6b", "chatglm2-6b"), ("chatglm2-6b-int4", "chatglm2-6b"),
    ("qwen-7b-chat", "qwen-7b-chat"), ("visualglm-6b", "visualglm-6b"),
])
def test_detect_real_configs(folder: str, name: str) -> None:
    assert detect(upstream_config(folder)).name == name


def test_detect_unknown() -> None:
    with pytest.raises(UnsupportedCheckpointError, match="MistralForCausalLM"):
        detect({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    with pytest.raises(UnsupportedCheckpointError, match="no 'architectures'"):
        detect({})


def test_resolve_names_and_aliases() -> None:
    assert resolve("chatglm2").hub_id == "THUDM/chatglm2-6b"
    assert resolve("Qwen").name == "qwen-7b-chat"
    assert resolve("THUDM/visualglm-6b").supports_images
    with pytest.raises(UnknownModelError, match="known models: chatglm-6b"):
        resolve("llama")


def test_preset_defaults_match_upstream_chat() -> None:
    g = {n: s.generation for n, s in models().items()}
    assert (g["chatglm-6b"].top_p, g["chatglm-6b"].temperature, g["chatglm-6b"].max_length) == (
        0.7, 0.95, 2048)
    assert (g["chatglm2-6b"].top_p, g["chatglm2-6b"].temperature, g["chatglm2-6b"].max_length) == (
        0.8, 0.8, 8192)
    q = g["qwen-7b-chat"]
    assert (q.top_p, q.top_k, q.repetition_penalty, q.max_new_tokens) == (0.8, 0, 1.1, 512)
    v = g["visualglm-6b"]
    assert (v.top_p, v.top_k, v.temperature, v.repetition_penalty, v.max_length,
            v.min_length) == (0.4, 100, 0.8, 1.2, 1024, 100)


def test_generation_config_validation() -> None:
    base = GenerationConfig()
    assert base.with_(temperature=0, top_k=None).temperature == 0
    for bad in ({"temperature": -0.1}, {"top_p": 0}, {"top_p": 1.01}, {"top_k": -1},
                {"repetition_penalty": 0}, {"max_length": 1}, {"max_new_tokens": 0},
                {"seed": "x"}, {"temperature": float("nan")}, {"top_k": 1.5}):
        with pytest.raises(UsageError):
            base.with_(**bad)


def test_split_turns_and_messages() -> None:
    msgs = [Message("system", "s"), Message("user", "a"), Message("assistant", "b"),
            Message("user", "c")]
    assert split_turns(msgs) == ("s", [("a", "b")], "c")
    with pytest.raises(UsageError):
        split_turns([Message("user", "a"), Message("user", "b")])
    with pytest.raises(UsageError):
        split_turns([Message("user", "a"), Message("assistant", "b")])
    with pytest.raises(UsageError):
        Message("robot", "x")  # type: ignore[arg-type]
    assert Message.from_dict(Message("user", "x", "p.png").to_dict()) == Message("user", "x",
                                                                                 "p.png")


def test_parse_quant() -> None:
    assert [parse_quant(v) for v in (16, "8", "int4", "FP16", " 4 ")] == [16, 8, 4, 16, 4]
    for bad in (3, "int3", "", "32"):
        with pytest.raises(UsageError, match="--quant"):
            parse_quant(bad)
