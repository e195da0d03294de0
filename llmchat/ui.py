"""The terminal side of the REPL: ``ChatUI`` (all rich output) and ``PromptReader`` (input).

Streaming Markdown without flicker (``MarkdownStream``) is append-only. A reply is cut into
blocks at blank lines outside code fences. A finished block is rendered once with rich's
``Markdown`` and printed as ordinary output: it is never touched again. Only the block still
being written lives in a transient ``rich.live.Live`` region, redrawn in place as deltas arrive,
so one paragraph at most is repainted and earlier text is never reprinted. If that block grows
taller than the terminal (a long list or code block), its top rows are printed for good and only
the bottom rows stay live; this relies on rich's wrapping being stable for a growing prefix,
which holds for paragraphs, lists and code (not for tables, which are rare that long). Re-rendering
is throttled to the time rendering takes, so a fast model is never slowed by the display, and
each delta (one CJK character, say) shows as soon as it arrives. ``--plain`` or a non-terminal
stdout writes the raw deltas instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

from llmchat.types import GenerationConfig, Message, ReplyStats

THEME = Theme({
    "llmchat.muted": "dim",
    "llmchat.info": "cyan",
    "llmchat.warn": "yellow",
    "llmchat.error": "bold red",
    "llmchat.title": "bold magenta",
    "llmchat.user": "bold green",
    "llmchat.assistant": "bold blue",
})
CODE_THEME = "monokai"
Row = list[Segment]


def make_console(*, stderr: bool = False) -> Console:
    """The default console; tests pass their own (``Console(file=StringIO())``)."""
    return Console(stderr=stderr, theme=THEME, highlight=False)


class _Rows:
    """Pre-rendered lines as a renderable (what is printed, or shown in the live region)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows: Sequence[Row] = rows

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for row in self.rows:
            yield from row
            yield Segment.line()


def _plain_space(s: Segment) -> bool:
    return not s.text.strip() and not (s.style and s.style.bgcolor)


def _blank(row: Row) -> bool:
    return all(_plain_space(s) for s in row)


def _rstrip(row: Row) -> Row:
    """Drop rich's padding to the full width, so copying from the terminal gets clean lines."""
    row = list(row)
    while row and (_plain_space(row[-1]) or row[-1].control):
        row.pop()
    if row and not (row[-1].style and row[-1].style.bgcolor):
        last = row[-1]
        row[-1] = Segment(last.text.rstrip(" "), last.style, last.control)
    return row


def _is_fence(line: str) -> str | None:
    """The fence marker (```` ``` ```` or ``~~~``, any length) a line opens or closes with."""
    s = line.lstrip(" ")
    if len(line) - len(s) > 3 or s[:3] not in ("```", "~~~"):
        return None
    return s[: len(s) - len(s.lstrip(s[0]))]


