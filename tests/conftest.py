from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from tests.checkpoints import chatglm2_checkpoint


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network, no user files touched, default dtype restored."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("LLMCHAT_HOME", str(tmp_path / "llmchat-home"))

    def guard(*args: object, **kwargs: object) -> None:
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", guard)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def glm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ChatGLM2-6B checkpoint (sharded .bin + index), shared by the session."""
    return chatglm2_checkpoint(tmp_path_factory.mktemp("glm2") / "chatglm2-6b")
