"""Copying text with the platform's clipboard tool (``/copy``; the REPL falls back to OSC 52)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def clipboard_command() -> list[str] | None:
    """A clipboard writer that exists here, or None."""
    cands: list[list[str]] = [["pbcopy"]] if sys.platform == "darwin" else []
    if os.environ.get("WAYLAND_DISPLAY"):
        cands.append(["wl-copy"])
    if os.environ.get("DISPLAY"):
        cands += [["xclip", "-selection", "clipboard"], ["xsel", "--clipboard", "--input"]]
    cands += [["clip.exe"], ["clip"]] if sys.platform in ("win32", "cygwin") else [["clip.exe"]]
    return next((c for c in cands if shutil.which(c[0])), None)


def copy_with_tool(text: str) -> tuple[str | None, str]:
    """Copy ``text`` with a clipboard tool found here: (the tool's name, "") when it worked,
    else (None, why the tool failed, or "" when there is none)."""
    cmd = clipboard_command()
    if cmd is None:
        return None, ""
    data = text.encode("utf-16" if cmd[0].startswith("clip") else "utf-8")
    try:
        subprocess.run(cmd, input=data, check=True, timeout=5, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{cmd[0]} failed: {exc}"
    return cmd[0], ""
