"""The terminal side of the REPL: ``ChatUI`` (all rich output) and ``PromptReader`` (input).

Streaming Markdown without flicker (``MarkdownStream``) is append-only. A reply is cut into
blocks at blank lines outside code fences. A finished block is rendered once with rich's
``Markdown`` and printed as ordinary output: it is never touched again. Only the block still
being written is the live tail: it is re-rendered as deltas arrive and only what changed is
written (``MarkdownStream._draw``): from the first cell that differs, so text streaming into a
paragraph costs about what ``--plain`` does (the new characters, no cursor movement), and a word
wrapping to the next row or an emphasis closing rewrites from that point of its row only.
Earlier text is never reprinted. If that block grows taller than the terminal (a long list or
code block), its top rows are printed for good and only the bottom rows stay live; this relies on
rich's wrapping being stable for a growing prefix, which holds for paragraphs, lists and code (not
for tables, which are rare that long). After a resize the tail is erased by the height the
terminal re-wrapped it to (reflowing terminals: VTE, kitty, iTerm2, tmux, Windows Terminal) and
drawn again at the new width. Re-rendering is throttled to the time rendering takes, so a fast
model is never slowed by the display, and each delta (one CJK character, say) shows as soon as it
arrives. ``--plain`` or a non-terminal stdout writes the raw deltas instead. Control characters
from the model are shown as ``\\xNN`` on a terminal (``llmchat.termsafe``).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.markdown import Markdown
from rich.segment import ControlType, Segment
from rich.table import Table
from rich.text import Text
from rich.theme import Theme

from llmchat.termsafe import osc52, visible
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
        self._shown: list[Row] = []  # the live tail on screen; the cursor ends its last row
        self._width = 0  # console width the tail was drawn at
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
        """Print what is left as final output; the cursor ends on a fresh line."""
        done = self._rows(self._block)[self._printed:] if self._block.strip() else []
        self._draw(done, [])
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
        md = Markdown(visible(block), code_theme=self.code_theme)
        rows = [_rstrip(r) for r in self.console.render_lines(md, self.console.options)]
        while rows and _blank(rows[0]):
            rows.pop(0)
        while rows and _blank(rows[-1]):
            rows.pop()
        return [[], *rows] if self._blocks else rows

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
        self._draw(done, tail)
        # Spend at most about half of the time rendering, so the model is never held up.
        spent = time.perf_counter() - now
        self._next_refresh = time.perf_counter() + max(spent, 1 / 120)

    def _draw(self, done: list[Row], tail: list[Row]) -> None:
        """Show ``done`` for good and ``tail`` live below it, writing only what changed.

        The screen holds ``self._shown`` from the start of a line, the cursor at the end of its
        last row. The first row that differs is found; if the old row is a prefix of the new one
        (text streaming into a paragraph: nearly every delta) only the new characters are
        written, else the cursor goes up to that row, the screen below is erased and the rows
        from there are written. After a resize the terminal has re-wrapped the old rows (as
        reflowing terminals do), so the cursor goes up by their re-wrapped height and all is
        redrawn at the new width.
        """
        new = [list(Segment.simplify(r)) for r in (*done, *tail)]
        old = self._shown
        out: list[Segment] = []
        width = self.console.width
        start, rest = 0, new[0] if new else []
        if old and width != self._width:  # resized: count the rows the terminal re-wrapped
            up = sum(max(1, -(-Segment.get_line_length(r) // width)) for r in old) - 1
            out.append(_move(up, 0))
        elif old:
            while start < min(len(old), len(new)) and old[start] == new[start]:
                start += 1
            if start == len(old):  # every row on screen stays: only rows to add
                rest = [Segment.line(), *new[start]] if start < len(new) else []
            else:  # redraw from the first cell that differs
                col, rest = _common(old[start], new[start]) if start < len(new) else (0, [])
                end = start == len(old) - 1 and col == Segment.get_line_length(old[start])
                if not end:
                    out.append(_move(len(old) - 1 - start, col))
        out += rest
        for row in new[start + 1:]:
            out += [Segment.line(), *row]
        if new and not tail:
            out.append(Segment.line())  # done for good: later output starts on a fresh line
        self._shown, self._width = new[len(done):], width
        if out:
            self.console.print(_Segments(out), end="", soft_wrap=True)


def _move(up: int, col: int) -> Segment:
    """Up ``up`` rows to column ``col`` (0-based), erasing from there to the end of the screen."""
    seq = (f"\x1b[{up}A" if up else "") + (f"\x1b[{col + 1}G" if col else "\r") + "\x1b[J"
    return Segment(seq, None, [(ControlType.CURSOR_MOVE_TO_COLUMN, col)])


def _common(old: Row, new: Row) -> tuple[int, Row]:
    """The cells ``old`` and ``new`` share at their start, and the rest of ``new``."""
    col = 0
    for k, (a, b) in enumerate(zip(old, new, strict=False)):
        if a == b:
            col += a.cell_length
            continue
        if (a.style or None) != (b.style or None) or a.control or b.control:
            return col, new[k:]
        n = 0
        while n < min(len(a.text), len(b.text)) and a.text[n] == b.text[n]:
            n += 1
        return col + cell_len(b.text[:n]), [Segment(b.text[n:], b.style), *new[k + 1:]]
    return col, new[len(old):]


class _Segments:
    """Segments written as they are (no wrapping, no newline added)."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        self.segments = segments

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.segments


