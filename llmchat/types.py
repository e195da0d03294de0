"""Plain data shared by every layer: messages, generation settings, per-reply statistics."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from llmchat.errors import UsageError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    image: str | None = None  # path of an image attached to this user turn (VisualGLM)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UsageError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise UsageError("message content must be text")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.image is not None:
            d["image"] = self.image
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Message:
        if not isinstance(d, dict) or "role" not in d or "content" not in d:
            raise UsageError("each message needs a 'role' and a 'content'")
        image = d.get("image")
        return cls(d["role"], d["content"], str(image) if image is not None else None)


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings with upstream (transformers ``generate``) semantics.

    ``max_length`` is the total budget (prompt + reply) as in upstream ``chat()``;
    ``max_new_tokens`` optionally caps the reply on top of it. ``temperature == 0`` means greedy.
    ``top_k == 0`` and ``top_p == 1`` disable those filters. ``min_length`` (total tokens, as in
    transformers) forbids the end token until the sequence is that long (VisualGLM uses 100).
    """

    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_length: int = 2048
    max_new_tokens: int | None = None
    min_length: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> UsageError:
            return UsageError(msg)

        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise bad(f"{name} must be a finite number, got {v!r}")
        for name in ("top_k", "max_length", "min_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(f"{name} must be an integer, got {v!r}")
        if self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_length < 2:
            raise bad(f"max_length must be >= 2, got {self.max_length}")
        if self.min_length < 0:
            raise bad(f"min_length must be >= 0, got {self.min_length}")
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise bad(f"seed must be an integer, got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad(f"seed must be between 0 and 2**63 - 1, got {self.seed}")

    def with_(self, **changes: Any) -> GenerationConfig:
        """A copy with ``changes`` applied (``None`` values are ignored), validated."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



@dataclass
class ReplyStats:
    """Figures for the last reply: what ``--verbose``, ``--json`` and ``/stats`` print."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # time to first token (prefill + first sample)
    decode_s: float = 0.0  # time spent after the first token
    total_s: float = 0.0
    finish_reason: str = ""  # "stop" | "length" | "interrupted"
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused, not recomputed
    peak_memory_bytes: int | None = None  # CUDA only
    decode_path: str = "eager"  # "eager" | "graph" (the captured CUDA decode step)

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class Reply:
    """What one generation returns: iterate it (once) for the text deltas as they stream.

    When the stream ends, ``text`` is the finished reply (post-processed as upstream does),
    ``stats`` its figures and ``done`` is True; callbacks given to ``on_done`` run then, so a
    turn is recorded only once its reply has finished (as simonw/llm's ``Response`` does). A
    stream stopped early (Ctrl-C, a client that went away) leaves ``done`` False.
    """

    def __init__(self, deltas: Callable[[Reply], Iterator[str]], stats: ReplyStats | None = None,
                 *, dropped_turns: int = 0) -> None:
        self.stats = stats or ReplyStats(finish_reason="interrupted")
        self.dropped_turns = dropped_turns  # oldest turns left out to fit the context budget
        # True: also yield "" for a token that adds no text yet, so a consumer (the server) can
        # stop the generation within one token
        self.every_token = False
        self.done = False
        self._parts: list[str] = []
        self._text: str | None = None
        self._callbacks: list[Callable[[Reply], None]] = []
        self._deltas = deltas(self)

    def __iter__(self) -> Iterator[str]:
        for delta in self._deltas:
            self._parts.append(delta)
            yield delta
        if not self.done:
            self.done = True
            for fn in self._callbacks:
                fn(self)

    def finish(self, text: str) -> None:
        """Called by the producer with the final text, before the stream ends."""
        self._text = text

    @property
    def text(self) -> str:
        return self._text if self._text is not None else "".join(self._parts)

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason

    def on_done(self, fn: Callable[[Reply], None]) -> Reply:
        self._callbacks.append(fn)
        return self

    def consume(self) -> Reply:
        """Run the stream to its end (non-streaming use)."""
        for _ in self:
            pass
        return self

    def close(self) -> None:
        """Stop the generation now (it releases the model at once)."""
        close = getattr(self._deltas, "close", None)
        if close is not None:
            close()


def split_turns(
    messages: list[Message] | tuple[Message, ...],
) -> tuple[str | None, list[tuple[str, str]], str]:
    """Split a conversation into (system prompt, [(question, answer), ...], new question).

    The conversation is an optional system message, alternating user/assistant messages, and a
    final user message; anything else is a ``UsageError``.
    """
    msgs = list(messages)
    system = None
    if msgs and msgs[0].role == "system":
        system = msgs.pop(0).content
    if not msgs or msgs[-1].role != "user":
        raise UsageError("the conversation must end with a user message")
    history: list[tuple[str, str]] = []
    body = msgs[:-1]
    if len(body) % 2:
        raise UsageError("the conversation must alternate user and assistant messages")
    for q, r in zip(body[::2], body[1::2], strict=True):
        if q.role != "user" or r.role != "assistant":
            raise UsageError("the conversation must alternate user and assistant messages")
        history.append((q.content, r.content))
    return system, history, msgs[-1].content


QUANT_ALIASES = {"16": 16, "fp16": 16, "bf16": 16, "none": 16, "8": 8, "int8": 8, "4": 4, "int4": 4}


def parse_quant(value: int | str) -> int:
    """``--quant`` value → 16, 8 or 4 (aliases fp16, int8, int4)."""
    key = str(value).strip().lower()
    if key not in QUANT_ALIASES:
        raise UsageError(f"invalid --quant {value!r}; use 16, 8 or 4 (fp16, int8, int4)")
    return QUANT_ALIASES[key]


# /set KEY VALUE (the REPL): the parser for each setting; "none" clears the optional ones.
SETTINGS: dict[str, type] = {
    "temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float,
    "max_new_tokens": int, "max_length": int, "min_length": int, "seed": int,
}
OPTIONAL = {"max_new_tokens", "seed"}


def parse_setting(arg: str) -> tuple[str, Any]:
    """``"KEY VALUE"`` -> (the ``GenerationConfig`` field, its typed value), or a ``UsageError``
    saying what is wrong. Only ``int()``/``float()``: typed parsing, never eval."""
    parts = arg.split(maxsplit=1)
    key, value = (parts[0].lower(), parts[1].strip()) if len(parts) == 2 else ("", "")
    if not value:
        raise UsageError(f"Usage: /set KEY VALUE, with KEY one of {', '.join(SETTINGS)}.")
    if key not in SETTINGS:
        raise UsageError(f"Unknown setting '{key}'; settable: {', '.join(SETTINGS)}.")
    kind = SETTINGS[key]
    if key in OPTIONAL and value.lower() in ("none", "off", "random"):
        return key, None
    try:
        return key, kind(value)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise UsageError(f"{key} needs {noun}, got {value!r}.") from None
