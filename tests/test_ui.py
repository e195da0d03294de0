"""Terminal safety and the terminal side of the REPL: escapes, streaming cost, clipboard, history."""

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
from tests.fakes import FakeChatModel

EVIL = "\x1b]2;EVIL\x1b\\"


def console(terminal: bool, width: int = 80, color: str | None = None) -> tuple[Console, io.StringIO]:
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
    for say in (ui.note, ui.info, ui.warn, ui.error):
        say(f"x {EVIL} y")
    assert "\x1b]" not in buf.getvalue() and buf.getvalue().count("\\x1b]2;EVIL") == 4


def test_error_line_from_a_hostile_config_is_escaped(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [EVIL]}), encoding="utf-8")
    res = CliRunner().invoke(app, ["ask", "-p", str(tmp_path), "q"])
    assert res.exit_code != 0
    assert res.stderr.startswith("error: ") and "\\x1b]2;EVIL" in res.stderr
    assert "\x1b" not in res.stderr
