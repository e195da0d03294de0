"""Every model through the CLI as a user runs it: by name from the Hugging Face cache, and with
``--quant 16/8/4`` on tiny upstream-layout checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from llmchat.cli import app
from llmchat.loader import load
from llmchat.types import Message
from tests.checkpoints import chatglm2_checkpoint
from tests.ckpt_chatglm import chatglm_checkpoint
from tests.ckpt_qwen import qwen_checkpoint
from tests.ckpt_visualglm import visualglm_checkpoint

runner = CliRunner()
WRITERS: dict[str, Callable[[Path], Path]] = {
    "chatglm2-6b": chatglm2_checkpoint,
    "chatglm-6b": chatglm_checkpoint,
    "qwen-7b-chat": qwen_checkpoint,
    "visualglm-6b": visualglm_checkpoint,
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: write(root / name) for name, write in WRITERS.items()}


@pytest.mark.parametrize("name", sorted(WRITERS))
@pytest.mark.parametrize("quant", ["16", "int8", "4"])
def test_ask_every_model_and_quant_mode(dirs: dict[str, Path], name: str, quant: str,
                                        tmp_path: Path) -> None:
    args = ["ask", "-p", str(dirs[name]), "--device", "cpu", "-q", quant, "-t", "0", "-n", "6",
            "--json"]
    image = None
    if name == "visualglm-6b":
        image = tmp_path / "pic.png"
        Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
        args = ["image", str(image), "这是什么？", *args[1:]]
    else:
        args.append("你好")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    bits = {"16": 16, "int8": 8, "4": 4}[quant]
    assert data["model"] == name and data["quant"] == bits and data["completion_tokens"] >= 1
    assert data["dtype"] == ("float32" if bits == 16 else "bfloat16")  # CPU auto dtype
    m = load(model_path=dirs[name], device="cpu", quant=bits)
    question = "这是什么？" if image else "你好"
    msg = Message("user", question, str(image) if image else None)
    assert data["reply"] == m.chat([msg], m.defaults.with_(temperature=0, max_new_tokens=6))


def hub_cache(tmp_path: Path, repo: str, src: Path) -> Path:
    """Lay ``src`` out as huggingface_hub's cache does (refs/main → snapshots/<rev>/)."""
    root = tmp_path / "hf" / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / "0123456789abcdef"
    shutil.copytree(src, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("0123456789abcdef")
    return snap


def test_model_by_name_from_the_hub_cache(dirs: dict[str, Path], tmp_path: Path) -> None:
    """`llmchat ask --model chatglm2` finds THUDM/chatglm2-6b in the standard cache, offline."""
    listed = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert all(r["cached"] is None for r in listed)
    snap = hub_cache(tmp_path, "THUDM/chatglm2-6b", dirs["chatglm2-6b"])
    listed = {r["name"]: r["cached"] for r in json.loads(runner.invoke(app, ["models",
                                                                              "--json"]).stdout)}
    assert listed["chatglm2-6b"] == str(snap) and listed["qwen-7b-chat"] is None
    res = runner.invoke(app, ["ask", "--model", "chatglm2", "--device", "cpu", "-t", "0", "-n",
                              "6", "你好"])
    assert res.exit_code == 0, res.output
    m = load(model_path=dirs["chatglm2-6b"], device="cpu")
    assert res.stdout == m.chat([Message("user", "你好")],
                                m.defaults.with_(temperature=0, max_new_tokens=6)) + "\n"
    missing = runner.invoke(app, ["ask", "--model", "qwen", "hi"])
    assert missing.exit_code == 1 and "Qwen/Qwen-7B-Chat" in missing.stderr
    assert "not in the local cache" in missing.stderr


# -- the official pre-quantized repositories -----------------------------------------------
@pytest.fixture(scope="module")
def glm2_int4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny THUDM/chatglm2-6b-int4 look-alike: config.json quantization_bit 4, block linears
    stored as packed int4 + fp16 weight_scale."""
    import torch

    from llmchat.models import chatglm2
    from tests.checkpoints import build_state_dict, chatglm2_config
    from tests.test_quant import LINEAR_SUFFIXES, prequantize

    sd = build_state_dict(chatglm2.Model, chatglm2.Config.from_hf(chatglm2_config()), seed=3,
                          std=0.05)
    sd = prequantize(sd, 4, LINEAR_SUFFIXES)
    sd["transformer.rotary_pos_emb.inv_freq"] = torch.ones(4).half()
    return chatglm2_checkpoint(tmp_path_factory.mktemp("int4") / "m", state_dict=sd,
                               quantization_bit=4)


def test_prequantized_names_are_known() -> None:
    from llmchat.registry import lookup, models, repo_for

    for name, preset, bits in (("chatglm2-6b-int4", "chatglm2-6b", 4),
                               ("chatglm-6b-int4", "chatglm-6b", 4),
                               ("chatglm-6b-int8", "chatglm-6b", 8),
                               ("THUDM/chatglm2-6b-int4", "chatglm2-6b", 4),
                               ("chatglm2-int4", "chatglm2-6b", 4),
                               ("chatglm2", "chatglm2-6b", 0)):
        spec, implied = lookup(name)
        assert (spec.name, implied) == (preset, bits), name
    specs = models()
    assert repo_for(specs["chatglm2-6b"], 4) == "THUDM/chatglm2-6b-int4"
    assert repo_for(specs["chatglm2-6b"], 8) == "THUDM/chatglm2-6b"  # no official int8
    assert repo_for(specs["chatglm-6b"], 8) == "THUDM/chatglm-6b-int8"
    assert repo_for(specs["qwen-7b-chat"], 4) == "Qwen/Qwen-7B-Chat"
    assert repo_for(specs["chatglm2-6b"], 16) == "THUDM/chatglm2-6b"


def test_quant_fetches_the_prequantized_repo(glm2_int4: Path, dirs: dict[str, Path],
                                             tmp_path: Path) -> None:
    """--model chatglm2 --quant 4 and --model chatglm2-6b-int4 read THUDM/chatglm2-6b-int4
    (never the 12.5 GB fp16 repo); `models` lists it and whether it is cached."""
    from llmchat.errors import CheckpointError, UsageError

    for name, quant in (("chatglm2", 4), ("chatglm2-6b-int4", 16), ("chatglm-6b-int4", 16),
                        ("chatglm", 8)):
        with pytest.raises(CheckpointError, match=r"THUDM/chatglm2?-6b-int[48]: it is not in"):
            load(name, device="cpu", quant=quant, download=False)
    with pytest.raises(UsageError, match="pre-quantized to int4"):
        load("chatglm2-6b-int4", device="cpu", quant=8)
    rows = {r["name"]: r for r in json.loads(runner.invoke(app, ["models", "--json"]).stdout)}
    assert [(q["name"], q["hub_id"], q["cached"]) for q in rows["chatglm2-6b"]["quantized"]] == [
        ("chatglm2-6b-int4", "THUDM/chatglm2-6b-int4", None)]
    assert [q["hub_id"] for q in rows["chatglm-6b"]["quantized"]] == [
        "THUDM/chatglm-6b-int4", "THUDM/chatglm-6b-int8"]
    assert rows["qwen-7b-chat"]["quantized"] == []

    snap = hub_cache(tmp_path, "THUDM/chatglm2-6b-int4", glm2_int4)
    rows = {r["name"]: r for r in json.loads(runner.invoke(app, ["models", "--json"]).stdout)}
    assert rows["chatglm2-6b"]["quantized"][0]["cached"] == str(snap)
    assert rows["chatglm2-6b"]["cached"] is None
    table = runner.invoke(app, ["models"], env={"COLUMNS": "160"}).stdout
    assert "THUDM/chatglm2-6b-int4" in table and "chatglm-6b-int8" in table
    for name, quant in (("chatglm2", 4), ("chatglm2-6b-int4", 16), ("chatglm2-6b-int4", 4),
                        ("THUDM/chatglm2-6b-int4", 16)):
        m = load(name, device="cpu", quant=quant, download=False)
        assert (m.name, m.info.path, m.info.quant) == ("chatglm2-6b", str(snap), 4)
    res = runner.invoke(app, ["ask", "--model", "chatglm2-6b-int4", "--device", "cpu", "-t", "0",
                              "-n", "4", "--json", "你好"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["quant"] == 4
    # --quant 16 of the plain name still means the fp16 repo
    with pytest.raises(CheckpointError, match="THUDM/chatglm2-6b: it is not in"):
        load("chatglm2", device="cpu", download=False)


def test_quant_uses_a_cached_fp16_repo_rather_than_download(dirs: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """Only the fp16 repo is cached: --quant 4 quantizes it as it loads (the same weights as the
    pre-quantized repo) instead of failing offline or downloading another 3.9 GB."""
    snap = hub_cache(tmp_path, "THUDM/chatglm2-6b", dirs["chatglm2-6b"])
    m = load("chatglm2", device="cpu", quant=4, download=False)
    assert (m.info.path, m.info.quant) == (str(snap), 4)
    from llmchat.errors import CheckpointError

    with pytest.raises(CheckpointError, match="THUDM/chatglm2-6b-int4"):  # asked by name
        load("chatglm2-6b-int4", device="cpu", download=False)
