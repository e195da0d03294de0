"""Conversation and Reply: one turn engine for every front end."""

from __future__ import annotations

import pytest

from llmchat.conversation import Conversation
from llmchat.errors import ContextOverflowError
from llmchat.types import GenerationConfig, Message
from tests.fakes import FakeChatModel


def test_turn_is_recorded_only_when_the_reply_finishes() -> None:
    model = FakeChatModel().enqueue(["He", "llo"], ["x", KeyboardInterrupt()])
    conv = Conversation(model, GenerationConfig(), system="Be brief.")
    reply = conv.send("hi")
    assert conv.turns == [] and not reply.done
    assert list(reply) == ["He", "llo"] and reply.text == "Hello" and reply.done
    assert conv.messages == [Message("system", "Be brief."), Message("user", "hi"),
                             Message("assistant", "Hello")]
    stopped = conv.send("again")
    with pytest.raises(KeyboardInterrupt):
        list(stopped)
    assert not stopped.done and len(conv.turns) == 2  # no half turn


def test_replace_last_regenerates_in_place() -> None:
    model = FakeChatModel().enqueue("A1", "A2")
    conv = Conversation(model, GenerationConfig())
    conv.send("q").consume()
    conv.send("q edited", replace_last=True).consume()
    assert conv.turns == [Message("user", "q edited"), Message("assistant", "A2")]
    assert model.calls[-1][0] == [Message("user", "q edited")]


def test_fit_leaves_out_old_turns_but_keeps_them_recorded() -> None:
    model = FakeChatModel()  # counts characters
    conv = Conversation(model, GenerationConfig(max_length=100, max_new_tokens=10))
    for i in range(5):
        model.enqueue("a" * 10)
        conv.send(str(i) * 10).consume()
    reply = conv.send("last").consume()
    sent = model.calls[-1][0]
    assert reply.dropped_turns > 0 and sent[-1] == Message("user", "last")
    assert model.count_tokens(sent) + 10 <= 100
    # the fewest turns are left out
    assert model.count_tokens([*conv.turns[2 * reply.dropped_turns - 2:-2], sent[-1]]) + 10 > 100
    assert len(conv.turns) == 12  # nothing deleted from the conversation


def test_fit_carries_the_image_of_a_dropped_turn() -> None:
    model = FakeChatModel(supports_images=True)
    conv = Conversation(model, GenerationConfig(max_length=60, max_new_tokens=10))
    conv.turns = [Message("user", "x" * 30, "/p.png"), Message("assistant", "y" * 30)]
    sent, dropped = conv.fit(conv.turns, Message("user", "next"))
    assert dropped == 1 and sent == [Message("user", "next", "/p.png")]


def test_fit_overflow_is_a_clear_error() -> None:
    conv = Conversation(FakeChatModel(), GenerationConfig(max_length=20))
    with pytest.raises(ContextOverflowError, match="context budget of 20"):
        conv.send("z" * 30)


class CountingModel(FakeChatModel):
    def __init__(self) -> None:
        super().__init__()
        self.counted = 0  # characters counted, over all calls

    def count_tokens(self, messages):  # type: ignore[no-untyped-def]
        n = super().count_tokens(messages)
        self.counted += n
        return n


@pytest.mark.parametrize("turns", [250, 2000])
def test_fitting_is_linear_in_the_conversation(turns: int) -> None:
    """Each turn's cost is counted once: the work per fit grows with the conversation, not
    with its square (0.15 s at 250 turns, 86.7 s at 2000 before)."""
    model = CountingModel()
    conv = Conversation(model, GenerationConfig(max_length=2048, max_new_tokens=16))
    conv.turns = [Message(r, f"{r} {i} " + "w" * 40) for i in range(turns)
                  for r in ("user", "assistant")]
    size = model.count_tokens(conv.turns)
    model.counted = 0
    sent, dropped = conv.fit(conv.turns, Message("user", "q"))
    assert dropped > 0 and model.count_tokens(sent) + 16 <= 2048
    assert model.counted < 3 * size + 20 * 2048  # quadratic would be ~turns/2 × size
    model.counted = 0
    conv.fit(conv.turns, Message("user", "q2"))  # turn costs are remembered
    assert model.counted < 20 * 2048 + size // 10
