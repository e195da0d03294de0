"""Conversation files (``/save``, ``/load``): JSON written atomically and read defensively.

Writing never damages what is there: only regular files are written (a device, FIFO,
directory or symbolic link at the path is refused), an existing file keeps its permissions
(a new one is private, 0600), the text goes to a temporary file that replaces the target only
once complete, and ``exclusive`` writes never replace anything (default names: two REPLs saving
in the same second get two files). Reading goes through ``safeio.read_json``: regular files
only, a size cap, and every parse failure (nesting too deep included) as one error.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from llmchat.errors import LLMChatError, UsageError
from llmchat.types import Message

FORMAT = "llmchat.conversation"
MAX_CHAT_BYTES = 64 << 20


class ChatFileError(LLMChatError):
    """A conversation file cannot be written or read."""


def existing_mode(path: Path) -> int | None:
    """The permission bits of the regular file at ``path``, None when there is none;
    ``ChatFileError`` for anything that is not a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ChatFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ChatFileError(f"{path} is a symbolic link; llmchat does not write through links")
    if not stat.S_ISREG(st.st_mode):
        raise ChatFileError(f"{path} is not a regular file (a device, FIFO or directory); "
                            "nothing was written")
    return stat.S_IMODE(st.st_mode)


def write_file(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write ``text`` to ``path`` all or nothing (see the module docstring)."""
    mode = existing_mode(path)
    if exclusive and mode is not None:
        raise FileExistsError(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o600 if mode is None else mode)
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if the name was taken meanwhile: never replaces
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def document(model: str, messages: list[Message], **extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "version": 1, "model": model,
            "saved_at": datetime.now().isoformat(timespec="seconds"), **extra,
            "messages": [m.to_dict() for m in messages]}


def save_new(directory: Path, text: str) -> Path:
    """Write ``text`` under a fresh default name in ``directory`` (never an existing file)."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"chat-{datetime.now():%Y%m%d-%H%M%S}"
    for n in range(1, 1000):
        path = directory / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
        try:
            write_file(path, text, exclusive=True)
            return path
        except FileExistsError:
            continue
    raise ChatFileError(f"no free file name for {stem} in {directory}")


def load_conversation(path: Path) -> list[Message]:
    """Messages from a ``/save`` file, validated (system first, then user/assistant pairs)."""
    from llmchat.safeio import read_json

    if not path.exists():
        raise UsageError(f"{path} does not exist")
    data = read_json(path, max_bytes=MAX_CHAT_BYTES, what="conversation file",
                     error=ChatFileError)
    raw = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(raw, list):
        raise UsageError(f"{path} is not an llmchat conversation (no 'messages' list)")
    msgs = [Message.from_dict(d) for d in raw]
    body = msgs[1:] if msgs and msgs[0].role == "system" else msgs
    for i, m in enumerate(body):
        if m.role != ("user", "assistant")[i % 2]:
            raise UsageError(f"{path}: message {i + 1} should be a "
                             f"{('user', 'assistant')[i % 2]} message, not {m.role}")
        if m.image and not Path(m.image).is_file():
            raise UsageError(f"{path}: image {m.image} not found")
    if len(body) % 2:
        raise UsageError(f"{path}: the last question has no answer")
    return msgs
