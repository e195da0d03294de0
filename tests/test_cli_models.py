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
