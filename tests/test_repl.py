"""The REPL driven with scripted input, a fake model and a rich Console writing to a StringIO."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.markdown import Markdown

from llmchat import repl as repl_mod
from llmchat.errors import UsageError
from llmchat.repl import COMMANDS, Repl, run_repl
from llmchat.types import GenerationConfig, Message
from llmchat.ui import ChatUI, MarkdownStream
from tests.fakes import FakeChatModel, pyte_screen

Line = str | BaseException


class Script:
    """An ``input()``-like reader: returns lines, raises exceptions, EOF when done."""

    def __init__(self, lines: Iterable[Line], *, with_default: bool = False) -> None:
        self.lines = list(lines)
        self.prompts: list[str] = []
        self.defaults: list[str] = []
        self.with_default = with_default

    def read(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        item = self.lines.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def read_default(self, prompt: str, default: str = "") -> str:
        self.defaults.append(default)
        return self.read(prompt)

    @property
    def reader(self) -> Callable[..., str]:
        return self.read_default if self.with_default else self.read


def console(terminal: bool = False, width: int = 100) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, height=30, force_terminal=terminal,
                   color_system=None, legacy_windows=False), buf


def chat(model: FakeChatModel, lines: Iterable[Line], *, with_default: bool = False,
         terminal: bool = False, config: GenerationConfig | None = None,
         **kw: Any) -> tuple[int, str, Script]:
    script = Script(lines, with_default=with_default)
    con, buf = console(terminal)
    code = run_repl(model, config or model.defaults, read=script.reader, console=con, **kw)
    return code, buf.getvalue(), script


def users(msgs: list[Message]) -> list[str]:
    return [m.content for m in msgs if m.role == "user"]


# -- the loop and exits ---------------------------------------------------------------------
def test_turns_build_history_and_header() -> None:
    model = FakeChatModel().enqueue(["Hel", "lo"], ["Fine"])
    code, out, _ = chat(model, ["hi", "how are you?"])
    assert code == 0
    assert "fake-6b" in out and "float32" in out and "INT4" in out and "/help" in out
    assert "Hello" in out and "Fine" in out
    assert model.calls[0][0] == [Message("user", "hi")]
    assert model.calls[1][0] == [Message("user", "hi"), Message("assistant", "Hello"),
                                 Message("user", "how are you?")]


@pytest.mark.parametrize("cmd", ["/exit", "/bye", "/quit", "/EXIT"])
def test_exit_commands(cmd: str) -> None:
    model = FakeChatModel()
    code, _, script = chat(model, [cmd, "never read"])
    assert code == 0 and script.lines == ["never read"] and not model.calls


def test_eof_exits_zero() -> None:
    assert chat(FakeChatModel(), [])[0] == 0


def test_unknown_command() -> None:
    _, out, _ = chat(FakeChatModel(), ["/frobnicate now"])
    assert "Unknown command '/frobnicate'. Type /help." in out


def test_help_lists_every_command() -> None:
    _, out, _ = chat(FakeChatModel(), ["/help"])
    for name in ["/help", "/clear", "/history", "/undo", "/regen", "/retry", "/system", "/set",
                 "/show", "/stats", "/save", "/load", "/copy", "/image", "/exit"]:
        assert name in COMMANDS and name in out


def test_blank_lines_and_slash_escape() -> None:
    model = FakeChatModel()
    chat(model, ["", "   ", "//etc/hosts?"])
    assert [users(c[0]) for c in model.calls] == [["/etc/hosts?"]]


def test_triple_quote_multiline() -> None:
    model = FakeChatModel()
    _, _, script = chat(model, ['"""', "line one", "", "  line two", 'end"""', '"""one"""'])
    assert users(model.calls[0][0]) == ["line one\n\n  line two\nend"]
    assert model.calls[1][0][-1].content == "one"
    assert script.prompts.count("... ") == 4


# -- Ctrl-C ----------------------------------------------------------------------------------
def test_ctrl_c_mid_reply_drops_the_turn_and_continues() -> None:
    model = FakeChatModel().enqueue(["Partial ", "answ", KeyboardInterrupt(), "never"], ["B"])
    code, out, _ = chat(model, ["first", "second", "/history"])
    assert code == 0
    assert "Partial answ" in out and "never" not in out
    assert "Interrupted: this turn is not kept in the history." in out
    assert model.calls[1][0] == [Message("user", "second")]  # the first turn is gone
    assert "You: first" not in out and "You: second" in out and "Assistant: B" in out


def test_real_sigint_stops_a_slow_reply_at_once() -> None:
    model = FakeChatModel(delay=0.02).enqueue(["tok "] * 200, ["fast"])
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    before = signal.getsignal(signal.SIGINT)
    t0 = time.monotonic()
    timer.start()
    try:
        code, out, _ = chat(model, ["slow one", "next"])
    finally:
        timer.cancel()
    assert code == 0 and time.monotonic() - t0 < 2.0
    assert model.completed == 1  # only the second reply finished
    assert "Interrupted" in out and "fast" in out
    assert out.count("tok ") < 50  # stopped mid-reply, not at the end
    assert model.calls[1][0] == [Message("user", "next")]
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_ctrl_c_at_prompt_prints_a_hint_then_continues() -> None:
    model = FakeChatModel()
    code, out, script = chat(model, [KeyboardInterrupt(), "hello", KeyboardInterrupt(), "/exit"])
    assert code == 0 and not script.lines
    assert out.count("Ctrl-C again to quit") == 2  # typing in between resets the double press
    assert users(model.calls[0][0]) == ["hello"]


def test_double_ctrl_c_exits() -> None:
    code, out, script = chat(FakeChatModel(), [KeyboardInterrupt(), KeyboardInterrupt(), "x"])
    assert code == 0 and script.lines == ["x"]


def test_ctrl_c_twice_slowly_does_not_exit() -> None:
    script = Script([KeyboardInterrupt(), KeyboardInterrupt(), "/exit"])
    con, buf = console()
    r = Repl(FakeChatModel(), GenerationConfig(), ChatUI(con), script.read)
    ticks = iter([10.0, 10.0, 11.5, 11.5])
    r.clock = lambda: next(ticks)
    assert r.run() == 0 and not script.lines
    assert buf.getvalue().count("Ctrl-C again") == 2


# -- history editing -------------------------------------------------------------------------
def test_undo() -> None:
    model = FakeChatModel()
    _, out, _ = chat(model, ["/undo", "a", "b", "/undo", "c"])
    assert "Nothing to undo." in out and "Removed the last turn: b" in out
    assert users(model.calls[-1][0]) == ["a", "c"]


def test_regen_replaces_the_last_reply() -> None:
    model = FakeChatModel().enqueue("A1", "B1", "B2")
    _, out, _ = chat(model, ["/regen", "a", "b", "/regen", "/history"])
    assert "Nothing to regenerate." in out
    assert model.calls[2][0] == model.calls[1][0]  # same question, same context
    hist = out[out.rindex("You: a"):]
    assert "Assistant: B2" in hist and "B1" not in hist and hist.count("You: b") == 1


def test_interrupted_regen_keeps_the_old_turn() -> None:
    model = FakeChatModel().enqueue("A1", ["x", KeyboardInterrupt()], "A3")
    chat(model, ["a", "/regen", "next"])
    assert model.calls[-1][0] == [Message("user", "a"), Message("assistant", "A1"),
                                  Message("user", "next")]


def test_retry_prefills_the_last_question() -> None:
    model = FakeChatModel()
    _, out, script = chat(model, ["first", "second", "/retry", "second, edited"],
                          with_default=True)
    assert script.defaults == ["", "", "", "second", ""]
    assert users(model.calls[-1][0]) == ["first", "second, edited"]
    _, out, _ = chat(FakeChatModel(), ["q", "/retry", "q2"])  # a reader without default=
    assert "Last question: q" in out


def test_clear_keeps_the_system_prompt() -> None:
    model = FakeChatModel()
    _, out, _ = chat(model, ["a", "/clear", "b"], system="Be brief.")
    assert "Conversation cleared (the system prompt is kept)." in out
    assert model.calls[-1][0] == [Message("system", "Be brief."), Message("user", "b")]


def test_history_shows_roles() -> None:
    _, out, _ = chat(FakeChatModel().enqueue("Hi there"), ["/history", "hello", "/history"],
                     system="S!")
    assert "System: S!" in out and "You: hello" in out and "Assistant: Hi there" in out


def test_system_command() -> None:
    model = FakeChatModel()
    _, out, _ = chat(model, ["/system", "/system You are terse.", "/system", "q",
                             "/system Be kind.", "q2"])
    assert "No system prompt" in out and "System prompt: You are terse." in out
    assert model.calls[0][0][0] == Message("system", "You are terse.")
    assert model.calls[1][0][0] == Message("system", "Be kind.")
    assert sum(m.role == "system" for m in model.calls[1][0]) == 1


def test_system_on_a_model_without_system_role() -> None:
    model = FakeChatModel(name="chatglm2-6b", supports_system=False)
    _, out, _ = chat(model, ["/system hi", "q"], system="from the CLI")
    assert out.count("chatglm2-6b has no system role, so /system is not available.") == 2
    assert model.calls[0][0] == [Message("user", "q")]


# -- settings --------------------------------------------------------------------------------
def test_set_applies_to_the_next_reply() -> None:
    model = FakeChatModel()
    chat(model, ["q0", "/set temperature 0.2", "/set top_p 0.5", "/set top_k 7",
                 "/set repetition_penalty 1.1", "/set max_new_tokens 5", "/set seed 42",
                 "/set max_length 999", "q1", "/set seed none", "/set max_new_tokens off", "q2"])
    first, second, third = (c[1] for c in model.calls)
    assert first == model.defaults
    assert (second.temperature, second.top_p, second.top_k, second.repetition_penalty,
            second.max_new_tokens, second.seed, second.max_length) == (
        0.2, 0.5, 7, 1.1, 5, 42, 999)
    assert third.seed is None and third.max_new_tokens is None and third.temperature == 0.2


@pytest.mark.parametrize("line, message", [
    ("/set", "Usage: /set KEY VALUE"),
    ("/set temperature", "Usage: /set KEY VALUE"),
    ("/set foo 1", "Unknown setting 'foo'"),
    ("/set temperature abc", "temperature needs a number, got 'abc'"),
    ("/set temperature __import__('os')", "temperature needs a number"),
    ("/set top_k 1.5", "top_k needs an integer, got '1.5'"),
    ("/set top_p 2", "top_p must be in (0, 1], got 2.0"),
    ("/set temperature -1", "temperature must be >= 0"),
    ("/set temperature nan", "temperature must be a finite number"),
    ("/set max_new_tokens 0", "max_new_tokens must be a positive integer"),
])
def test_invalid_set_is_rejected(line: str, message: str) -> None:
    model = FakeChatModel()
    _, out, _ = chat(model, [line, "q"])
    assert message in out
    assert model.calls[0][1] == model.defaults


def test_show_reports_model_settings_and_context() -> None:
    cfg = GenerationConfig(min_length=100)
    _, out, _ = chat(FakeChatModel(), ["hello", "/show", "/set min_length 0", "/show"],
                     config=cfg)
    first = out[out.index("context used"):]
    assert "fake-6b" in out and "INT4" in out and "temperature" in out and "0.8" in out
    assert "min_length" in out and "held back" in out
    assert f"/ {cfg.max_length} tokens" in out
    assert out.rsplit("min_length", 1)[1].count("held back") == 0  # hidden once it is 0
    assert first  # context line printed


def test_stats_toggle() -> None:
    model = FakeChatModel().enqueue(["a", "b", "c"], "d", "e")
    _, out, _ = chat(model, ["q1", "/stats", "q2", "/stats", "q3"])
    assert out.count("prompt tokens") == 1 and "3 reply tokens" not in out
    assert "1 reply tokens" in out and "first token 0.25 s" in out and "tok/s" in out
    _, out, _ = chat(FakeChatModel(), ["q"], stats=True)
    assert "prompt tokens" in out


# -- save / load -----------------------------------------------------------------------------
def png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    return path


def test_save_load_round_trip(tmp_path: Path) -> None:
    img = png(tmp_path / "cat.png")
    model = FakeChatModel(supports_images=True).enqueue("A red square.", "Yes.")
    file = tmp_path / "chat.json"
    chat(model, [f"/image {img}", "what is it?", "sure?", f"/save {file}"], system="Sys")
    data = json.loads(file.read_text(encoding="utf-8"))
    assert data["format"] == "llmchat.conversation" and data["model"] == "fake-6b"
    saved = [Message.from_dict(d) for d in data["messages"]]
    assert saved[0] == Message("system", "Sys") and saved[1].image == str(img.resolve())
    assert [m.role for m in saved] == ["system", "user", "assistant", "user", "assistant"]

    fresh = FakeChatModel(supports_images=True)
    _, out, _ = chat(fresh, [f"/load {file}", "/history", "more"])
    assert "Loaded 2 turns" in out and "You: what is it?" in out
    assert fresh.calls[0][0] == [*saved, Message("user", "more")]


def test_save_default_location() -> None:
    _, out, _ = chat(FakeChatModel(), ["q", "/save"])
    files = list((Path(os.environ["LLMCHAT_HOME"]) / "chats").glob("chat-*.json"))
    assert len(files) == 1 and f"to {files[0]}" in out


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "chat.json"
    file.write_text("previous", encoding="utf-8")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repl_mod.os, "replace", broken_replace)
    _, out, _ = chat(FakeChatModel(), ["q", f"/save {file}", "y"])  # y: replace it
    assert "Cannot save to" in out and "No space left on device" in out
    assert file.read_text(encoding="utf-8") == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temp file left


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    ('{"hello": 1}', "no 'messages' list"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "should be a user message"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "the last question has no answer"),
    ('{"messages": [{"role": "user"}]}', "needs a 'role' and a 'content'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role"),
    ('{"messages": [{"role": "system", "content": "s"}]}', "has a system prompt"),
    ('{"messages": [{"role": "user", "content": "x", "image": "/no/such.png"}, '
     '{"role": "assistant", "content": "y"}]}', "image /no/such.png not found"),
])
def test_load_errors_are_clear(tmp_path: Path, content: str | None, message: str) -> None:
    file = tmp_path / "c.json"
    if content is not None:
        file.write_text(content, encoding="utf-8")
    model = FakeChatModel(supports_system=False)
    _, out, _ = chat(model, ["keep", f"/load {file}", "next"])
    assert "Cannot load:" in out and message in out
    assert users(model.calls[-1][0]) == ["keep", "next"]  # history untouched


# -- context, errors, images, clipboard ------------------------------------------------------
def test_context_drop_notice_and_history() -> None:
    model = FakeChatModel().enqueue("a" * 40, "b" * 40, "c")
    cfg = GenerationConfig(max_length=120, max_new_tokens=10)
    _, out, _ = chat(model, ["1" * 30, "2" * 30, "3" * 30, "/history"], config=cfg)
    assert "Context budget of 120 tokens reached: dropped the 1 oldest turn(s)" in out
    assert users(model.calls[2][0]) == ["2" * 30, "3" * 30]
    # Fitting decides what is sent; the conversation (/history, /save) keeps every turn.
    assert "You: " + "1" * 30 in out.split("dropped")[1]


def test_model_error_keeps_the_session_and_the_question() -> None:
    model = FakeChatModel().enqueue(["par", UsageError("the prompt is too long\nsecond line")],
                                    "fine")
    _, out, script = chat(model, ["long question", "edited", "/history"], with_default=True)
    assert "error: the prompt is too long" in out and "second line" not in out
    assert script.defaults[1] == "long question"  # nothing typed is lost
    assert model.calls[1][0] == [Message("user", "edited")]


def test_unexpected_exceptions_keep_the_session() -> None:
    """A bug or an environment failure (e.g. out of memory) mid-reply must not end the chat."""
    model = FakeChatModel().enqueue([RuntimeError("bug\ndetails")], ["fine"])
    code, out, _ = chat(model, ["q", "again"])
    assert code == 0 and "error: RuntimeError: bug" in out and "details" not in out
    assert users(model.calls[-1][0]) == ["again"]


def test_image_command(tmp_path: Path) -> None:
    _, out, _ = chat(FakeChatModel(), [f"/image {tmp_path}"])
    assert "This model does not support images" in out
    img = png(tmp_path / "x.png")
    (tmp_path / "bad.png").write_text("not an image", encoding="utf-8")
    model = FakeChatModel(supports_images=True)
    _, out, script = chat(model, [f"/image {tmp_path}/missing.png", f"/image {tmp_path}/bad.png",
                                  f"/image {img}", "describe", "again"])
    assert out.count("Cannot use this image") == 2
    assert "[image] >>> " in script.prompts
    assert model.calls[0][0] == [Message("user", "describe", str(img.resolve()))]
    assert model.calls[1][0][-1] == Message("user", "again")  # attached once


def test_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    _, out, _ = chat(FakeChatModel(), ["/copy", "q", "/copy"])
    assert "Nothing to copy yet." in out and "No clipboard tool found" in out
    sink = tmp_path / "clip.txt"
    tool = bin_dir / "xclip"
    tool.write_text(f"#!/bin/sh\n/bin/cat > '{sink}'\n", encoding="utf-8")
    tool.chmod(0o755)
    chat(FakeChatModel().enqueue(["你好，", "world"]), ["q", "/copy"])
    assert sink.read_text(encoding="utf-8") == "你好，world"


# -- rendering -------------------------------------------------------------------------------
def test_plain_mode_prints_raw_text() -> None:
    model = FakeChatModel().enqueue(["**bold** and `code`", "\n\n# not a heading"])
    _, out, _ = chat(model, ["q"], terminal=True, plain=True)
    assert "**bold** and `code`\n\n# not a heading\n" in out


def test_not_a_terminal_is_plain_automatically() -> None:
    _, out, _ = chat(FakeChatModel().enqueue("**bold**"), ["q"])
    assert "**bold**" in out


def test_terminal_renders_markdown() -> None:
    model = FakeChatModel().enqueue(["Some **bo", "ld** text.\n\n", "```python\n", "x = 1\n",
                                     "```\n\nEnd."])
    _, out, _ = chat(model, ["q"], terminal=True)
    # "**bo" may flash in the live tail while the emphasis is open, and only the changed cells
    # are rewritten, so look at the screen the bytes leave
    pyte = pytest.importorskip("pyte")
    sc = pyte.Screen(100, 60)
    pyte.Stream(sc).feed(out.replace("\n", "\r\n"))
    shown = "\n".join(line.rstrip() for line in sc.display)
    assert "Some bold text." in shown and "**" not in shown
    assert "```" not in shown and "x = 1" in shown and "End." in shown


MD = ("Intro with **bold** and `code`.\n\n1. one\n2. two\n\n```python\ndef f(x):\n\n"
      "    return x\n```\n\n中文逐字输出，" * 2 + "\n\n"
      + "\n".join(f"- item {i}" for i in range(40)) + "\n\nEnd.")


def test_stream_never_reprints_a_finished_block() -> None:
    con, buf = console(terminal=True, width=60)
    stream = MarkdownStream(con)
    stream.push("First paragraph is here.")
    stream.push("\n\nSecond")
    after = len(buf.getvalue())
    for ch in " paragraph grows" * 5:
        stream.push(ch)
    stream.close()
    assert "First paragraph is here." in buf.getvalue()[:after]
    assert "First paragraph" not in buf.getvalue()[after:]


def test_cjk_shows_each_character_as_it_arrives() -> None:
    con, buf = console(terminal=True)
    stream = MarkdownStream(con)
    for i, ch in enumerate("你好世界"):
        stream.push(ch)
        assert "你好世界"[: i + 1] in buf.getvalue()
        time.sleep(0.01)
    stream.close()


def test_streamed_screen_equals_one_shot_render() -> None:
    pytest.importorskip("pyte")
    screen = pyte_screen

    con, buf = console(terminal=True, width=60)  # 30 rows: the 40-item list overflows it
    stream = MarkdownStream(con)
    for ch in MD:
        stream.push(ch)
    stream.close()
    ref, ref_buf = console(terminal=True, width=60)
    ref.print(Markdown(MD))
    assert screen(buf.getvalue(), 60) == screen(ref_buf.getvalue(), 60)


# -- the prompt_toolkit reader ----------------------------------------------------------------
def test_prompt_reader_editing_history_and_ctrl_c(tmp_path: Path) -> None:
    from prompt_toolkit.application import create_app_session
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from llmchat.ui import PromptReader

    hist = tmp_path / "home" / "history"
    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        reader = PromptReader(hist, {"/help": "h"}, ["temperature"])
        inp.send_text("hello\r")
        assert reader(">>> ") == "hello"
        inp.send_text("one\x1b\rtwo\r")  # Esc+Enter: a new line, not sending
        assert reader(">>> ") == "one\ntwo"
        inp.send_text("\x1b[200~pasted\nlines\x1b[201~\r")  # bracketed paste keeps newlines
        assert reader(">>> ") == "pasted\nlines"
        inp.send_text("typed\x03kept\r")  # Ctrl-C on text clears the line only
        assert reader(">>> ") == "kept"
        inp.send_text("\x03")
        with pytest.raises(KeyboardInterrupt):
            reader(">>> ")
        inp.send_text("\x1b[A\r")  # up arrow recalls the previous entry
        assert reader(">>> ") == "kept"
        inp.send_text("x\r")
        assert reader(">>> ", default="draft ") == "draft x"
    assert "hello" in hist.read_text(encoding="utf-8")


def test_completion_of_commands_paths_and_settings(tmp_path: Path) -> None:
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from llmchat.ui import _completer

    comp = _completer({k: c.help for k, c in COMMANDS.items()}, list(repl_mod.SETTINGS))
    (tmp_path / "photo.png").write_bytes(b"")

    def names(text: str) -> list[str]:
        return [c.text for c in comp.get_completions(Document(text), CompleteEvent())]

    assert names("/he") == ["/help"] and set(names("/s")) == {"/system", "/set", "/show",
                                                              "/stats", "/save"}
    assert names(f"/image {tmp_path}/ph") == ["oto.png"]
    assert names("/set temp") == ["temperature"]
    assert names("plain text") == []


def test_cancelled_retry_keeps_the_turn() -> None:
    model = FakeChatModel().enqueue("A1", "A2", "A3")
    _, out, _ = chat(model, ["first", "/retry", KeyboardInterrupt(), "/history", "next"])
    assert model.calls[-1][0] == [Message("user", "first"), Message("assistant", "A1"),
                                  Message("user", "next")]


def test_retry_replaces_the_turn_once_sent() -> None:
    model = FakeChatModel().enqueue("A1", "A2", "A3")
    chat(model, ["first", "/retry", "first, edited", "next"])
    assert model.calls[1][0] == [Message("user", "first, edited")]
    assert model.calls[2][0] == [Message("user", "first, edited"), Message("assistant", "A2"),
                                 Message("user", "next")]


def test_system_shows_the_model_default_and_none_clears_it() -> None:
    model = FakeChatModel()
    model.default_system = "You are a helpful assistant."
    _, out, _ = chat(model, ["/system", "/system none", "/system", "q"])
    assert "System prompt (the model's default): You are a helpful assistant." in out
    assert "No system prompt." in out
    assert model.calls[-1][0] == [Message("system", ""), Message("user", "q")]
