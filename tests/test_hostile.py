"""Hostile checkpoint directories: every one ends in one clear LLMChatError line, fast."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from llmchat.errors import CheckpointError, TokenizerError, UnsupportedCheckpointError
from llmchat.loader import load
from llmchat.models import chatglm, chatglm2, qwen, visualglm
from llmchat.safeio import read_json
from tests.checkpoints import REPO, chatglm2_config, shared
from tests.ckpt_chatglm import chatglm_config
from tests.ckpt_qwen import qwen_config
from tests.ckpt_visualglm import visualglm_config

INDEX = "pytorch_model.bin.index.json"


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def load_limited(path: Path, *, timeout: float = 60) -> str:
    """Load in a child with a 3 GB address-space cap and a timeout; returns its one error line."""
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from llmchat.errors import LLMChatError
        from llmchat.loader import load
        try:
            load(model_path={str(path)!r}, device="cpu")
        except LLMChatError as exc:
            print("ERR", exc)
            sys.exit(3)
        print("LOADED")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path} hung for {timeout} s")
    assert r.returncode == 3, r.stdout + r.stderr[-2000:]
    return r.stdout.strip()


# -- 1. shard names must stay inside the directory ------------------------------------------------
@pytest.mark.parametrize("name", ["../../../outside/shard2.bin", "/etc/passwd",
                                  "/proc/self/environ", "sub/../../x.bin"])
def test_index_shard_outside_directory_refused(tmp_path: Path, glm2_dir: Path, name: str) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "a" / "b" / "c" / "m")
    outside = tmp_path / "outside"
    outside.mkdir()
    shards = sorted(d.glob("pytorch_model-*.bin"))
    shutil.copy(shards[1], outside / "shard2.bin")
    edit_json(d / INDEX, lambda ix: ix["weight_map"].update(
        {k: name for k, v in ix["weight_map"].items() if v == shards[1].name}))
    with pytest.raises(CheckpointError, match=r"entry '.*'.*(absolute|leaves)") as info:
        load(model_path=d, device="cpu")
    assert "\n" not in str(info.value)


def test_symlinked_files_inside_directory_still_load(tmp_path: Path, glm2_dir: Path) -> None:
    """As in the HF cache: snapshot files are symlinks into ../../blobs."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    d = tmp_path / "snapshots" / "abc"
    d.mkdir(parents=True)
    for f in glm2_dir.iterdir():
        shutil.copy(f, blobs / f.name)
        (d / f.name).symlink_to(os.path.relpath(blobs / f.name, d))
    assert load(model_path=d, device="cpu").info.path == str(d)