class MarkdownStream:
    """Append-only Markdown rendering of one streamed reply (see the module docstring)."""

    def __init__(self, console: Console, *, code_theme: str = CODE_THEME) -> None:
        self.console = console
        self.code_theme = code_theme
        self.text = ""
        self._block = ""  # source of the unfinished block
        self._scanned = 0  # offset in _block of the first line not yet scanned
        self._fence: str | None = None  # open fence marker inside _block
        self._printed = 0  # rows of the unfinished block already printed for good
        self._blocks = 0  # finished blocks printed
        self._live: Live | None = None
        self._tail = _Rows([])  # what the live region shows; mutated in place
        self._next_refresh = 0.0

    def push(self, delta: str) -> None:
        self.text += delta
        self._block += delta
        done: list[Row] = []
        while (cut := self._next_boundary()) is not None:
            block, self._block, self._scanned = self._block[:cut], self._block[cut:], 0
            if block.strip():
                done += self._rows(block)[self._printed:]
                self._blocks += 1
            self._printed = 0
        self._refresh(done)

    def close(self) -> None:
        """Print what is left as final output and remove the live region."""
        done = self._rows(self._block)[self._printed:] if self._block.strip() else []
        if self._live is not None:
            self._tail.rows = []
            self._live.stop()
            self._live = None
        self._emit(done)
        self._blocks += bool(done)
        self._block, self._scanned, self._printed = "", 0, 0

    def _next_boundary(self) -> int | None:
        """End offset of the first blank line outside a fence in the unscanned lines."""
        while (nl := self._block.find("\n", self._scanned)) != -1:
            line = self._block[self._scanned:nl]
            self._scanned = nl + 1
            marker = _is_fence(line)
            if self._fence is None:
                if marker:
                    self._fence = marker
                elif not line.strip():
                    return self._scanned
            elif marker and marker[0] == self._fence[0] and len(marker) >= len(self._fence) \
                    and not line.strip().lstrip(marker[0]):
                self._fence = None
        return None

    def _rows(self, block: str) -> list[Row]:
        """Rows of a block: leading/trailing blank rows trimmed, one separator row before."""
        md = Markdown(block, code_theme=self.code_theme)
        rows = [_rstrip(r) for r in self.console.render_lines(md, self.console.options)]
        while rows and _blank(rows[0]):
            rows.pop(0)
        while rows and _blank(rows[-1]):
            rows.pop()
        return [[], *rows] if self._blocks else rows

    def _emit(self, rows: Sequence[Row]) -> None:
        if rows:
            self.console.print(_Rows(rows))

    def _refresh(self, done: list[Row]) -> None:
        now = time.perf_counter()
        if not done and now < self._next_refresh:
            return
        tail: list[Row] = []
        if self._block.strip():
            rows = self._rows(self._block)
            room = max(3, self.console.height - 3)
            if len(rows) - self._printed > room:  # too tall to repaint: print the top for good
                keep = min(4, room)
                done += rows[self._printed: len(rows) - keep]
                self._printed = len(rows) - keep
            tail = rows[self._printed:]
        self._tail.rows = tail
        if self._live is None:
            self._live = Live(self._tail, console=self.console, auto_refresh=False,
                              transient=True)
            self._live.start()
        if done:
            self._emit(done)  # printing above the live region redraws it with the new tail
        else:
            self._live.refresh()
        # Spend at most about half of the time rendering, so the model is never held up.
        spent = time.perf_counter() - now
        self._next_refresh = time.perf_counter() + max(spent, 1 / 120)


class PlainStream:
    """Raw deltas, as they arrive (``--plain``, or stdout is not a terminal)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.text = ""

    def push(self, delta: str) -> None:
        self.text += delta
        self.console.print(delta, end="", markup=False, highlight=False, emoji=False,
                           soft_wrap=True)
        self.console.file.flush()

    def close(self) -> None:
        if self.text and not self.text.endswith("\n"):
            self.console.print()


class ReplyStream(Protocol):
    text: str

    def push(self, delta: str) -> None: ...
    def close(self) -> None: ...


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def quant_label(bits: int) -> str:
    return {8: "INT8", 4: "INT4"}.get(bits, "not quantized")


class ChatUI:
    """All REPL output: header, replies, notices, tables. Styles come from ``THEME``."""

    def __init__(self, console: Console | None = None, *, plain: bool = False) -> None:
        self.console = console or make_console()
        self.console.push_theme(THEME)
        self.plain = plain or not self.console.is_terminal

    # -- one-line messages ----------------------------------------------------------------
    def note(self, msg: str) -> None:
        self.console.print(Text(msg, style="llmchat.muted"), soft_wrap=True)

    def warn(self, msg: str) -> None:
        self.console.print(Text(msg, style="llmchat.warn"), soft_wrap=True)

    def error(self, msg: str) -> None:
        self.console.print(Text(msg, style="llmchat.error"), soft_wrap=True)

    # -- the session ----------------------------------------------------------------------
    def header(self, name: str, info: Any, budget: int) -> None:
        line = Text.assemble(
            ("llmchat ", "llmchat.title"), (name, "bold"),
            (f"  {info.dtype} · {info.device} · {quant_label(info.quant)} · "
             f"context {budget} tokens", "llmchat.muted"))
        self.console.print(line)
        self.note('Type /help for commands, """ or Alt+Enter for multi-line, Ctrl-D to quit.')

    @contextmanager
    def reply(self) -> Iterator[ReplyStream]:
        """A stream for one reply; closed (partial text kept on screen) however it ends."""
        out: ReplyStream = PlainStream(self.console) if self.plain else MarkdownStream(self.console)
        try:
            yield out
        finally:
            out.close()

    def stats(self, s: ReplyStats) -> None:
        cached = f" ({s.cached_tokens} cached)" if s.cached_tokens else ""
        parts = [f"{s.prompt_tokens} prompt tokens{cached}", f"{s.completion_tokens} reply tokens",
                 f"first token {s.ttft_s:.2f} s", f"{s.decode_tokens_per_s:.1f} tok/s"]
        if s.peak_memory_bytes:
            parts.append(f"peak GPU memory {_gib(s.peak_memory_bytes)}")
        if s.finish_reason == "length":
            parts.append("stopped at the length limit")
        self.note(" · ".join(parts))

    def history(self, messages: Sequence[Message]) -> None:
        if not messages:
            self.note("No messages yet.")
        for m in messages:
            label = {"system": "System", "user": "You", "assistant": "Assistant"}[m.role]
            t = Text.assemble((f"{label}: ", f"llmchat.{m.role}" if m.role != "system"
                               else "llmchat.muted"), m.content)
            if m.image:
                t.append(f"  [image: {m.image}]", style="llmchat.muted")
            self.console.print(t)

    def table(self, rows: Sequence[tuple[str, str]], title: str | None = None) -> None:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for key, value in rows:
            grid.add_row(key, Text(value))
        if title:
            self.console.print(Text(title, style="llmchat.title"))
        self.console.print(grid)

    def settings(self, name: str, info: Any, config: GenerationConfig, used: int | None) -> None:
        rows = [("model", name), ("path", info.path), ("dtype", info.dtype),
                ("device", info.device), ("quantization", quant_label(info.quant))]
        for key, value in config.to_dict().items():
            if key == "min_length" and not value:
                continue
            shown = "none" if value is None else str(value)
            if key == "min_length":
                shown += " (the end token is held back until the reply reaches it)"
            rows.append((key, shown))
        context = f"{'?' if used is None else used} / {config.max_length} tokens"
        rows.append(("context used", context))
        self.table(rows)


