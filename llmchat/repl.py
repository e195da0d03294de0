"""The interactive chat loop: ``run_repl`` with injected input, a slash-command table, Ctrl-C rules.

The loop is pure over its inputs: ``read(prompt)`` (``input()`` semantics: ``EOFError`` on Ctrl-D,
``KeyboardInterrupt`` on Ctrl-C) and a ``ChatUI`` for every byte of output (see ``llmchat.ui`` for
how replies stream). The conversation is a ``Conversation`` (system prompt, turns, fitting); a
turn enters it only once its reply has finished, so a reply stopped with Ctrl-C or failed by
the model leaves no trace; settings changed with ``/set`` apply to the next reply. Saved chats
are ``chatfile``'s, ``/copy``'s tools ``clipboard``'s, the data folder ``paths``'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmchat import chatfile
from llmchat.clipboard import copy_with_tool
from llmchat.conversation import Conversation
from llmchat.errors import ImageError, LLMChatError, UsageError
from llmchat.paths import data_dir
from llmchat.types import SETTINGS, GenerationConfig, Message, parse_setting
from llmchat.ui import ChatUI, PromptReader

if TYPE_CHECKING:
    from rich.console import Console

    from llmchat.models.base import ChatModel

Read = Callable[[str], str]
DOUBLE_CTRL_C_S = 1.0


@contextlib.contextmanager
def _one_interrupt() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt once; more presses while we clean up are swallowed."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    fired = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: keep Python's default behaviour
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)


@dataclass(frozen=True)
class Command:
    run: Callable[[Repl, str], bool | None]  # returns False to end the session
    usage: str
    help: str


class Repl:
    """One chat session: history, settings and the command table."""

    def __init__(self, model: ChatModel, config: GenerationConfig, ui: ChatUI, read: Read, *,
                 stats: bool = False) -> None:
        self.model, self.ui, self.read = model, ui, read
        self.conv = Conversation(model, config)
        self.retrying = False  # the next question replaces the last turn (/retry)
        self.image: str | None = None  # attached to the next user message
        self.show_stats = stats
        self.prefill = ""  # text to put back into the next prompt
        self.clock: Callable[[], float] = time.monotonic
        try:
            self._takes_default = "default" in inspect.signature(read).parameters
        except (TypeError, ValueError):
            self._takes_default = False

    @property
    def config(self) -> GenerationConfig:
        return self.conv.config

    @config.setter
    def config(self, value: GenerationConfig) -> None:
        self.conv.config = value

    @property
    def messages(self) -> list[Message]:
        return self.conv.messages

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        last_ctrl_c = -1e9
        while True:
            try:
                text, is_command = self.read_message()
                last_ctrl_c = -1e9
                if not self.dispatch(text, is_command):
                    return 0
            except KeyboardInterrupt:  # at the prompt (a reply handles its own)
                self.retrying = False  # a cancelled /retry edit keeps the turn
                if self.clock() - last_ctrl_c < DOUBLE_CTRL_C_S:
                    return 0
                last_ctrl_c = self.clock()
                self.ui.note("(Ctrl-C again to quit, or Ctrl-D, /exit; Ctrl-C stops a reply)")
            except EOFError:
                return 0

    def dispatch(self, text: str, is_command: bool) -> bool:
        """Run one command or ask one question; False ends the session."""
        if is_command:
            name, *rest = text.split(maxsplit=1)
            cmd = COMMANDS.get(name.lower())
            if cmd is None:
                self.ui.error(f"Unknown command '{name}'. Type /help.")
                return True
            return cmd.run(self, rest[0].strip() if rest else "") is not False
        if text:
            self.ask(text, image=self.image)
        return True

    def _read(self, prompt: str) -> str:
        default, self.prefill = self.prefill, ""
        if default and self._takes_default:
            return self.read(prompt, default=default)  # type: ignore[call-arg]
        if default:
            self.ui.note(f"Last question: {default}")
        return self.read(prompt)

    def read_message(self) -> tuple[str, bool]:
        """One message (``\"\"\"`` … ``\"\"\"`` spans lines) and whether it is a /command."""
        line = self._read("[image] >>> " if self.image else ">>> ").strip()
        if line.startswith('"""'):
            first = line[3:]
            if len(first) >= 3 and first.endswith('"""'):  # """one line"""
                return first[:-3].strip(), False
            parts = [first]
            while not (nxt := self._read("... ").rstrip()).endswith('"""'):
                parts.append(nxt)
            parts.append(nxt[:-3])
            return "\n".join(parts).strip(), False
        if line.startswith("//"):  # "//etc/hosts?" sends "/etc/hosts?"
            return line[1:], False
        return line, line.startswith("/")

    def ask(self, question: str, *, image: str | None = None,
            replace_last: bool = False) -> bool:
        """Send one question; the turn enters the conversation only if its reply finishes."""
        replace_last = replace_last or self.retrying
        self.retrying = False
        with _one_interrupt():
            try:
                reply = self.conv.send(question, image=image, replace_last=replace_last)
                if reply.dropped_turns:
                    self.ui.warn(f"Context budget of {self.config.max_length} tokens reached: "
                                 f"dropped the {reply.dropped_turns} oldest turn(s) from what is "
                                 "sent (the conversation keeps them).")
                with self.ui.reply() as out:
                    try:
                        for delta in reply:
                            out.push(delta)
                    finally:
                        reply.close()
            except KeyboardInterrupt:
                self.ui.note("Interrupted: this turn is not kept in the history.")
                self.image = image
                return False
            except Exception as exc:  # keep the session (and the question) whatever went wrong
                what = str(exc) if isinstance(exc, LLMChatError) else f"{type(exc).__name__}: {exc}"
                self.ui.error(f"error: {what}".splitlines()[0])
                self.prefill, self.image = question, image
                self.retrying = replace_last
                return False
        self.image = None
        if self.show_stats:
            self.ui.stats(reply.stats)
        return True

    def last_turn(self) -> Message | None:
        """The last user message, when the conversation ends with a complete turn."""
        last = self.conv.last_turn()
        return last[0] if last else None

    # -- commands ---------------------------------------------------------------------------
    def cmd_help(self, arg: str) -> None:
        self.ui.table([(c.usage, c.help) for c in COMMANDS.values()], title="Commands")
        self.ui.note('Multi-line: paste, Alt+Enter (or Esc Enter), or wrap in """. '
                     "Ctrl-C stops a reply; Ctrl-D quits. '//text' sends '/text'.")

    def cmd_exit(self, arg: str) -> bool:
        return False

    def cmd_clear(self, arg: str) -> None:
        self.conv.clear()
        self.image, self.retrying = None, False
        kept = " (the system prompt is kept)" if self.conv.system is not None else ""
        self.ui.note(f"Conversation cleared{kept}.")

    def cmd_history(self, arg: str) -> None:
        self.ui.history(self.messages)

    def cmd_undo(self, arg: str) -> None:
        if (q := self.last_turn()) is None:
            self.ui.note("Nothing to undo.")
            return
        self.conv.undo()
        self.ui.note(f"Removed the last turn: {q.content[:60]}")

    def cmd_regen(self, arg: str) -> None:
        if (q := self.last_turn()) is None:
            self.ui.note("Nothing to regenerate.")
            return
        self.ask(q.content, image=q.image, replace_last=True)

    def cmd_retry(self, arg: str) -> None:
        if (q := self.last_turn()) is None:
            self.ui.note("Nothing to retry.")
            return
        self.prefill, self.image, self.retrying = q.content, q.image, True
        self.ui.note("Edit the question and press Enter: the answer replaces the last turn "
                     "(Ctrl-C keeps it).")

    def cmd_system(self, arg: str) -> None:
        if not self.model.supports_system:
            self.ui.error(f"{self.model.name} has no system role, so /system is not available.")
            return
        if not arg:
            system = self.conv.system
            if system is None and self.model.default_system is not None:
                self.ui.note(f"System prompt (the model's default): {self.model.default_system}")
            elif system:
                self.ui.note(f"System prompt: {system}")
            else:
                self.ui.note("No system prompt. Set one with /system TEXT.")
            return
        self.conv.system = "" if arg.lower() in ("none", "off") else arg
        self.ui.note("System prompt set." if self.conv.system else "No system prompt.")

    def cmd_set(self, arg: str) -> None:
        try:
            key, parsed = parse_setting(arg)
            self.config = dataclasses.replace(self.config, **{key: parsed})
        except UsageError as exc:
            self.ui.error(str(exc))
            return
        self.ui.note(f"{key} = {'none' if parsed is None else parsed}")

    def cmd_show(self, arg: str) -> None:
        try:
            used: int | None = self.model.count_tokens([*self.messages, Message("user", "")])
        except (LLMChatError, ValueError):
            used = None
        self.ui.settings(self.model.name, self.model.info, self.config, used)
        self.ui.note(f"Conversation id: {self.conv.id}")

    def cmd_new(self, arg: str) -> None:
        import uuid

        self.conv.clear()
        self.conv.id = uuid.uuid4().hex
        self.image, self.retrying = None, False
        self.ui.note(f"New conversation {self.conv.id}.")
        prefix = self.model.info.extra.get("prefix")
        self.ui.note(f"P-tuning prefix: {prefix}" if prefix else "P-tuning prefix: none")

    def cmd_prefix(self, arg: str) -> None:
        set_prefix = getattr(self.model, "set_prefix", None)
        if set_prefix is None:
            self.ui.error(f"{self.model.name} does not take P-tuning prefixes.")
            return
        if not arg:
            prefix = self.model.info.extra.get("prefix")
            self.ui.note(f"P-tuning prefix: {prefix}" if prefix else "No P-tuning prefix.")
            return
        try:
            set_prefix(None if arg.lower() == "off" else arg)
        except LLMChatError as exc:
            self.ui.error(str(exc))
            return
        prefix = self.model.info.extra.get("prefix")
        self.ui.note(f"P-tuning prefix: {prefix} (history kept)" if prefix
                     else "P-tuning prefix off (history kept).")

    def cmd_stats(self, arg: str) -> None:
        self.show_stats = not self.show_stats
        self.ui.note(f"Per-reply stats {'on' if self.show_stats else 'off'}.")

    def cmd_save(self, arg: str) -> None:
        text = json.dumps(chatfile.document(self.model.name, self.messages), ensure_ascii=False,
                          indent=2) + "\n"
        try:
            if not arg:
                path = chatfile.save_new(data_dir() / "chats", text)
            else:
                path = Path(arg).expanduser()
                if chatfile.existing_mode(path) is not None and not self.confirm(
                        f"{path} exists. Replace it? [y/N] "):
                    self.ui.note("Not saved.")
                    return
                chatfile.write_file(path, text)
        except OSError as exc:
            where = arg or str(data_dir() / "chats")
            self.ui.error(f"Cannot save to {where}: {exc.strerror or exc} (nothing was "
                          "written; an existing file is unchanged)")
            return
        except LLMChatError as exc:
            self.ui.error(f"Cannot save: {exc}")
            return
        self.ui.note(f"Saved {len(self.messages)} messages to {path}")

    def confirm(self, question: str) -> bool:
        try:
            return self.read(question).strip().lower() in ("y", "yes")
        except (EOFError, KeyboardInterrupt):
            return False

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.ui.error("Usage: /load FILE")
            return
        try:
            msgs = chatfile.load_conversation(Path(arg).expanduser())
            if msgs and msgs[0].role == "system" and not self.model.supports_system:
                raise UsageError(f"{arg} has a system prompt and {self.model.name} has no "
                                 "system role")
            if any(m.image for m in msgs) and not self.model.supports_images:
                raise ImageError(f"{arg} has images and {self.model.name} does not take images")
        except LLMChatError as exc:
            self.ui.error(f"Cannot load: {exc}")
            return
        except Exception as exc:  # no /load failure may end the session
            self.ui.error(f"Cannot load {arg}: {type(exc).__name__}: {exc}".splitlines()[0])
            return
        self.conv.load(msgs)
        self.image, self.retrying = None, False
        self.ui.note(f"Loaded {sum(m.role == 'user' for m in msgs)} turns from {arg}")

    def cmd_copy(self, arg: str) -> None:
        if not self.messages or self.messages[-1].role != "assistant":
            self.ui.note("Nothing to copy yet.")
            return
        text = self.messages[-1].content
        tool, failed = copy_with_tool(text)
        if tool is not None:
            self.ui.note(f"Copied the last reply ({len(text)} characters) with {tool}.")
            return
        # No tool (SSH, tmux, a bare console) or it failed: ask the terminal itself (OSC 52).
        if self.ui.copy_osc52(text):
            self.ui.note(f"Sent the last reply ({len(text)} characters) to the terminal's "
                         "clipboard (OSC 52; some terminals need it enabled).")
            return
        self.ui.error(failed or "No clipboard tool found (pbcopy, wl-copy, xclip, xsel or "
                      "clip.exe) and the output is not a terminal; nothing was copied.")

    def cmd_image(self, arg: str) -> None:
        if not self.model.supports_images:
            self.ui.error("This model does not support images")
            return
        if not arg:
            self.ui.note(f"Next message's image: {self.image}" if self.image
                         else "Usage: /image PATH (attached to your next message)")
            return
        path = Path(arg).expanduser()
        notes: list[Any] = []
        try:
            from llmchat.images import check_image

            notes = list(check_image(path).notes)
        except LLMChatError as exc:
            self.ui.error(f"Cannot use this image: {exc}")
            return
        self.image = str(path.resolve())
        self.ui.note(f"Image attached to your next message: {self.image}")
        for note in notes:
            self.ui.note(str(note))


COMMANDS: dict[str, Command] = {
    "/help": Command(Repl.cmd_help, "/help", "this list"),
    "/clear": Command(Repl.cmd_clear, "/clear", "forget the conversation, keep the system prompt"),
    "/history": Command(Repl.cmd_history, "/history", "show the conversation"),
    "/undo": Command(Repl.cmd_undo, "/undo", "drop the last question and answer"),
    "/regen": Command(Repl.cmd_regen, "/regen", "answer the last question again"),
    "/retry": Command(Repl.cmd_retry, "/retry", "edit the last question and ask again"),
    "/system": Command(Repl.cmd_system, "/system [TEXT]", "show or set the system prompt"),
    "/set": Command(Repl.cmd_set, "/set KEY VALUE", "change a setting: " + ", ".join(SETTINGS)),
    "/prefix": Command(Repl.cmd_prefix, "/prefix DIR|off",
                       "load, switch or drop a P-tuning prefix"),
    "/show": Command(Repl.cmd_show, "/show", "model, settings and context used"),
    "/new": Command(Repl.cmd_new, "/new", "start a new conversation (a new log id)"),
    "/stats": Command(Repl.cmd_stats, "/stats", "toggle speed and token figures after replies"),
    "/save": Command(Repl.cmd_save, "/save [FILE]", "save the conversation as JSON"),
    "/load": Command(Repl.cmd_load, "/load FILE", "continue a saved conversation"),
    "/copy": Command(Repl.cmd_copy, "/copy", "copy the last reply to the clipboard"),
    "/image": Command(Repl.cmd_image, "/image PATH", "attach an image to the next message"),
    "/exit": Command(Repl.cmd_exit, "/exit", "quit (also /bye, /quit, Ctrl-D)"),
    "/bye": Command(Repl.cmd_exit, "/bye", "quit"),
    "/quit": Command(Repl.cmd_exit, "/quit", "quit"),
}


def _default_read(history_file: Path | None) -> Read:
    if sys.stdin.isatty() and sys.stdout.isatty():
        return PromptReader(history_file, {k: c.help for k, c in COMMANDS.items()},
                            list(SETTINGS))
    return input  # piped input (forced REPL): no line editing to offer


def run_repl(model: ChatModel, config: GenerationConfig, *, system: str | None = None,
             image: str | os.PathLike[str] | None = None, plain: bool = False,
             stats: bool = False, read: Read | None = None, console: Console | None = None,
             history_file: Path | None = None,
             setup: Callable[[Conversation], None] | None = None) -> int:
    """Run the interactive chat until the user quits; returns the exit status (0).

    Args:
        system: initial system prompt (models with a system role).
        image: image for the first message (VisualGLM).
        read: ``input``-like reader (tests); default prompt_toolkit on a terminal.
        history_file: input history; default ``data_dir()/history``.
    """
    ui = ChatUI(console, plain=plain)
    if read is None:
        read = _default_read(history_file or data_dir() / "history")
    repl = Repl(model, config, ui, read, stats=stats)
    if setup is not None:
        setup(repl.conv)
        repl.setup = setup
    ui.header(model.name, model.info, config.max_length)
    if system:
        repl.cmd_system(system)
    elif system == "" and model.supports_system:
        repl.conv.system = ""
    if image is not None:
        repl.cmd_image(os.fspath(image))
    return repl.run()
