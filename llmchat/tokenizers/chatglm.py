"""ChatGLM-6B's text side: the ``ice_text.model`` tokenizer, the chat template and the reply
post-processing (also VisualGLM-6B's). ``llmchat.models.chatglm`` exports the contract names.

* Tokenizer: sentencepiece with upstream's pre-processing (``"\\n"`` → ``<n>``, ``"\\t"`` →
  ``<|tab|>``, runs of 2–80 spaces → ``<|blank_N|>``), reversed on decode. Decoding ends with
  transformers' ``clean_up_tokenization`` (on by default in the transformers 4.27.1 that
  upstream pins), so streaming holds back what it may still rewrite.
* Template: the bare query without history, else ``[Round i]`` turns from i = 0; the ids end
  with ``[gMASK] <sop>``.
* Post-processing: upstream ``process_response`` (training-time placeholder, full-width
  punctuation next to CJK).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from llmchat.errors import TokenizerError, UnsupportedCheckpointError
from llmchat.safeio import MAX_CONFIG_BYTES, read_json
from llmchat.tokenizer import load_sentencepiece, partial_suffix_len
from llmchat.types import Message, split_turns

CURRENT_REVISION = (
    "the current THUDM/chatglm-6b hub revision is needed (vocab_size 130528, ice_text.model "
    "sha256 5e974d9a…816f17e); the pre-April-2023 files (vocab 150528, ids offset by 20000) "
    "are not supported"
)


TOKENIZER_FILE = "ice_text.model"
MAX_BLANK = 80


_SPACE_RUN = re.compile(" {2,%d}" % MAX_BLANK)  # noqa: UP031 - braces are regex syntax here
_BLANK_NS = "|".join(map(str, range(MAX_BLANK, 1, -1)))
_BLANK_TOKEN = re.compile(rf"<\|blank_({_BLANK_NS})\|>")


class ChatGLMTokenizer:
    """sentencepiece ``ice_text.model`` with upstream's newline/tab/space-run pre-processing.

    Ids are the raw sentencepiece ids: the special pieces live inside the model file.
    """

    PIECES = {
        "[MASK]": 130000,
        "[gMASK]": 130001,
        "<sop>": 130004,
        "<eop>": 130005,
        "<n>": 4,
        "<|tab|>": 130008,
        "<|blank_80|>": 130087,
    }

    def __init__(self, path: Path) -> None:
        self.sp = load_sentencepiece(path)
        for piece, want in self.PIECES.items():
            if self.sp.piece_to_id(piece) != want:
                raise UnsupportedCheckpointError(
                    f"{path.name}: unexpected tokenizer; {CURRENT_REVISION}"
                )
        self.gmask_id = 130001
        self.sop_id, self.eos_id, self.pad_id = 130004, 130005, 3
        self._n = self.sp.vocab_size()

    @staticmethod
    def preprocess(text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        # greedy left to right = upstream's longest-runs-first replacement loop
        return _SPACE_RUN.sub(lambda m: f"<|blank_{len(m.group())}|>", text)

    @staticmethod
    def postprocess(text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return _BLANK_TOKEN.sub(lambda m: " " * int(m.group(1)), text)

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(self.preprocess(text)))

    def decode(self, ids: Sequence[int]) -> str:
        # control pieces (<sop>, <eop>, ...) decode to nothing; pad and ids past the
        # tokenizer (the embedding has 130528 rows for 130344 pieces) are dropped
        keep = [i for i in ids if 0 <= i < self._n and i != self.pad_id]
        return clean_up_spaces(self.postprocess(str(self.sp.decode(keep))))


# transformers' ``clean_up_tokenization``, which upstream ``tokenizer.decode`` applies by default
# in the transformers release the ChatGLM-6B repo pins (4.27.1): each pattern becomes itself
# without spaces, in this order, one ``str.replace`` pass each.
CLEANUP = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")


def clean_up_spaces(text: str) -> str:
    for old in CLEANUP:
        text = text.replace(old, old.strip())
    return text


def load_tokenizer(model_dir: Path) -> ChatGLMTokenizer:
    cfg = Path(model_dir) / "tokenizer_config.json"
    if cfg.is_file():  # optional; when present it is read like any other JSON
        data = read_json(cfg, max_bytes=MAX_CONFIG_BYTES, what="tokenizer_config.json",
                         error=TokenizerError)
        image_tokens = data.get("num_image_tokens", 0) if isinstance(data, dict) else 0
        if image_tokens:
            raise UnsupportedCheckpointError(
                f"tokenizer_config.json has num_image_tokens={image_tokens}: {CURRENT_REVISION}"
            )
    return ChatGLMTokenizer(Path(model_dir) / TOKENIZER_FILE)


# -- chat format -------------------------------------------------------------------------------
def build_prompt(messages: Sequence[Message]) -> str:
    """The bare query without history, else ``[Round i]\\n问：q\\n答：r\\n`` per turn from i = 0."""
    _, history, query = split_turns(list(messages))
    if not history:
        return query
    parts = [f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history)]
    parts.append(f"[Round {len(history)}]\n问：{query}\n答：")
    return "".join(parts)


def encode_messages(tok: ChatGLMTokenizer, messages: Sequence[Message]) -> list[int]:
    """The template's tokens followed by ``[gMASK] <sop>`` (upstream appends the two)."""
    return [*tok.encode(build_prompt(messages)), tok.gmask_id, tok.sop_id]


TRAINING_TIME = "[[训练时间]]"
PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
_CJK = "[\u4e00-\u9fff]"


def postprocess(text: str) -> str:
    """Upstream ``process_response``: strip, fill in the training time, and make ``,!:;?``
    full-width where a CJK character precedes or follows them (one regex pass for each side)."""
    text = text.strip().replace(TRAINING_TIME, "2023年")
    for ascii_mark, wide in PUNCT:
        mark = re.escape(ascii_mark)
        text = re.sub(f"({_CJK}){mark}", rf"\g<1>{wide}", text)
        text = re.sub(f"{mark}({_CJK})", rf"{wide}\g<1>", text)
    return text


_CLEANUP_CHARS = frozenset("".join(CLEANUP))


def holdback(text: str) -> int:
    """How many trailing characters later tokens may still change while streaming.

    * a trailing ASCII ``,!:;?``: it turns full width if a CJK character follows;
    * a partial ``[[训练时间]]``;
    * the clean-up: each pattern starts with a space, so a change can only start at a space
      followed by pattern characters up to the end, or at an apostrophe left by a cleaned
      `` ' `` whose last space a following ``.``/``,``/... takes instead.
    """
    mark = 1 if text and text[-1] in ",!:;?'" else 0
    tail = text[-8:]  # a chain of clean-ups spans fewer characters than this
    k = len(tail)
    while k and tail[k - 1] in _CLEANUP_CHARS:
        k -= 1
    space = tail.find(" ", k)
    cleanup = len(tail) - space if space >= 0 else 0
    return max(mark, cleanup, partial_suffix_len(text, TRAINING_TIME))


def stop_ids(tok: ChatGLMTokenizer) -> frozenset[int]:
    return frozenset({tok.eos_id})
