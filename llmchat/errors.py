"""Errors a user can act on. The CLI prints ``str(exc)`` on one line and exits non-zero."""

from __future__ import annotations


class LLMChatError(Exception):
    """Base class: every expected failure (bad input, bad checkpoint) derives from it."""


class UsageError(LLMChatError):
    """Invalid option values or arguments (exit status 2)."""


class UnknownModelError(UsageError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown model"


class CheckpointError(LLMChatError):
    """The checkpoint directory is missing, incomplete, corrupt or of an unsupported kind."""


class UnsupportedCheckpointError(CheckpointError):
    """The checkpoint is readable but uses settings llmchat does not implement."""


class TokenizerError(CheckpointError):
    """The tokenizer file is missing or unreadable."""


class QuantizationError(LLMChatError):
    """A quantization mode cannot be used with this checkpoint, device or dtype."""


class DeviceError(LLMChatError):
    """The requested device or dtype is not available."""


class ContextOverflowError(LLMChatError):
    """The prompt alone does not fit in the context budget."""


class ImageError(LLMChatError):
    """An image cannot be read, or the model does not take images."""
