"""Test doubles: a scripted ``ChatModel`` that records what it was asked."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

from llmchat.models.base import ChatModel, LoadInfo
from llmchat.types import GenerationConfig, Message, Reply, ReplyStats


class FakeChatModel(ChatModel):
    """Replies come from a queue of delta lists; each call's messages and config are recorded.

    A delta that is an exception instance is raised from inside the stream (e.g.
    ``KeyboardInterrupt()`` to simulate Ctrl-C mid-reply). With an empty queue the reply is
    ``default``. ``count_tokens`` is the base class's (characters), so ``max_length`` drives fit().
    """

    def __init__(self, *, name: str = "fake-6b", supports_system: bool = True,
                 supports_images: bool = False, delay: float = 0.0,
                 default: Sequence[str] = ("OK",),
                 defaults: GenerationConfig | None = None) -> None:
        super().__init__(name, defaults=defaults or GenerationConfig(),
                         info=LoadInfo(path="/models/fake", device="cpu", dtype="float32",
                                       quant=4),
                         supports_system=supports_system, supports_images=supports_images)
        self.delay = delay  # seconds slept before each delta
        self.default = list(default)
        self.queue: deque[list[str | BaseException]] = deque()
        self.calls: list[tuple[list[Message], GenerationConfig]] = []
        self.completed = 0  # streams that ran to the end

    def enqueue(self, *replies: Iterable[str | BaseException] | str) -> FakeChatModel:
        for r in replies:
            self.queue.append([r] if isinstance(r, str) else list(r))
        return self

    def generate(self, messages: Sequence[Message], config: GenerationConfig) -> Reply:
        self.calls.append((list(messages), config))
        deltas = self.queue.popleft() if self.queue else list(self.default)
        stats = ReplyStats(prompt_tokens=self.count_tokens(messages), finish_reason="stop",
                           ttft_s=0.25, decode_s=0.5, total_s=0.75)
        return Reply(lambda reply: self._stream(deltas, stats), stats)

    def _stream(self, deltas: list[str | BaseException], stats: ReplyStats) -> Iterator[str]:
        for d in deltas:
            if self.delay:
                time.sleep(self.delay)
            if isinstance(d, BaseException):
                raise d
            stats.completion_tokens += 1
            yield d
        self.completed += 1


def pyte_screen(raw: str, width: int, rows: int = 400) -> list[str]:
    """What a terminal of ``width`` columns shows after ``raw`` (trailing blank lines cut)."""
    import pyte

    sc = pyte.Screen(width, rows)
    pyte.Stream(sc).feed(raw.replace("\n", "\r\n"))
    lines = [line.rstrip() for line in sc.display]
    while lines and not lines[-1]:
        lines.pop()
    return lines
