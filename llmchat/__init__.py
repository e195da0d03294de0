"""llmchat: chat locally with ChatGLM-6B, ChatGLM2-6B, VisualGLM-6B and Qwen-7B-Chat.

Public API (torch is imported lazily, so ``import llmchat`` is cheap)::

    from llmchat import load, Message
    model = load("chatglm2-6b", quant=4)
    print(model.chat([Message("user", "你好")]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmchat.types import GenerationConfig, Message, ReplyStats

__version__ = "0.1.0"
__all__ = ["GenerationConfig", "Message", "ReplyStats", "load", "__version__"]

if TYPE_CHECKING:
    from llmchat.models.base import ChatModel


def load(name_or_path: str, **kwargs: Any) -> ChatModel:
    """Load a model by preset name or checkpoint directory (see ``llmchat.loader.load``)."""
    from llmchat.loader import load as _load

    return _load(name_or_path, **kwargs)
