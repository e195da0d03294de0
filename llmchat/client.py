"""``llmchat ask/chat --api-base URL``: a ``ChatModel`` that talks to an OpenAI-compatible server
(``llmchat serve``, vLLM, ...) through the official ``openai`` client, so the REPL, piped chat
and ``ask --json`` work unchanged against a remote model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from llmchat.errors import LLMChatError, UsageError
from llmchat.models.base import ChatModel, LoadInfo
from llmchat.types import GenerationConfig, Message, Reply, ReplyStats

CLIENT_EXTRA_HINT = "--api-base needs the openai client: pip install openai"
REMOTE_BUDGET = 1 << 30  # the server fits the conversation to its own context


class RemoteChatModel(ChatModel):
    def __init__(self, api_base: str, *, api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0) -> None:
        try:
            import openai
        except ImportError:
            raise UsageError(CLIENT_EXTRA_HINT) from None
        self._openai = openai
        self.client = openai.OpenAI(base_url=api_base, api_key=api_key or "unused",
                                    timeout=timeout, max_retries=2)
        name = model
        if name is None:
            try:
                data = self.client.models.list().data
            except openai.OpenAIError as exc:
                raise LLMChatError(f"cannot reach {api_base}: {_message(exc)}") from None
            if not data:
                raise LLMChatError(f"{api_base} serves no model")
            name = data[0].id
        super().__init__(name, defaults=GenerationConfig(max_length=REMOTE_BUDGET),
                         info=LoadInfo(path=api_base, device="remote", dtype="-"),
                         supports_system=True)

    def context_budget(self, config: GenerationConfig) -> int:
        return REMOTE_BUDGET

    def request_args(self, config: GenerationConfig) -> dict[str, Any]:
        """The settings that differ from the plain defaults (the server's own apply otherwise)."""
        base = GenerationConfig(max_length=REMOTE_BUDGET)
        args: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, key, target in (("temperature", "temperature", args), ("top_p", "top_p", args),
                                  ("seed", "seed", args), ("max_new_tokens", "max_tokens", args),
                                  ("top_k", "top_k", extra),
                                  ("repetition_penalty", "repetition_penalty", extra)):
            value = getattr(config, name)
            if value != getattr(base, name) and value is not None:
                target[key] = value
        if extra:
            args["extra_body"] = extra
        return args

    def generate(self, messages: Sequence[Message], config: GenerationConfig) -> Reply:
        if any(m.image for m in messages):
            raise UsageError("images are not supported with --api-base")
        stats = ReplyStats(finish_reason="interrupted")
        return Reply(lambda reply: self._stream(reply, list(messages), config), stats)

    def _stream(self, reply: Reply, messages: list[Message],
                config: GenerationConfig) -> Iterator[str]:
        openai = self._openai
        try:
            stream = self.client.chat.completions.create(
                model=self.name, messages=[m.to_dict() for m in messages], stream=True,
                stream_options={"include_usage": True}, **self.request_args(config),
            )
        except openai.OpenAIError as exc:
            raise LLMChatError(f"the server refused the request: {_message(exc)}") from None
        parts: list[str] = []
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    reply.stats.prompt_tokens = chunk.usage.prompt_tokens
                    reply.stats.completion_tokens = chunk.usage.completion_tokens
                    details = getattr(chunk.usage, "prompt_tokens_details", None)
                    reply.stats.cached_tokens = getattr(details, "cached_tokens", None) or 0
                for choice in chunk.choices:
                    if choice.finish_reason:
                        reply.stats.finish_reason = choice.finish_reason
                    if choice.delta.content:
                        parts.append(choice.delta.content)
                        yield choice.delta.content
        except openai.OpenAIError as exc:
            raise LLMChatError(f"the server failed: {_message(exc)}") from None
        finally:
            stream.close()
        reply.finish("".join(parts))


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return " ".join(str(exc).split())
