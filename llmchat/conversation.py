"""One conversation: the system prompt, the recorded turns, the attached image, and one turn.

Every front end (``llmchat ask``, piped ``chat``, ``image``, the REPL) goes through
``Conversation.send``: it builds the messages, fits them to the context budget (deciding what is
*sent*; the recorded conversation keeps every turn), starts the model's ``Reply`` and records
the turn only when that reply has finished. A reply stopped early leaves no trace.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmchat.errors import ContextOverflowError
from llmchat.types import GenerationConfig, Message, Reply

if TYPE_CHECKING:
    from llmchat.models.base import ChatModel

# Room kept for the reply when old turns are left out to fit the context budget.
REPLY_RESERVE = 256


@dataclass
class Conversation:
    """``turns`` holds user/assistant messages only; ``system`` is kept apart (None: the model's
    own default, which for Qwen is upstream's "You are a helpful assistant.")."""

    model: ChatModel
    config: GenerationConfig
    system: str | None = None
    turns: list[Message] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _turn_cost: dict[tuple[Message, Message], int] = field(default_factory=dict, repr=False)

    # -- the recorded conversation -----------------------------------------------------------
    @property
    def messages(self) -> list[Message]:
        """The whole conversation as messages (system first, when set)."""
        head = [Message("system", self.system)] if self.system is not None else []
        return [*head, *self.turns]

    def load(self, messages: Sequence[Message]) -> None:
        """Replace the conversation (a ``/load``ed file: system first, then pairs)."""
        msgs = list(messages)
        self.system = msgs.pop(0).content if msgs and msgs[0].role == "system" else None
        self.turns = msgs

    def last_turn(self) -> tuple[Message, Message] | None:
        if len(self.turns) >= 2 and self.turns[-1].role == "assistant":
            return self.turns[-2], self.turns[-1]
        return None

    def undo(self) -> Message | None:
        """Drop the last turn; return its question."""
        last = self.last_turn()
        if last is not None:
            del self.turns[-2:]
        return last[0] if last else None

    def clear(self) -> None:
        self.turns = []

    # -- one turn ---------------------------------------------------------------------------
    def send(self, question: str, *, image: str | None = None,
             replace_last: bool = False) -> Reply:
        """Start the reply to ``question``; iterate it to stream. When it finishes, the turn is
        recorded (replacing the last turn with ``replace_last``: /regen, /retry)."""
        base = self.turns[:-2] if replace_last and self.last_turn() else list(self.turns)
        question_msg = Message("user", question, image)
        sent, dropped = self.fit(base, question_msg)
        reply = self.model.generate(sent, self.config)
        reply.dropped_turns = dropped

        def record(r: Reply) -> None:
            self.turns = [*base, question_msg, Message("assistant", r.text)]

        return reply.on_done(record)

    def fit(self, turns: list[Message], question: Message) -> tuple[list[Message], int]:
        """The messages to send: the system prompt, as many of the newest ``turns`` as leave
        room for a reply, and ``question``. Returns them and the number of turns left out.

        Linear in the conversation: each turn's token cost is counted once (and remembered);
        the cut found from those costs is then checked with exact counts of the sent prompt,
        which templates with round numbers can shift by a few tokens.
        """
        model, config = self.model, self.config
        head = [Message("system", self.system)] if self.system is not None else []
        pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
        budget = model.context_budget(config)
        reserve = min(config.max_new_tokens or REPLY_RESERVE, REPLY_RESERVE, budget // 2)

        def build(start: int) -> list[Message]:
            msgs = [*(m for pair in pairs[start:] for m in pair), question]
            if start and not any(m.image for m in msgs):
                carried = [m.image for pair in pairs[:start] for m in pair if m.image]
                if carried:  # the conversation's image goes with the first message sent
                    msgs[0] = Message("user", msgs[0].content, carried[-1])
            return [*head, *msgs]

        def fits(start: int) -> bool:
            return model.count_tokens(build(start)) + reserve <= budget

        base = model.count_tokens([*head, question])
        costs = [self._cost(pair, head, question, base) for pair in pairs]
        # The smallest start whose estimated prompt fits, then corrected with exact counts.
        total, start = base + sum(costs), 0
        while start < len(pairs) and total + reserve > budget:
            total -= costs[start]
            start += 1
        while start > 0 and fits(start - 1):
            start -= 1
        while start < len(pairs) and not fits(start):
            start += 1
        sent = build(start)
        if start == len(pairs) and not fits(start):
            n = model.count_tokens(sent)
            if n >= budget:
                raise ContextOverflowError(
                    f"the message is {n} tokens and does not fit the context budget of "
                    f"{budget} tokens (raise --max-length or shorten it)"
                )
        return sent, start

    def _cost(self, pair: tuple[Message, Message], head: list[Message], question: Message,
              base: int) -> int:
        cost = self._turn_cost.get(pair)
        if cost is None:
            cost = self.model.count_tokens([*head, *pair, question]) - base
            if len(self._turn_cost) > 100_000:
                self._turn_cost.clear()
            self._turn_cost[pair] = cost
        return cost
