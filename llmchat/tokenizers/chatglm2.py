"""ChatGLM2-6B's text side: the sentencepiece ``tokenizer.model`` with the five special ids
upstream appends, the ``[Round i]`` template (from i = 1, ids prefixed with ``[gMASK] sop``)
and the reply post-processing. ``llmchat.models.chatglm2`` exports the contract names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llmchat.tokenizer import load_sentencepiece, partial_suffix_len
from llmchat.types import Message, split_turns


class ChatGLM2Tokenizer:
    """sentencepiece ``tokenizer.model`` plus the five special ids upstream appends after it."""

    SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")

    def __init__(self, path: Path) -> None:
        self.sp = load_sentencepiece(path)
        n = self.sp.vocab_size()
        self.special = {name: n + i for i, name in enumerate(self.SPECIALS)}
        self.gmask_id, self.sop_id = self.special["[gMASK]"], self.special["sop"]
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id()
        self.pad_id = self.sp.unk_id()
        self._n = n
        self.vocab_size = n + len(self.SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        # upstream maps bos/eos/pad and the appended specials to empty strings
        skip = (self.bos_id, self.eos_id, self.pad_id)
        return str(self.sp.decode([i for i in ids if 0 <= i < self._n and i not in skip]))


TOKENIZER_FILE = "tokenizer.model"


def load_tokenizer(model_dir: Path) -> ChatGLM2Tokenizer:
    return ChatGLM2Tokenizer(Path(model_dir) / TOKENIZER_FILE)


# -- chat format -------------------------------------------------------------------------------
def build_prompt(messages: Sequence[Message]) -> str:
    """``[Round i]\\n\\n问：q\\n\\n答：r\\n\\n`` per past turn from i = 1, then the new question."""
    _, history, query = split_turns(list(messages))
    parts = [f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, 1)]
    parts.append(f"[Round {len(history) + 1}]\n\n问：{query}\n\n答：")
    return "".join(parts)


def encode_messages(tok: ChatGLM2Tokenizer, messages: Sequence[Message]) -> list[int]:
    """``[gMASK] sop`` followed by the template's tokens (upstream prepends the two)."""
    return [tok.gmask_id, tok.sop_id, *tok.encode(build_prompt(messages))]


TRAINING_TIME = "[[训练时间]]"


def postprocess(text: str) -> str:
    """Upstream ``process_response``: strip, and fill in the training-time placeholder."""
    return text.strip().replace(TRAINING_TIME, "2023年")


def holdback(text: str) -> int:
    return partial_suffix_len(text, TRAINING_TIME)


def stop_ids(tok: ChatGLM2Tokenizer) -> frozenset[int]:
    return frozenset({tok.eos_id})
