"""VisualGLM-6B (THUDM/visualglm-6b, HF layout), native PyTorch: chat about an image.

The language model is ChatGLM-6B unchanged (``llmchat.models.chatglm``: same config values,
keys and tokenizer); next to it sits the BLIP-2 vision tower (``blip2.py``) under
``image_encoder.``. REFERENCE.md §5.1 (hub ``visual`` branch of chatglm-6b):

* Prompt: ``<img></img>`` when the conversation has an image, then ``问：{q}\\n答：{r}\\n`` per
  past turn and ``问：{query}\\n答：`` (no ``[Round]``). The ids are ``encode("<img>")``, then
  ``image_length`` placeholders (unk, id 0), then ``encode("</img>问：…")`` (each piece with
  its own dummy prefix), then ``[gMASK] <sop>``.
* At prefill the placeholders' embeddings are replaced by the image embeddings; they sit inside
  ChatGLM's bidirectional prefix. Without an image the prompt is the same text without
  ``<img></img>``, tokenised in one piece, as upstream.
* The conversation's image is the most recently attached one (upstream takes one image path
  per conversation); switching images keeps the text history.

Departure: upstream finds the image slot with ``rfind("<img>")`` over the whole prompt, so a
user typing ``<img>`` moved it (and ``<img>x</img>`` in a question made it open ``x``); here
the slot is always the leading ``<img>`` and user text is never parsed for paths.

Images are opened and checked by ``llmchat.images`` (what is refused, how odd modes are
converted); this file keeps only their preprocessing and embedding. Shapes: B batch, T tokens,
Q image tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmchat.errors import UnsupportedCheckpointError
from llmchat.generate import InvalidScoreGuard
from llmchat.images import load_image
from llmchat.models import chatglm
from llmchat.models.base import TransformerChatModel
from llmchat.models.blip2 import BLIP2, EvaConfig, QFormerConfig, preprocess
from llmchat.models.layers import check_values
from llmchat.tokenizers.chatglm import (  # noqa: F401 - re-exported module contract
    ChatGLMTokenizer,
    holdback,
    load_tokenizer,
    postprocess,
    stop_ids,
)
from llmchat.types import Message, split_turns

SUPPORTS_SYSTEM = False
# The visual branch's InvalidScoreLogitsProcessor checks nan only (REFERENCE §5.1), so the -inf
# that min_length 100 puts on <eop> must not trip the guard (it would emit id 5 every step).
INVALID_SCORES = InvalidScoreGuard(chatglm.INVALID_SCORES.fallback_id, check_inf=False)
IMAGE_LENGTH = 32  # upstream's image_length: Q-Former queries = placeholder tokens
PLACEHOLDER_ID = 0  # the tokenizer's unk id, as upstream's HF chat() (SAT uses pad 3)
IMG_OPEN, IMG_CLOSE = "<img>", "</img>"


@dataclass(frozen=True)
class Config(chatglm.Config):
    """ChatGLM-6B's config plus ``image_length``, ``eva_config`` and ``qformer_config``."""

    image_length: int = IMAGE_LENGTH
    eva: EvaConfig = field(default_factory=EvaConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Config:
        lm = chatglm.Config.from_hf(hf)
        for key in ("eva_config", "qformer_config"):
            if not isinstance(hf.get(key), dict):
                raise UnsupportedCheckpointError(f"VisualGLM config.json has no {key!r}")
        try:
            eva = EvaConfig.from_hf(hf["eva_config"])
            qformer = QFormerConfig.from_hf(hf["qformer_config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UnsupportedCheckpointError(
                f"VisualGLM config.json: eva_config/qformer_config incomplete ({exc})"
            ) from None
        check_values(hf, {"image_length": (int, 1, 4096)}, "VisualGLM")
        n = hf.get("image_length") or IMAGE_LENGTH
        if n != qformer.num_queries:
            raise UnsupportedCheckpointError(
                f"unsupported VisualGLM config: image_length {n} must equal the "
                f"{qformer.num_queries} Q-Former queries (qformer_config.vocab_size)"
            )
        base = {f.name: getattr(lm, f.name) for f in fields(lm)}
        return cls(**base, image_length=n, eva=eva, qformer=qformer)

    def layer_counts(self) -> dict[str, tuple[str, int]]:
        """Checkpoint key prefix -> (config.json key, layers it says), checked against the keys."""
        return {
            **super().layer_counts(),
            "image_encoder.vit.transformer.layers": ("eva_config.num_layers", self.eva.num_layers),
            "image_encoder.qformer.transformer.layers": (
                "qformer_config.num_layers", self.qformer.num_layers),
        }


class Model(chatglm.Model):
    """ChatGLM-6B plus ``image_encoder``; parameter names equal the checkpoint keys."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.image_encoder = BLIP2(cfg.eva, cfg.qformer, cfg.hidden_size)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels (B, 3, H, W) -> image embeddings (B, Q, hidden)."""
        return self.image_encoder(pixels)

    def embed(self, input_ids: Tensor, image_embeds: Tensor | None, start: int) -> Tensor:
        """Word embeddings (B, T, hidden) with positions [start, start + Q) replaced."""
        x = self.transformer.word_embeddings(input_ids)  # (B, T, hidden)
        if image_embeds is None:
            return x
        q = image_embeds.shape[1]
        if start + q > x.shape[1]:
            raise ValueError(f"image slot [{start}, {start + q}) beyond {x.shape[1]} tokens")
        img = image_embeds.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, Q, hidden)
        return torch.cat((x[:, :start], img, x[:, start + q :]), dim=1)


def checkpoint_key(key: str) -> str | None:
    """Identity for the vision tower; ChatGLM-6B's rule (drop tied lm_head, rotary) otherwise."""
    if key.startswith("image_encoder."):
        return key
    return chatglm.checkpoint_key(key)


# --quant swaps only the language model's linears (upstream: "ViT 量化时误差较大"). The vision
# tower's names end in the same suffixes (``...attention.query_key_value``), so the quantizer
# must also skip every module under these prefixes.
QUANT_LINEARS = chatglm.QUANT_LINEARS
QUANT_EXCLUDE = ("image_encoder.",)


def quant_skip(name: str) -> bool:
    """True for module names --quant must leave in floating point (the vision tower)."""
    return name.startswith(QUANT_EXCLUDE)


# -- chat format -------------------------------------------------------------------------------
def conversation_image(messages: Sequence[Message]) -> str | None:
    """The image of the conversation: the most recent one attached to a user turn."""
    for m in reversed(messages):
        if m.role == "user" and m.image:
            return m.image
    return None


def build_prompt(messages: Sequence[Message]) -> str:
    """``<img></img>`` (with an image), ``问：q\\n答：r\\n`` per past turn, ``问：query\\n答：``."""
    _, history, query = split_turns(list(messages))
    head = IMG_OPEN + IMG_CLOSE if conversation_image(messages) else ""
    turns = "".join(f"问：{q}\n答：{r}\n" for q, r in history)
    return f"{head}{turns}问：{query}\n答："


def encode_with_image(
    tok: ChatGLMTokenizer, messages: Sequence[Message], image_length: int = IMAGE_LENGTH
) -> tuple[list[int], int | None]:
    """Prompt ids and the index of the first image placeholder (None without an image)."""
    prompt = build_prompt(messages)
    if conversation_image(messages) is None:
        return [*tok.encode(prompt), tok.gmask_id, tok.sop_id], None
    cut = len(IMG_OPEN)  # upstream encodes the text before and after the slot separately
    head = tok.encode(prompt[:cut])
    ids = [*head, *[PLACEHOLDER_ID] * image_length, *tok.encode(prompt[cut:])]
    return [*ids, tok.gmask_id, tok.sop_id], len(head)


def encode_messages(
    tok: ChatGLMTokenizer, messages: Sequence[Message], image_length: int = IMAGE_LENGTH
) -> list[int]:
    return encode_with_image(tok, messages, image_length)[0]


# -- chat glue ---------------------------------------------------------------------------------
class VisualGLMChatModel(TransformerChatModel):
    """The generic glue plus the image: placeholders in ``encode``, the splice at prefill."""

    _image_key: tuple[Any, ...] | None = None
    _pixels: Tensor | None = None
    _embeds: Tensor | None = None

    def encode(self, messages: Sequence[Message]) -> list[int]:
        return encode_with_image(self.tokenizer, messages, self.model.config.image_length)[0]

    def check_messages(self, messages: Sequence[Message]) -> None:
        super().check_messages(messages)
        path = conversation_image(messages)
        if path is not None:
            self._load_pixels(path)  # fail on a bad image before any work is done

    def _load_pixels(self, path: str) -> Tensor:
        p = Path(path).expanduser()
        try:
            st = p.stat()
            key: tuple[Any, ...] = (str(p.resolve()), st.st_mtime_ns, st.st_size)
        except OSError:
            key = (path,)
        if key != self._image_key or self._pixels is None:
            image = load_image(path)
            self._pixels = preprocess(image, self.model.config.eva.image_size)
            self._image_key, self._embeds = key, None
        return self._pixels

    def image_embeds(self, path: str) -> Tensor:
        """(1, Q, hidden) for the image at ``path``, cached while the file is unchanged."""
        pixels = self._load_pixels(path)
        if self._embeds is None:
            with torch.inference_mode():
                self._embeds = self.model.encode_image(pixels)
        return self._embeds

    def prefill_fn(self, messages: Sequence[Message]) -> Callable[[Tensor, Any], Tensor] | None:
        path = conversation_image(messages)
        if path is None:
            return None
        _, start = encode_with_image(self.tokenizer, messages, self.model.config.image_length)
        assert start is not None

        def prefill(ids: Tensor, cache: Any) -> Tensor:
            embeds = self.model.embed(ids, self.image_embeds(path), start)
            return self.model(ids, cache, input_embeds=embeds, last_only=True)

        return prefill


ChatModelClass = VisualGLMChatModel