# -- 2. JSON files: size cap, regular files only, depth -------------------------------------------
def test_index_symlinked_to_dev_zero_refused(tmp_path: Path, glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    (d / INDEX).unlink()
    (d / INDEX).symlink_to("/dev/zero")
    assert "not a regular file" in load_limited(d)


def test_huge_config_refused_unread(tmp_path: Path, glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    with open(d / "config.json", "r+b") as f:
        f.truncate(2 << 30)  # sparse: 2 GB on paper, nothing on disk
    line = load_limited(d)
    assert "config.json" in line and "over the" in line


def test_deeply_nested_json_is_a_clear_error(tmp_path: Path, glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load(model_path=d, device="cpu")
    (d / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load(model_path=d, device="cpu")


def test_read_json_rules(tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    f.write_text('{"a": 1}')
    assert read_json(f, max_bytes=100, what="x.json") == {"a": 1}
    with pytest.raises(CheckpointError, match="over the 4 bytes"):
        read_json(f, max_bytes=4, what="x.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_json(tmp_path, max_bytes=100, what="x.json")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match="not a regular file"):  # and does not block
        read_json(tmp_path / "fifo", max_bytes=100, what="fifo")
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        read_json(f, max_bytes=100, what="x.json")


def test_hostile_tokenizer_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("[" * 100_000)
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        chatglm.load_tokenizer(tmp_path)


# -- 3. config values -----------------------------------------------------------------------------
BAD_VALUES: list[Any] = [0, -1, 10**9, 2.5, "28", True, None, [], {}, math.nan, math.inf]
GLM2_KEYS = ["num_layers", "hidden_size", "num_attention_heads", "kv_channels",
             "multi_query_group_num", "ffn_hidden_size", "seq_length", "padded_vocab_size"]


def _bad(value: Any) -> bool:
    return value is not None


@pytest.mark.parametrize("key", GLM2_KEYS)
@pytest.mark.parametrize("value", [v for v in BAD_VALUES if _bad(v)], ids=repr)
def test_chatglm2_bad_values_name_key_and_rule(key: str, value: Any) -> None:
    with pytest.raises(UnsupportedCheckpointError, match=rf"{key} is .*must be"):
        chatglm2.Config.from_hf(chatglm2_config(**{key: value}))


@pytest.mark.parametrize(("make", "key", "value"), [
    (chatglm2_config, "layernorm_epsilon", math.nan),
    (chatglm2_config, "layernorm_epsilon", 0),
    (chatglm2_config, "rope_ratio", math.nan),
    (chatglm2_config, "rope_ratio", -1),
    (chatglm2_config, "rope_ratio", "x"),
    (chatglm_config, "num_layers", 10**9),
    (chatglm_config, "hidden_size", "64"),
    (chatglm_config, "num_attention_heads", 0),
    (chatglm_config, "layernorm_epsilon", math.inf),
    (chatglm_config, "max_sequence_length", -5),
    (chatglm_config, "vocab_size", [1]),
    (chatglm_config, "inner_hidden_size", 0),
    (qwen_config, "num_hidden_layers", 10**9),
    (qwen_config, "num_attention_heads", 0),
    (qwen_config, "kv_channels", 0),
    (qwen_config, "seq_length", 0),
    (qwen_config, "layer_norm_epsilon", math.nan),
    (qwen_config, "rotary_emb_base", math.nan),
    (qwen_config, "intermediate_size", 1.5),
    (visualglm_config, "image_length", 0),
])
def test_bad_values_all_models(make: Any, key: str, value: Any) -> None:
    mod = {chatglm2_config: chatglm2, chatglm_config: chatglm, qwen_config: qwen,
           visualglm_config: visualglm}[make]
    with pytest.raises(UnsupportedCheckpointError, match=rf"{key} is .*must be"):
        mod.Config.from_hf(make(**{key: value}))


@pytest.mark.parametrize(("sub", "key", "value"), [
    ("eva_config", "num_layers", 10**9), ("eva_config", "hidden_size", 0),
    ("eva_config", "num_attention_heads", "16"), ("eva_config", "layernorm_epsilon", math.nan),
    ("eva_config", "image_size", [224, 0]), ("eva_config", "patch_size", 0),
    ("qformer_config", "num_layers", 10**9), ("qformer_config", "vocab_size", -1),
    ("qformer_config", "num_attention_heads", 0),
])
def test_visualglm_sub_config_values(sub: str, key: str, value: Any) -> None:
    hf = visualglm_config()
    hf[sub][key] = value
    with pytest.raises(UnsupportedCheckpointError, match=rf"{sub}\.{key} is .*must be"):
        visualglm.Config.from_hf(hf)


@pytest.mark.parametrize(("make", "mod", "over", "match"), [
    (chatglm2_config, chatglm2, {"num_attention_heads": 3}, "multi_query_group_num"),
    (chatglm2_config, chatglm2, {"kv_channels": 6}, "multiple of 4"),
    (chatglm_config, chatglm, {"num_attention_heads": 5}, "num_attention_heads 5"),
    (qwen_config, qwen, {"kv_channels": 12}, "must equal hidden_size"),
    (qwen_config, qwen, {"vocab_size": 1000}, "vocab_size 1000"),
])
def test_cross_field_rules(make: Any, mod: Any, over: dict[str, Any], match: str) -> None:
    with pytest.raises(UnsupportedCheckpointError, match=match):
        mod.Config.from_hf(make(**over))


def test_huge_layer_count_fails_fast_against_checkpoint_keys(tmp_path: Path,
                                                             glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c.update(num_layers=200))
    line = load_limited(d, timeout=60)
    assert "num_layers is 200" in line and "layers 0..1" in line
    edit_json(d / "config.json", lambda c: c.update(num_layers=10**9))
    assert "num_layers is 1000000000" in load_limited(d, timeout=60)


def test_visualglm_eva_layer_count_hostile(tmp_path: Path) -> None:
    from tests.ckpt_visualglm import visualglm_checkpoint

    d = visualglm_checkpoint(tmp_path / "v")
    edit_json(d / "config.json", lambda c: c["eva_config"].update(num_layers=10**9))
    assert "eva_config.num_layers is 1000000000" in load_limited(d)
    edit_json(d / "config.json", lambda c: c["eva_config"].update(num_layers=5))
    assert "eva_config.num_layers is 5" in load_limited(d)


# -- 4. duplicated tensors ------------------------------------------------------------------------
def test_duplicate_tensor_across_shards_refused(tmp_path: Path, glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    first, second = sorted(d.glob("pytorch_model-*.bin"))
    a = torch.load(first, weights_only=True)
    b = torch.load(second, weights_only=True)
    key = next(iter(a))
    b[key] = a[key].clone()
    torch.save(b, second)
    with pytest.raises(CheckpointError, match=rf"{key} is in both {first.name} and {second.name}"):
        load(model_path=d, device="cpu")


# -- 5. Qwen rank file ----------------------------------------------------------------------------
def test_cut_qwen_rank_file_refused(tmp_path: Path) -> None:
    real = shared("tokenizers/qwen-7b-chat/qwen.tiktoken")
    assert qwen.load_tokenizer(real.parent).vocab_size == 151851
    lines = real.read_bytes().splitlines()[:1000]
    (tmp_path / "qwen.tiktoken").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(TokenizerError, match="1,000 token ranks.*cut short"):
        qwen.load_tokenizer(tmp_path)


# -- 6. pickles with code, truncated files ---------------------------------------------------------
class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def test_pickle_with_code_refused_without_weights_only_hint(tmp_path: Path,
                                                            glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    first = sorted(d.glob("pytorch_model-*.bin"))[0]
    sd = torch.load(first, weights_only=True)
    sd["evil"] = Evil()
    torch.save(sd, first)
    with pytest.raises(CheckpointError) as info:
        load(model_path=d, device="cpu")
    msg = str(info.value)
    assert "contains code or objects" in msg and "refus" in msg
    assert "weights_only" not in msg and "truncated" not in msg and "\n" not in msg


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_file_own_message(tmp_path: Path, fmt: str) -> None:
    from tests.checkpoints import chatglm2_checkpoint

    d = chatglm2_checkpoint(tmp_path / "m", fmt=fmt)
    f = next(d.glob(f"*.{fmt}"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load(model_path=d, device="cpu")
    msg = str(info.value)
    assert msg.endswith("the file is truncated or corrupt; download it again"), msg
    assert "your checkpoint file is" not in msg


def test_tokenizer_config_symlinked_to_dev_zero_refused(tmp_path: Path, glm2_dir: Path) -> None:
    d = copy_ckpt(glm2_dir, tmp_path / "m")
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer_config.json").symlink_to("/dev/zero")
    line = load_limited(d)
    assert "tokenizer_config.json" in line and "not a regular file" in line
