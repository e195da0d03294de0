"""Reading files from a directory llmchat did not write (a downloaded checkpoint, a chat file).

Two rules, used everywhere such files are read:

* ``read_json`` reads only a regular file (a symlink to one is fine; ``/dev/zero``, FIFOs and
  directories are refused before reading), refuses it unread when it is over ``max_bytes``, and
  turns every parse failure, nesting too deep included, into one error line.
* ``inside`` accepts a file name listed in the directory's own metadata (an index's shard names)
  only as a relative path without ``..``: it can never leave the directory.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from llmchat.errors import CheckpointError, LLMChatError

__all__ = ["MAX_CONFIG_BYTES", "MAX_INDEX_BYTES", "inside", "read_json"]

MAX_CONFIG_BYTES = 4 << 20  # config.json, tokenizer_config.json: a few KiB in practice
MAX_INDEX_BYTES = 64 << 20  # *.index.json: ~100 KiB for the 6B/7B models


def read_json(
    path: str | os.PathLike[str],
    *,
    max_bytes: int,
    what: str,
    error: type[LLMChatError] = CheckpointError,
) -> Any:
    """The parsed JSON of ``path`` (``what`` names it in errors, e.g. ``"config.json"``)."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"cannot read {what} ({path}): {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"cannot read {what} ({path}): not a regular file")
        if st.st_size > max_bytes:
            raise error(
                f"cannot read {what} ({path}): {st.st_size:,} bytes, over the "
                f"{max_bytes:,} bytes llmchat reads"
            )
        chunks: list[bytes] = []
        left = max_bytes + 1  # a file growing while read is caught too
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise error(f"cannot read {what} ({path}): {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise error(f"cannot read {what} ({path}): over the {max_bytes:,} bytes llmchat reads")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"cannot read {what} ({path}): not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(
            f"cannot read {what} ({path}): it is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    except RecursionError:
        raise error(f"cannot read {what} ({path}): JSON nested too deeply") from None


def inside(directory: Path, name: Any, *, what: str, error: type[LLMChatError] = CheckpointError,
           ) -> Path:
    """``directory / name`` for a relative ``name`` with no ``..`` component, else ``error``.

    Checked on the name, not on the resolved path: files that are symlinks (as in the Hugging
    Face cache, whose snapshot files point into ``../../blobs``) stay fine.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{what}: {name!r} is not a file name")
    posix, win = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or win.is_absolute() or win.drive or name.startswith(("/", "\\")):
        raise error(
            f"{what}: {name!r} is an absolute path; llmchat reads only files inside {directory}"
        )
    if ".." in posix.parts or ".." in win.parts:
        raise error(f"{what}: {name!r} leaves the model directory ('..'); llmchat refuses it")
    return directory / name
