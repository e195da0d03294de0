"""Qwen-7B-Chat's text side: the tiktoken tokenizer over ``qwen.tiktoken`` (read and checked
here), the ChatML template (upstream ``make_context``) and the reply post-processing.
``llmchat.models.qwen`` exports the contract names.

Departure from upstream: ids the tokenizer does not know (the padded rows 151851..151935)
decode to nothing instead of raising.
"""

from __future__ import annotations

import binascii
import unicodedata
from base64 import b64decode
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmchat.errors import TokenizerError
from llmchat.types import Message, split_turns

# Upstream tokenization_qwen.py PAT_STR (digits split one by one, cl100k-like otherwise).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_START_ID = 151643
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))
TOKENIZER_FILE = "qwen.tiktoken"


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse ``base64(token) rank`` lines, naming the first malformed line."""
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"cannot read tokenizer {path}: {exc}") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'base64-token rank'")
            ranks[b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error) as exc:
            raise TokenizerError(f"{path} line {n} is malformed ({exc}): {line[:60]!r}") from None
    if not ranks:
        raise TokenizerError(f"{path} holds no tokens")
    return ranks


class QwenTokenizer:
    """tiktoken BPE over ``qwen.tiktoken`` plus upstream's 208 special tokens."""

    def __init__(self, path: Path) -> None:
        import tiktoken

        ranks = read_tiktoken_ranks(path)
        if max(ranks.values()) >= SPECIAL_START_ID or len(set(ranks.values())) != len(ranks):
            raise TokenizerError(f"{path}: ranks must be unique and below {SPECIAL_START_ID}")
        if len(ranks) != SPECIAL_START_ID:  # unique and below it: then exactly 0..151642
            # a cut file leaves ids the model emits without text (empty replies)
            raise TokenizerError(
                f"{path} has {len(ranks):,} token ranks; the Qwen vocabulary needs all "
                f"{SPECIAL_START_ID:,} (ids 0..{SPECIAL_START_ID - 1}) besides the "
                f"{len(SPECIAL_TOKENS)} special tokens: the file is cut short or not Qwen's"
            )
        self.special = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special
        )
        self.eos_id = self.special[ENDOFTEXT]
        self.im_start_id = self.special[IM_START]
        self.im_end_id = self.special[IM_END]
        self.vocab_size = self.enc.n_vocab  # 151851
        self._known = set(ranks.values()) | set(self.special.values())

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """NFC-normalise and encode; special-token text is plain text unless allowed."""
        text = unicodedata.normalize("NFC", text)
        allowed: Any = "all" if allow_special else set()
        return list(self.enc.encode(text, allowed_special=allowed, disallowed_special=()))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes -> UTF-8 with U+FFFD for incomplete sequences (StreamDecoder holds them back)."""
        return self.enc.decode([i for i in ids if i in self._known], errors="replace")


def load_tokenizer(model_dir: Path) -> QwenTokenizer:
    return QwenTokenizer(Path(model_dir) / TOKENIZER_FILE)


# -- chat format (ChatML, upstream make_context) ------------------------------------------------
DEFAULT_SYSTEM = "You are a helpful assistant."
MAX_WINDOW_SIZE = 6144  # generation_config.json max_window_size


def _system(messages: Sequence[Message]) -> tuple[str, list[tuple[str, str]], str]:
    system, history, query = split_turns(list(messages))
    return (DEFAULT_SYSTEM if system is None else system), history, query


def build_prompt(messages: Sequence[Message]) -> str:
    """The ChatML text of the whole conversation (before window truncation)."""
    system, history, query = _system(messages)
    parts = [f"<|im_start|>system\n{system}<|im_end|>"]
    for q, r in history:
        parts.append(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>")
    parts.append(f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n")
    return "\n".join(parts)


def encode_messages(
    tok: QwenTokenizer, messages: Sequence[Message], *, max_window_size: int = MAX_WINDOW_SIZE
) -> list[int]:
    """Upstream ``make_context``: role and content encoded separately (specials as plain text),
    parts joined by "\\n"; past turns kept newest-first while they fit ``max_window_size``."""
    system, history, query = _system(messages)
    nl = tok.encode("\n")

    def part(role: str, content: str) -> list[int]:
        return [tok.im_start_id, *tok.encode(role), *nl, *tok.encode(content), tok.im_end_id]

    system_ids = part("system", system)
    context: list[int] = []
    for q, r in reversed(history):
        turn = nl + part("user", q) + nl + part("assistant", r)
        if len(system_ids) + len(turn) + len(context) >= max_window_size:
            break  # as upstream: stop at the first turn that does not fit
        context = turn + context
    return [*system_ids, *context, *nl, *part("user", query), *nl, tok.im_start_id,
            *tok.encode("assistant"), *nl]


def postprocess(text: str) -> str:
    """Upstream ``_decode_chatml``: the reply up to the first stop token, stripped."""
    return text.strip()


def holdback(text: str) -> int:
    return 0  # strip() already keeps trailing whitespace back while streaming


def stop_ids(tok: QwenTokenizer) -> frozenset[int]:
    return frozenset({tok.im_end_id, tok.im_start_id, tok.eos_id})
