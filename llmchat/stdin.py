"""User text from stdin by one rule for every model: UTF-8 (byte order marks honoured), a size
cap, NUL refused; a piped chat is read one line at a time without holding more than one line.
Failures are ``UsageError``s naming where the input breaks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from llmchat.errors import UsageError

MAX_INPUT_BYTES = 4 << 20  # one question (piped stdin, one line of a piped chat)


def decode_input(data: bytes, what: str, *, utf16: bool = True) -> str:
    """Bytes from stdin as text by one rule for every model: UTF-8 (a UTF-8 byte order mark,
    and with ``utf16`` a UTF-16 one, is honoured); anything else is a ``UsageError`` naming
    where it breaks."""
    boms = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
    for bom, codec in boms if utf16 else boms[:1]:
        if data.startswith(bom):
            data, enc = data[len(bom):], codec
            break
    else:
        enc = "utf-8"
    try:
        text = data.decode(enc)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} is not valid {enc.upper()} text (byte {exc.start})") from None
    if "\x00" in text:
        raise UsageError(f"{what} contains NUL characters (binary data, or UTF-16 without a "
                         "byte order mark?)")
    return text


def read_stdin() -> str | None:
    if sys.stdin is None or sys.stdin.isatty():
        return None
    data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(f"stdin is over {MAX_INPUT_BYTES >> 20} MiB")
    return decode_input(data, "stdin")


def stdin_lines() -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the line end), None for a line over ``MAX_INPUT_BYTES``
    (its rest is skipped), without ever holding more than one such line."""
    n, buf = 0, sys.stdin.buffer
    while True:
        raw = buf.readline(MAX_INPUT_BYTES + 1)
        if not raw:
            return
        n += 1
        if len(raw) > MAX_INPUT_BYTES and not raw.endswith(b"\n"):
            while (more := buf.readline(MAX_INPUT_BYTES)) and not more.endswith(b"\n"):
                pass
            yield n, None
            continue
        yield n, raw.rstrip(b"\r\n")
