"""Where llmchat keeps its own files (input history, saved chats, the conversation log)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Where history and saved chats live: ``$LLMCHAT_HOME``, else the platform's data dir."""
    if home := os.environ.get("LLMCHAT_HOME"):
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("llmchat", appauthor=False))
