"""Terminal safety and the REPL's terminal side: escapes, streaming cost, clipboard, history."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from llmchat.cli import app
from llmchat.repl import run_repl
from llmchat.termsafe import visible
from llmchat.ui import ChatUI
from tests.fakes import FakeChatModel, pyte_screen

EVIL = "\x1b]2;EVIL\x1b\\"


def console(terminal: bool, width: int = 80,
            color: str | None = None) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, height=30, force_terminal=terminal, color_system=color,
                   legacy_windows=False), buf


def chat(model: FakeChatModel, lines: list[str], *, terminal: bool, **kw: object) -> str:
    con, buf = console(terminal)
    todo = list(lines)

    def read(prompt: str) -> str:
        if not todo:
            raise EOFError
        return todo.pop(0)

    run_repl(model, model.defaults, read=read, console=con, **kw)  # type: ignore[arg-type]
    return buf.getvalue()


# -- 1. control characters are shown, not obeyed --------------------------------------------------
def test_visible_escapes_c0_c1_but_keeps_newline_and_tab() -> None:
    assert visible("a\tb\nc") == "a\tb\nc"
    assert visible(EVIL) == "\\x1b]2;EVIL\\x1b\\"
    assert visible("\x07\x08\r\x7f\x9b\x85") == "\\x07\\x08\\x0d\\x7f\\x9b\\x85"
    assert visible("line\r\nnext") == "line\nnext"
    assert visible("中文 ok") == "中文 ok"


@pytest.mark.parametrize("plain", [False, True])
def test_reply_escapes_are_shown_on_a_terminal(plain: bool) -> None:
    out = chat(FakeChatModel().enqueue(["Hi ", EVIL, " there\x07\n\nmore"]), ["q"],
               terminal=True, plain=plain)
    assert "]2;EVIL" in out and "\\x1b]2;EVIL" in out
    assert "\x1b]" not in out and "\x07" not in out


def test_reply_bytes_unchanged_when_not_a_terminal() -> None:
    reply = f"Hi {EVIL} bell\x07 cr\r back\x08 \x9b\n"
    out = chat(FakeChatModel().enqueue(list(reply)), ["q"], terminal=False)
    assert reply in out


def test_notes_and_errors_are_escaped() -> None:
    con, buf = console(True)
    ui = ChatUI(con)
    for say in (ui.note, ui.warn, ui.error):
        say(f"x {EVIL} y")
    assert "\x1b]" not in buf.getvalue() and buf.getvalue().count("\\x1b]2;EVIL") == 3


def test_error_line_from_a_hostile_config_is_escaped(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [EVIL]}), encoding="utf-8")
    res = CliRunner().invoke(app, ["ask", "-p", str(tmp_path), "q"])
    assert res.exit_code != 0
    assert res.stderr.startswith("error: ") and "\\x1b]2;EVIL" in res.stderr
    assert "\x1b" not in res.stderr


# -- 4, 5. the input history: private, and never in the way ----------------------------------------
def _reader_session(hist: Path, lines: list[str], warnings: list[str]) -> list[str]:
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from llmchat.ui import PromptReader

    got = []
    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        reader = PromptReader(hist, {"/help": "h"}, [], warn=warnings.append)
        for line in lines:
            inp.send_text(line + "\r")
            got.append(reader(">>> "))
    return got


def test_history_file_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from llmchat.paths import data_dir

    monkeypatch.setenv("LLMCHAT_HOME", str(tmp_path / "home"))
    hist = data_dir() / "history"
    old = os.umask(0o022)
    try:
        warnings: list[str] = []
        assert _reader_session(hist, ["secret"], warnings) == ["secret"]
        assert "secret" in hist.read_text(encoding="utf-8") and not warnings
        assert hist.stat().st_mode & 0o777 == 0o600
        hist.chmod(0o644)  # one written by an older llmchat is made private
        _reader_session(hist, ["again"], warnings)
        assert hist.stat().st_mode & 0o777 == 0o600
        hist.unlink()  # deleted under a running session: recreated private
        _reader_session(hist, ["third"], warnings)
        assert hist.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_history_path_that_is_a_directory_falls_back(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from prompt_toolkit.history import FileHistory

    hist = tmp_path / "history"
    hist.mkdir()
    warnings: list[str] = []
    assert _reader_session(hist, ["one", "two"], warnings) == ["one", "two"]
    assert len(warnings) == 1 and "history" in warnings[0] and str(hist) in warnings[0]
    from llmchat.ui import PromptReader

    reader = PromptReader(hist, {}, [], warn=warnings.append)
    assert not isinstance(reader.session.history, FileHistory)
    out = capsys.readouterr()
    assert "Unhandled exception" not in out.out + out.err


def test_full_disk_warns_once_and_goes_on(tmp_path: Path) -> None:
    import errno

    from prompt_toolkit.history import FileHistory

    from llmchat.ui import guard_history

    class FullDisk(FileHistory):
        writes = 0

        def store_string(self, string: str) -> None:
            FullDisk.writes += 1
            raise OSError(errno.ENOSPC, "No space left on device")

    warnings: list[str] = []
    hist = guard_history(FullDisk(str(tmp_path / "h")), warnings.append)
    for s in ["a", "b", "c"]:
        hist.append_string(s)  # what prompt_toolkit calls when a line is accepted
    hist.flush_warnings()
    hist.flush_warnings()
    assert hist.get_strings() == ["a", "b", "c"]  # still recalled this session
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert FullDisk.writes == 1


def test_full_disk_in_a_prompt_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import errno
    import os

    real_open = os.open

    def full(path: object, flags: int, *a: object) -> int:
        if flags & os.O_WRONLY and str(path) == str(tmp_path / "history"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", full)
    warnings: list[str] = []
    assert _reader_session(tmp_path / "history", ["a", "b", "c"], warnings) == ["a", "b", "c"]
    assert len(warnings) == 1 and "No space left" in warnings[0]
    out = capsys.readouterr()
    assert "Unhandled exception" not in out.out + out.err


# -- 3. /copy without a clipboard tool: OSC 52 ---------------------------------------------------
@pytest.fixture
def no_clipboard_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    for var in ("WAYLAND_DISPLAY", "DISPLAY", "TMUX"):
        monkeypatch.delenv(var, raising=False)
    return bin_dir


REPLY = "你好, world\nline 2"
B64 = "5L2g5aW9LCB3b3JsZApsaW5lIDI="  # base64 of REPLY's UTF-8


def test_copy_falls_back_to_osc52(no_clipboard_tool: Path) -> None:
    out = chat(FakeChatModel().enqueue(REPLY), ["q", "/copy"], terminal=True)
    assert f"\x1b]52;c;{B64}\x07" in out and "OSC 52" in out


def test_copy_osc52_inside_tmux(no_clipboard_tool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMUX", "/tmp/tmux-1000/default,1,0")
    out = chat(FakeChatModel().enqueue(REPLY), ["q", "/copy"], terminal=True)
    assert f"\x1bPtmux;\x1b\x1b]52;c;{B64}\x07\x1b\\" in out


def test_copy_osc52_when_the_tool_fails(no_clipboard_tool: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPLAY", ":0")  # xclip there but no X server reachable (SSH)
    tool = no_clipboard_tool / "xclip"
    tool.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    tool.chmod(0o755)
    out = chat(FakeChatModel().enqueue(REPLY), ["q", "/copy"], terminal=True)
    assert f"\x1b]52;c;{B64}\x07" in out


def test_copy_not_a_terminal_writes_no_escape(no_clipboard_tool: Path) -> None:
    out = chat(FakeChatModel().enqueue(REPLY), ["q", "/copy"], terminal=False)
    assert "]52;" not in out and "nothing was copied" in out


# -- 2. streaming Markdown writes about what it shows ----------------------------------------------
WORDS = ("The quick **brown** fox jumps over the lazy dog and keeps running through the field "
         "while `code` and 中文字符 appear here and there in a longish paragraph. ")
REPLY_MD = (WORDS * 3 + "\n\n- one item here\n- two items *there*\n\n```python\ndef f(x):\n"
            "    return x + 1\n```\n\n" + WORDS * 2 + "\n\n1. first\n2. second\n")


def _stream(kind: str, width: int = 80, resize_at: int | None = None) -> tuple[str, int]:
    from llmchat.ui import MarkdownStream, PlainStream

    con, buf = console(True, width=width, color="256")
    stream = MarkdownStream(con) if kind == "md" else PlainStream(con)
    tokens = re.findall(r"\s*\S+|\s+", REPLY_MD)
    for i, tok in enumerate(tokens):
        if i == resize_at:
            con.width = width // 2
        stream._next_refresh = 0.0  # type: ignore[union-attr]  # a slow model: redraw each time
        stream.push(tok)
    stream.close()
    return buf.getvalue(), len(tokens)


def test_markdown_stream_costs_about_what_plain_does() -> None:
    md, n = _stream("md")
    plain, _ = _stream("plain")
    assert n >= 150
    up = len(re.findall(r"\x1b\[\d*A", md))
    erase = len(re.findall(r"\x1b\[[012]?[JK]", md))
    assert len(md.encode()) <= 3 * len(plain.encode()), (len(md.encode()), len(plain.encode()))
    assert up <= 20 and erase <= 40, (up, erase)


def _screen(raw: str, width: int) -> list[str]:
    pytest.importorskip("pyte")
    return pyte_screen(raw, width, 200)


def test_incremental_stream_leaves_the_one_shot_screen() -> None:
    from rich.markdown import Markdown

    md, _ = _stream("md")
    ref, buf = console(True, width=80, color="256")
    ref.print(Markdown(REPLY_MD))
    assert _screen(md, 80) == _screen(buf.getvalue(), 80)


def test_resize_moves_up_by_the_rewrapped_rows() -> None:
    from llmchat.ui import MarkdownStream

    con, buf = console(True, width=80)
    stream = MarkdownStream(con)
    stream.push("word " * 30)  # 150 cells: two rows of about 75 at width 80
    before = len(buf.getvalue())
    con.width = 40  # a reflowing terminal now shows each row as two
    stream._next_refresh = 0.0
    stream.push("end")
    chunk = buf.getvalue()[before:]
    assert chunk.startswith("\x1b[3A\r\x1b[J")  # to the top of the four rows, erased
    stream.close()
    assert buf.getvalue().count("word") == 30 + 30  # drawn once before, once after; no third


def test_ask_on_a_terminal_shows_control_characters_escaped(monkeypatch) -> None:  # noqa: ANN001
    import io

    from llmchat import cli

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    for tty, want in ((True, "\\x1b]2;EVIL"), (False, "\x1b]2;EVIL")):
        out = Tty() if tty else io.StringIO()
        monkeypatch.setattr(cli.sys, "stdout", out)
        monkeypatch.setattr(cli.Stdout, "tty", None)
        cli.Stdout.write("a \x1b]2;EVIL\x07 b")
        assert want in out.getvalue()
