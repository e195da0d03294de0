"""Tokenizer protocol, a checked sentencepiece loader, and UTF-8-safe streaming detokenization.

Each architecture's own tokenizer, chat template and post-processing live in
``llmchat/tokenizers/<arch>.py``; this module only holds what they share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from llmchat.errors import TokenizerError

if TYPE_CHECKING:
    import sentencepiece


class Tokenizer(Protocol):
    """What the generic chat glue needs from a tokenizer."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def load_sentencepiece(path: Path) -> sentencepiece.SentencePieceProcessor:
    """Load a ``.model`` file, turning a missing or corrupt file into a one-line error."""
    import sentencepiece as spm

    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from None
    return sp


def partial_suffix_len(text: str, word: str) -> int:
    """Length of the longest proper prefix of ``word`` that ``text`` ends with (0 if none)."""
    for n in range(min(len(word) - 1, len(text)), 0, -1):
        if text.endswith(word[:n]):
            return n
    return 0


class StreamDecoder:
    """Turn a growing list of token ids into append-only text deltas.

    Each step re-decodes all ids and post-processes the whole text (as the upstream
    ``stream_chat`` does), then emits only what can no longer change:

    * nothing while the text ends in U+FFFD (an incomplete multi-byte UTF-8 character),
    * not the last ``holdback(text)`` characters (e.g. ChatGLM-6B's ASCII ``,`` that becomes
      ``，`` when a CJK character follows, or a partial ``[[训练时间]]``).

    ``"".join(deltas) + decoder.flush()`` equals ``postprocess(decode(ids))`` whenever each
    emitted prefix is also a prefix of the final text, which ``holdback`` guarantees.

    So that a long reply does not cost O(length) of decoding per token, the raw text is frozen
    at each line end: later steps decode only the ids after it, led by the token that ended the
    line (an anchor, so the tokenizer sees the same left context and keeps e.g. sentencepiece's
    word-initial space), and drop the anchor's own text. ``text()`` still decodes everything.
    """

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        postprocess: Callable[[str], str] = str.strip,
        holdback: Callable[[str], int] = lambda text: 0,
    ) -> None:
        self._decode = decode
        self._post = postprocess
        self._holdback = holdback
        self.ids: list[int] = []
        self.emitted = ""
        self.final = ""  # the whole post-processed reply, set by flush()
        self._base = 0  # ids[:_base] are decoded once into _frozen
        self._frozen = ""
        self._anchor: int | None = None
        self._anchor_len = 0

    def raw(self) -> str:
        """The decoded text of all ids, decoding only those after the last frozen line end."""
        if self._anchor is None:
            return self._decode(self.ids)
        return self._frozen + self._decode([self._anchor, *self.ids[self._base :]])[
            self._anchor_len :
        ]

    def _stable(self, text: str) -> str:
        if text.endswith("\ufffd"):
            return self.emitted
        return text[: len(text) - self._holdback(text)]

    def push(self, token: int) -> str:
        """Add one token; return the newly stable text (often empty)."""
        self.ids.append(token)
        raw = self.raw()
        if raw.endswith("\n"):  # freeze at a line end (the anchor's text must end with it too)
            alone = self._decode([token])
            if alone.endswith("\n"):
                self._frozen, self._base = raw, len(self.ids)
                self._anchor, self._anchor_len = token, len(alone)
        stable = self._stable(self._post(raw))
        if len(stable) > len(self.emitted) and stable.startswith(self.emitted):
            delta = stable[len(self.emitted) :]
            self.emitted = stable
            return delta
        return ""

    def text(self) -> str:
        """The final post-processed text of all ids pushed so far."""
        return self._post(self._decode(self.ids))

    def flush(self) -> str:
        """Return the rest of the final text once generation has ended."""
        final = self.final = self.text()
        if final.startswith(self.emitted):
            delta = final[len(self.emitted) :]
            self.emitted = final
            return delta
        return ""  # cannot retract streamed text; the caller still gets text() as the reply
