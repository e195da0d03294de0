"""Presets, detection from real upstream config.json files, and the plain data types."""

from __future__ import annotations

import json
from pathlib import Path

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


# -- ChatGLM3-6B and GLM-4 carry ChatGLM2's keys: refused by name, never run as ChatGLM2 ----------
def _glm3_config() -> dict:
    """THUDM/chatglm3-6b's config.json: the ChatGLM2 keys, its own name and seq_length 8192."""
    cfg = upstream_config("chatglm2-6b")
    cfg.update({"_name_or_path": "THUDM/chatglm3-6b", "seq_length": 8192,
                "transformers_version": "4.30.2"})
    return cfg


def _glm4_config() -> dict:
    """THUDM/glm-4-9b-chat's config.json (the keys that matter)."""
    cfg = upstream_config("chatglm2-6b")
    cfg.update({"_name_or_path": "THUDM/glm-4-9b-chat", "num_layers": 40,
                "padded_vocab_size": 151552, "rope_ratio": 500, "seq_length": 131072,
                "layernorm_epsilon": 1.5625e-07, "eos_token_id": [151329, 151336, 151338],
                "pad_token_id": 151329})
    return cfg


@pytest.mark.parametrize("variant", ["THUDM/chatglm3-6b", "THUDM/chatglm3-6b-32k",
                                     "/data/models/chatglm3_6b_base"])
def test_chatglm3_is_refused_by_name(variant: str) -> None:
    cfg = dict(_glm3_config(), _name_or_path=variant)
    with pytest.raises(UnsupportedCheckpointError, match="ChatGLM3-6B") as e:
        detect(cfg)
    assert "\n" not in str(e.value) and "ChatGLM2-6B" in str(e.value)  # names what is supported


def test_chatglm3_is_refused_by_its_tokenizer() -> None:
    """A fine-tune saved under a local name: its tokenizer_config.json still has the role tokens
    (ChatGLM2's tokenizer has none)."""
    cfg = dict(_glm3_config(), _name_or_path="/ckpt/my-finetune")
    tok = {"tokenizer_class": "ChatGLMTokenizer", "added_tokens_decoder": {
        "64795": {"content": "<|user|>", "special": True},
        "64796": {"content": "<|assistant|>", "special": True}}}
    with pytest.raises(UnsupportedCheckpointError, match=r"ChatGLM3-6B .*<\|user\|>"):
        detect(cfg, tok)
    with pytest.raises(UnsupportedCheckpointError, match="ChatGLM3-6B"):
        detect(dict(cfg, _name_or_path=""), {"name_or_path": "THUDM/chatglm3-6b"})


@pytest.mark.parametrize("change", [{}, {"_name_or_path": "/local/x"},
                                    {"_name_or_path": "/local/x", "eos_token_id": 2}])
def test_glm4_is_refused(change: dict) -> None:
    with pytest.raises(UnsupportedCheckpointError, match="GLM-4"):
        detect(dict(_glm4_config(), **change))
    with pytest.raises(UnsupportedCheckpointError, match="GLM-4"):
        detect({"architectures": ["GlmForCausalLM"], "model_type": "glm"})
    with pytest.raises(UnsupportedCheckpointError, match="GLM-4"):
        detect(dict(upstream_config("chatglm2-6b"), _name_or_path="x"),
               {"tokenizer_class": "ChatGLM4Tokenizer"})


@pytest.mark.parametrize("folder", ["chatglm2-6b", "chatglm2-6b-int4"])
def test_real_chatglm2_configs_and_tokenizer_still_detect(folder: str) -> None:
    from tests.checkpoints import shared

    tok = json.loads(shared("tokenizers/chatglm2-6b/tokenizer_config.json").read_text())
    assert detect(upstream_config(folder), tok).name == "chatglm2-6b"
    # chatglm2-6b-32k: rope_ratio alone is ChatGLM2 (its RoPE scaling is supported)
    assert detect(dict(upstream_config(folder), rope_ratio=16), tok).name == "chatglm2-6b"


def test_loader_refuses_a_chatglm3_directory(tmp_path: Path) -> None:
    from llmchat.loader import load

    (tmp_path / "config.json").write_text(json.dumps(dict(_glm3_config(), _name_or_path="m")))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}<|{{ m.role }}|>\n{% endfor %}<|assistant|>"}))
    with pytest.raises(UnsupportedCheckpointError, match="ChatGLM3-6B"):
        load(model_path=tmp_path, device="cpu")


def test_presets_have_no_dead_keys() -> None:
    """Every key of configs/*.toml is read into ModelSpec (``template`` was never used: each
    model module builds its own prompt)."""
    import dataclasses
    import tomllib

    from llmchat.registry import PRESET_KEYS, ModelSpec, configs_dir

    assert "template" not in {f.name for f in dataclasses.fields(ModelSpec)}
    for path in configs_dir().glob("*.toml"):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        assert set(data) <= PRESET_KEYS, path.name
