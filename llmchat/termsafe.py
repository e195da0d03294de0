"""Text from a model or a checkpoint made safe to show on a terminal, and the OSC 52 clipboard.

``visible(text)`` shows every C0 control character except newline and tab, DEL, and every C1
control character (U+0080-U+009F) as a Python-style escape of four visible characters:
ESC becomes ``\\x1b``, BEL ``\\x07``, CSI ``\\x9b``. A CR LF pair is shown as a plain newline.
So a reply or a config.json value holding ``ESC ] 2 ; EVIL ESC \\`` cannot retitle the terminal,
move the cursor or hide text: the escape is printed as text instead. Where the output is not a
terminal the REPL leaves reply bytes as they are (see ``llmchat.ui.PlainStream``).
"""

from __future__ import annotations

import base64
import os

_KEEP = {0x09, 0x0A}  # tab, newline
_TABLE = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in _KEEP}


def visible(text: str) -> str:
    """``text`` with C0/C1 control characters (not newline or tab) shown as ``\\xNN``."""
    if text.isprintable():  # the common case: nothing to do (newline and tab are not printable)
        return text
    return text.replace("\r\n", "\n").translate(_TABLE)


def osc52(text: str, *, tmux: bool | None = None) -> str:
    """The OSC 52 sequence that puts ``text`` on the terminal's clipboard.

    Inside tmux (``$TMUX`` set, unless ``tmux`` says otherwise) it is wrapped in tmux's DCS
    passthrough, every ESC inside doubled, so it reaches the outer terminal.
    """
    payload = base64.b64encode(text.encode("utf-8")).decode("ascii")
    seq = f"\x1b]52;c;{payload}\x07"
    if tmux is None:
        tmux = bool(os.environ.get("TMUX"))
    if tmux:
        seq = "\x1bPtmux;" + seq.replace("\x1b", "\x1b\x1b") + "\x1b\\"
    return seq
