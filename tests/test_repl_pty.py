"""End to end: ``llmchat chat`` in a real pseudo-terminal against a tiny ChatGLM2 checkpoint."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from llmchat.loader import load
from llmchat.types import Message

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pty")

ARGS = ["--device", "cpu", "--dtype", "float32", "--temperature", "0", "--max-new-tokens", "200"]
PROMPT = ">>>"
STYLED = r"{} (?:\x1b\[[\d;]*m)*{}"  # a label, colour codes, then text


def spawn(model_dir: Path) -> pexpect.spawn:
    env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(sys.executable, ["-m", "llmchat", "chat", "--model-path",
                                           str(model_dir), *ARGS],
                          env=env, encoding="utf-8", dimensions=(40, 120), timeout=60,
                          cwd=str(Path(__file__).resolve().parent.parent))
    if os.environ.get("PTY_LOG"):
        child.logfile_read = open(os.environ["PTY_LOG"], "w", newline="")
    child.expect(PROMPT)
    return child


def first_words(model_dir: Path, questions: list[str]) -> list[str]:
    """The start of each greedy reply, computed in-process, to recognise it on the screen."""
    model = load(model_path=model_dir, device="cpu", dtype="float32")
    # greedy decoding: the first tokens are those of the 200-token reply on screen
    config = model.defaults.with_(temperature=0, max_new_tokens=12)
    words = []
    for q in questions:
        word = re.search(r"\w{2,}", model.chat([Message("user", q)], config))
        assert word, q
        words.append(word.group())
    return words


def test_ctrl_c_mid_reply_then_next_question_with_clean_history(glm2_dir: Path) -> None:
    first_start, second_start = first_words(glm2_dir, ["first question", "second question"])
    child = spawn(glm2_dir)
    child.sendline("first question")
    child.expect(re.escape(first_start))  # the reply is streaming …
    child.sendintr()  # … press Ctrl-C
    child.expect("Interrupted: this turn is not kept in the history.", timeout=10)
    child.expect(PROMPT)
    child.sendline("second question")
    child.expect(re.escape(second_start))  # the answer to a history without the first turn
    child.expect(PROMPT)
    child.sendline("/history")
    child.expect(STYLED.format("You:", "second question"))
    assert "first question" not in child.before  # it would be listed before
    child.expect(STYLED.format("Assistant:", re.escape(second_start)))
    child.send("\x03")  # Ctrl-C at the empty prompt: a hint, the session goes on
    child.expect("Ctrl-C again to quit")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    saved = (Path(os.environ["LLMCHAT_HOME"]) / "history").read_text(encoding="utf-8")
    assert "first question" in saved and "/exit" in saved  # input history persists