class PlainStream:
    """Raw deltas, as they arrive (``--plain``, or stdout is not a terminal)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.text = ""

    def push(self, delta: str) -> None:
        self.text += delta
        if self.console.is_terminal:  # control characters shown, never obeyed
            self.console.print(visible(delta), end="", markup=False, highlight=False,
                               emoji=False, soft_wrap=True)
        else:  # byte for byte (rich's Text would drop CR, BS, BEL, VT and FF)
            self.console.file.write(delta)
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
        self.console.print(Text(visible(msg), style="llmchat.muted"), soft_wrap=True)

    def warn(self, msg: str) -> None:
        self.console.print(Text(visible(msg), style="llmchat.warn"), soft_wrap=True)

    def error(self, msg: str) -> None:
        self.console.print(Text(visible(msg), style="llmchat.error"), soft_wrap=True)

    def copy_osc52(self, text: str) -> bool:
        """Put ``text`` on the clipboard with the OSC 52 escape (tmux: DCS passthrough).

        Works over SSH and inside tmux, where no clipboard tool can reach the user's desktop;
        False (nothing written) when the output is not a terminal.
        """
        if not self.console.is_terminal:
            return False
        self.console.file.write(osc52(text))
        self.console.file.flush()
        return True

    # -- the session ----------------------------------------------------------------------
    def header(self, name: str, info: Any, budget: int) -> None:
        line = Text.assemble(
            ("llmchat ", "llmchat.title"), (visible(name), "bold"),
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
                               else "llmchat.muted"), visible(m.content))
            if m.image:
                t.append(f"  [image: {visible(m.image)}]", style="llmchat.muted")
            self.console.print(t)

    def table(self, rows: Sequence[tuple[str, str]], title: str | None = None) -> None:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        for key, value in rows:
            grid.add_row(visible(key), Text(visible(value)))
        if title:
            self.console.print(Text(visible(title), style="llmchat.title"))
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


def _warn_stderr(msg: str) -> None:
    make_console(stderr=True).print(Text(visible(msg), style="llmchat.warn"), soft_wrap=True)


def _private_file_history(path: Path) -> Any:
    """prompt_toolkit's FileHistory, but the file is created (and kept) readable by us only."""
    from prompt_toolkit.history import FileHistory

    class PrivateFileHistory(FileHistory):
        def store_string(self, string: str) -> None:
            fd = os.open(self.filename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "ab") as f:
                f.write(f"\n# {datetime.now()}\n".encode())
                f.write("".join(f"+{line}\n" for line in string.split("\n")).encode())

    return PrivateFileHistory(os.fspath(path))


def guard_history(inner: Any, warn: Callable[[str], None]) -> Any:
    """``inner`` (a prompt_toolkit History) whose read and write errors cost one warning.

    prompt_toolkit loads and stores history inside its event loop, where an ``OSError`` (a full
    disk, a directory in the way) prints "Unhandled exception in event loop" and waits for Enter
    on every input. Here the first such error is reported through ``warn`` and the session goes
    on with the history kept in memory only. ``warn`` is called with the message outside the
    prompt (``PromptReader`` collects it from ``pending``).
    """
    from prompt_toolkit.history import History

    class GuardedHistory(History):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.broken, self.pending = inner, False, []

        def _fail(self, exc: OSError, doing: str) -> None:
            if not self.broken:
                self.broken = True
                name = getattr(self.inner, "filename", "the history file")
                self.pending.append(f"warning: cannot {doing} the input history {name} "
                                    f"({exc.strerror or exc}); history is kept for this "
                                    "session only")

        def load_history_strings(self) -> Iterable[str]:
            try:
                return list(self.inner.load_history_strings())
            except OSError as exc:
                self._fail(exc, "read")
                return []

        def store_string(self, string: str) -> None:
            if self.broken:
                return
            try:
                self.inner.store_string(string)
            except OSError as exc:
                self._fail(exc, "write to")

        def flush_warnings(self) -> None:
            while self.pending:
                warn(self.pending.pop(0))

    return GuardedHistory()


class PromptReader:
    """Line editing, persistent history, Tab completion and multi-line input (prompt_toolkit).

    The history file is private (0600). If it cannot be used (read-only home, a directory in the
    way, a full disk) one warning says so and the history lives in memory for the session.
    """

    def __init__(self, history_file: Path | None, commands: dict[str, str],
                 set_keys: Sequence[str], *, warn: Callable[[str], None] | None = None) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import History, InMemoryHistory

        self.warn = warn or _warn_stderr
        history: History = InMemoryHistory()
        self._guard: Any = None
        if history_file is not None:
            try:
                history_file.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(history_file, os.O_RDONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    mode = os.fstat(fd).st_mode
                    if not stat.S_ISREG(mode):
                        raise IsADirectoryError(errno.EISDIR, "not a regular file")
                    if mode & 0o077:  # an older, world-readable history
                        os.fchmod(fd, stat.S_IMODE(mode) & 0o700)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.warn(f"warning: cannot use the input history {history_file} "
                          f"({exc.strerror or exc}); history is kept for this session only")
            else:
                history = self._guard = guard_history(_private_file_history(history_file),
                                                      self.warn)
        self.session: Any = PromptSession(
            history=history, completer=_completer(commands, set_keys),
            complete_while_typing=False, key_bindings=_key_bindings(),
            prompt_continuation=lambda width, line, wrap: "." * (width - 1) + " ",
            enable_open_in_editor=False)

    def __call__(self, prompt: str, default: str = "") -> str:
        try:
            return str(self.session.prompt(prompt, default=default))
        finally:
            if self._guard is not None:
                self._guard.flush_warnings()
