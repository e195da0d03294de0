"""Loading real checkpoint layouts, strictly, safely, with one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llmchat.conversation import Conversation
from llmchat.errors import (
    CheckpointError,
    ContextOverflowError,
    DeviceError,
    TokenizerError,
    UnsupportedCheckpointError,
    UsageError,
)
from llmchat.loader import checkpoint_files, load, resolve_device, resolve_dtype
from llmchat.registry import resolve
from llmchat.types import Message
from tests.checkpoints import build_state_dict, chatglm2_checkpoint, chatglm2_config

GREEDY = {"temperature": 0, "max_new_tokens": 8}


def logits(model, ids=(64790, 64792, 100, 200, 300)) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model.model(torch.tensor([list(ids)]))


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    from llmchat.models import chatglm2

    return build_state_dict(chatglm2.Model, chatglm2.Config.from_hf(chatglm2_config()), seed=3)


@pytest.mark.parametrize("fmt", ["bin-sharded", "bin", "safetensors", "safetensors-sharded"])
def test_every_storage_format_loads_the_same_weights(
    tmp_path: Path, fmt: str, state_dict: dict
) -> None:
    ref = load(
        model_path=chatglm2_checkpoint(tmp_path / "ref", fmt="bin", state_dict=state_dict),
        device="cpu",
        dtype="float32",
    )
    other = load(
        model_path=chatglm2_checkpoint(tmp_path / fmt, fmt=fmt, state_dict=state_dict),
        device="cpu",
        dtype="float32",
    )
    assert torch.equal(logits(ref), logits(other))
    assert other.info.dtype == "float32" and other.info.quant == 16
    weights = {p.dtype for p in other.model.parameters()}
    assert weights == {torch.float32}
    assert not any(p.is_meta for p in other.model.parameters())


def test_sharded_bin_has_upstream_names(glm2_dir: Path) -> None:
    names = sorted(p.name for p in glm2_dir.iterdir())
    assert "pytorch_model.bin.index.json" in names
    assert "pytorch_model-00001-of-00002.bin" in names
    index = json.loads((glm2_dir / "pytorch_model.bin.index.json").read_text())
    assert (
        "transformer.encoder.layers.0.self_attention.query_key_value.weight" in index["weight_map"]
    )
    assert [f.name for f in checkpoint_files(glm2_dir)] == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]


def test_bf16_and_fp16_dtypes(glm2_dir: Path) -> None:
    for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        m = load(model_path=glm2_dir, device="cpu", dtype=name)
        assert {p.dtype for p in m.model.parameters()} == {dt}
        assert m.chat([Message("user", "你好")], m.defaults.with_(**GREEDY)) is not None


def test_never_runs_code_from_the_model_dir(tmp_path: Path, state_dict: dict) -> None:
    d = chatglm2_checkpoint(tmp_path / "m", state_dict=state_dict)
    marker = tmp_path / "pwned"
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        (d / name).write_text(f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(3)\n")
    cfg = json.loads((d / "config.json").read_text())
    assert "auto_map" in cfg  # the upstream config points at remote code; we ignore it
    m = load(model_path=d, device="cpu", dtype="float32")
    m.chat([Message("user", "hi")], m.defaults.with_(**GREEDY))
    assert not marker.exists()


def test_bin_is_loaded_weights_only(tmp_path: Path, state_dict: dict) -> None:
    d = chatglm2_checkpoint(tmp_path / "m", fmt="bin", state_dict=state_dict)

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("executed",))

    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load(model_path=d, device="cpu")


# -- bad input ------------------------------------------------------------------------------------
def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_file_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load(model_path=tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="must be a directory"):
        load(model_path=tmp_path / "f")


def test_no_config_and_bad_config(tmp_path: Path, glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(model_path=d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load(model_path=d)


def test_unknown_architecture(tmp_path: Path, glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    (d / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    with pytest.raises(UnsupportedCheckpointError, match="LlamaForCausalLM"):
        load(model_path=d)


def test_missing_tokenizer(tmp_path: Path, glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    (d / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load(model_path=d)
    (d / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="cannot read"):
        load(model_path=d)


def test_shard_listed_but_absent(tmp_path: Path, glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00002.bin listed in .* is missing"):
        load(model_path=d)


@pytest.mark.parametrize("fmt", ["bin-sharded", "safetensors"])
def test_truncated_shard(tmp_path: Path, fmt: str, state_dict: dict) -> None:
    d = chatglm2_checkpoint(tmp_path / "m", fmt=fmt, state_dict=state_dict)
    shard = checkpoint_files(d)[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load(model_path=d, device="cpu")


def test_wrong_shape_missing_and_unexpected_keys(tmp_path: Path, state_dict: dict) -> None:
    key = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    bad = dict(state_dict)
    bad[key] = torch.zeros(64, 95, dtype=torch.float16)
    with pytest.raises(CheckpointError, match=r"dense_4h_to_h.weight has shape \(64, 95\)"):
        load(model_path=chatglm2_checkpoint(tmp_path / "a", state_dict=bad), device="cpu")
    missing = {k: v for k, v in state_dict.items() if k != key}
    with pytest.raises(CheckpointError, match="missing keys .*dense_4h_to_h"):
        load(model_path=chatglm2_checkpoint(tmp_path / "b", state_dict=missing), device="cpu")
    extra = dict(state_dict, **{"transformer.prefix_encoder.embedding.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="unexpected keys .*prefix_encoder"):
        load(model_path=chatglm2_checkpoint(tmp_path / "c", state_dict=extra), device="cpu")


def test_no_weights(tmp_path: Path, glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    for f in d.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load(model_path=d)


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(UsageError):
        resolve_device("tpu")
    spec = resolve("chatglm2")
    assert resolve_dtype("auto", torch.device("cpu"), spec, 16) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), spec, 4) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu"), spec, 16) == torch.bfloat16
    with pytest.raises(UsageError, match="--dtype"):
        resolve_dtype("float64", torch.device("cpu"), spec, 16)


def test_model_name_must_match_directory(glm2_dir: Path) -> None:
    with pytest.raises(UsageError, match="holds a chatglm2-6b checkpoint"):
        load("qwen", model_path=glm2_dir)


def test_hub_name_offline_gives_clear_error() -> None:
    with pytest.raises(CheckpointError, match="THUDM/chatglm2-6b.*not in the local cache"):
        load("chatglm2")


# -- conversation fitting -------------------------------------------------------------------------
def test_fit_drops_oldest_turns_and_overflow_is_an_error(glm2_dir: Path) -> None:
    m = load(model_path=glm2_dir, device="cpu", dtype="float32")
    msgs = []
    for i in range(6):
        msgs += [
            Message("user", f"问题 {i} " + "很长的问题 " * 10),
            Message("assistant", "回答 " * 10),
        ]
    msgs.append(Message("user", "最后的问题"))
    cfg = m.defaults.with_(max_length=400, max_new_tokens=50)
    full = m.count_tokens(msgs)
    conv = Conversation(m, cfg)
    kept, dropped = conv.fit(msgs[:-1], msgs[-1])
    assert full > 350 and dropped > 0
    assert kept[-1] == msgs[-1] and kept[0] == msgs[2 * dropped]
    assert m.count_tokens(kept) + 50 <= 400
    # the fewest turns are dropped: one more would not fit
    assert m.count_tokens(msgs[2 * dropped - 2:]) + 50 > 400
    reply = m.chat(kept, cfg.with_(temperature=0))
    assert isinstance(reply, str)
    with pytest.raises(ContextOverflowError, match="context budget"):
        conv.fit([], Message("user", "长" * 500))
    with pytest.raises(ContextOverflowError):
        m.chat([Message("user", "长" * 500)], cfg)


def test_stream_equals_chat_and_stats(glm2_dir: Path) -> None:
    m = load(model_path=glm2_dir, device="cpu", dtype="float32")
    cfg = m.defaults.with_(temperature=0, max_new_tokens=24)
    msgs = [
        Message("user", "你好"),
        Message("assistant", "你好！"),
        Message("user", "介绍一下你自己"),
    ]
    out = m.generate(msgs, cfg)
    streamed = list(out)
    assert "".join(streamed) == m.chat(msgs, cfg) == out.text and out.done
    s = out.stats
    assert s.completion_tokens == 24 and s.finish_reason == "length"
    assert s.prompt_tokens == m.count_tokens(msgs)
    sampled = m.defaults.with_(seed=7, max_new_tokens=12)
    assert m.chat(msgs, sampled) == m.chat(msgs, sampled)
    with pytest.raises(UsageError, match="system role"):
        m.chat([Message("system", "x"), Message("user", "hi")], cfg)
    with pytest.raises(UsageError, match="empty"):
        m.chat([Message("user", "  ")], cfg)


def test_cpu_auto_dtype_falls_back_to_bf16_when_fp32_does_not_fit(
    glm2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmchat.loader as loader_mod

    assert load(model_path=glm2_dir, device="cpu").info.dtype == "float32"
    monkeypatch.setattr(loader_mod, "available_memory_bytes", lambda: 1 << 20)  # 1 MiB free
    m = load(model_path=glm2_dir, device="cpu")
    assert m.info.dtype == "bfloat16" and "--dtype float32" in m.info.extra["note"]
    assert load(model_path=glm2_dir, device="cpu", dtype="float32").info.dtype == "float32"


def test_chat_cache_starts_small_and_fit_respects_model_positions(glm2_dir: Path) -> None:
    m = load(model_path=glm2_dir, device="cpu", dtype="float32")
    cfg = m.defaults.with_(temperature=0, max_new_tokens=300)
    out = m.generate([Message("user", "你好")], cfg).consume()
    cache = m._slot.cache
    # sized for this reply (17 prompt + 300 new), not for the 8192-token budget
    assert cache is not None and cache.max_len == out.stats.prompt_tokens + 300
    assert out.stats.completion_tokens == 300 and out.text
    # the tiny checkpoint has 512 positions (seq_length): a larger --max-length is capped
    assert m.context_budget(m.defaults) == 512
    msgs = []
    for i in range(12):
        msgs += [
            Message("user", f"问题 {i} " + "很长的问题 " * 8),
            Message("assistant", "回答 " * 8),
        ]
    conv = Conversation(m, m.defaults.with_(max_new_tokens=20), turns=msgs)
    kept, dropped = conv.fit(msgs, Message("user", "最后"))
    assert dropped > 0 and m.count_tokens(kept) + 20 <= 512