# -- input --------------------------------------------------------------------------------
def _key_bindings() -> Any:
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("escape", "enter")  # Alt+Enter / Esc then Enter: a new line instead of sending
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    @kb.add("c-c")
    def _interrupt(event: Any) -> None:
        buf = event.current_buffer
        if buf.text:  # like a shell: Ctrl-C on typed text discards the line, nothing more
            buf.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt(), style="class:aborting")

    return kb


def _completer(commands: dict[str, str], set_keys: Sequence[str]) -> Any:
    from prompt_toolkit.completion import Completer, Completion, PathCompleter
    from prompt_toolkit.document import Document

    paths = PathCompleter(expanduser=True)

    class _Complete(Completer):
        def get_completions(self, document: Document, event: Any) -> Iterator[Completion]:
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            cmd, space, arg = text.partition(" ")
            if not space:
                for name, help_ in commands.items():
                    if name.startswith(cmd):
                        yield Completion(name, -len(cmd), display_meta=help_)
            elif cmd in ("/image", "/load", "/save"):
                yield from paths.get_completions(Document(arg.lstrip()), event)
            elif cmd == "/set" and " " not in arg.lstrip():
                word = arg.lstrip()
                for key in set_keys:
                    if key.startswith(word):
                        yield Completion(key, -len(word))

    return _Complete()


class PromptReader:
    """Line editing, persistent history, Tab completion and multi-line input (prompt_toolkit)."""

    def __init__(self, history_file: Path | None, commands: dict[str, str],
                 set_keys: Sequence[str]) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, History, InMemoryHistory

        history: History = InMemoryHistory()
        if history_file is not None:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                history_file.touch(exist_ok=True)
                history = FileHistory(os.fspath(history_file))
            except OSError:  # read-only home: history just is not kept
                pass
        self.session: Any = PromptSession(
            history=history, completer=_completer(commands, set_keys),
            complete_while_typing=False, key_bindings=_key_bindings(),
            prompt_continuation=lambda width, line, wrap: "." * (width - 1) + " ",
            enable_open_in_editor=False)

    def __call__(self, prompt: str, default: str = "") -> str:
        return str(self.session.prompt(prompt, default=default))
