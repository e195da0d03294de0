"""/save and /load against hostile paths and files: nothing lost, nothing clobbered."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llmchat import chatfile
from llmchat.repl import Repl
from llmchat.types import GenerationConfig, Message
from llmchat.ui import ChatUI
from tests.fakes import FakeChatModel
from tests.test_repl import Script, console


def session(lines: list[str]) -> tuple[Repl, str]:
    con, buf = console()
    script = Script(lines)
    r = Repl(FakeChatModel().enqueue("A1"), GenerationConfig(), ChatUI(con), script.read)
    assert r.run() == 0
    return r, buf.getvalue()


def test_save_refuses_devices_fifos_dirs_and_links(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = tmp_path / "outside.json"
    target.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    for path in (Path("/dev/null"), fifo, tmp_path, link):
        _, out = session(["q", f"/save {path}"])
        assert "Cannot save" in out and "Saved" not in out
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert target.read_text() == "keep"


def test_save_keeps_an_existing_files_mode_and_asks_first(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("old")
    path.chmod(0o640)
    _, out = session(["q", f"/save {path}", "n"])
    assert "Not saved." in out and path.read_text() == "old"
    _, out = session(["q", f"/save {path}", "y"])
    assert "Saved 2 messages" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert chatfile.load_conversation(path)[0] == Message("user", "q")
    new = tmp_path / "new.json"
    session(["q", f"/save {new}"])
    assert stat.S_IMODE(new.stat().st_mode) == 0o600


def test_default_names_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCHAT_HOME", str(tmp_path))
    for _ in range(3):  # within the same second
        session(["q", "/save"])
    files = sorted((tmp_path / "chats").glob("chat-*.json"))
    assert len(files) == 3


def test_save_on_a_full_disk_keeps_the_session_and_the_old_file(tmp_path: Path,
                                                                  monkeypatch) -> None:  # noqa: ANN001
    path = tmp_path / "c.json"
    path.write_text("old")

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    r, out = session(["q", f"/save {path}", "y", "again"])
    assert "Cannot save to" in out and "No space left on device" in out
    assert path.read_text() == "old" and len(r.conv.turns) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, None])
def test_load_failures_never_end_the_session(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "bad.json"
    if content is None:
        path = Path("/dev/zero")
    else:
        path.write_text(content)
    r, out = session(["q", f"/load {path}", "after"])
    assert "Cannot load" in out and len(r.conv.turns) == 4  # q and "after" both answered
