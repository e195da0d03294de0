"""Upstream's ``compute_metrics`` (ptuning/main.py): per example, ROUGE-1/2/L F1 of the jieba
word segmentations (rouge_chinese) and sentence BLEU-4 over characters (nltk, smoothing
method3, which needs no downloaded nltk data), each ×100 rounded to 4 places, then the mean;
plus the exact-match ``accuracy`` a classification set needs.

The three libraries are the optional ``finetune`` extra and are imported only here, when
scoring. Departure: rouge_chinese raises on an empty hypothesis (upstream's run would stop);
llmchat scores such a pair 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from llmchat.errors import LLMChatError

EXTRA = "pip install 'llmchat[finetune]'  (jieba, rouge_chinese, nltk)"


def _deps():  # type: ignore[no-untyped-def]
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as e:
        raise LLMChatError(f"scoring --predict_with_generate needs {e.name}: {EXTRA}") from None
    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" chatter on stderr
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def require() -> None:
    """Fail early (before training) when the scoring libraries are missing."""
    _deps()


def compute_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    jieba, Rouge, sentence_bleu, SmoothingFunction = _deps()
    scores: dict[str, list[float]] = {"rouge-1": [], "rouge-2": [], "rouge-l": [],
                                      "bleu-4": [], "accuracy": []}
    smooth = SmoothingFunction().method3
    for pred, label in zip(preds, labels, strict=True):
        hyp = " ".join(jieba.cut(pred))
        ref = " ".join(jieba.cut(label))
        if hyp.strip() and ref.strip():
            result = Rouge().get_scores(hyp, ref)[0]
            for k in ("rouge-1", "rouge-2", "rouge-l"):
                scores[k].append(round(result[k]["f"] * 100, 4))
        else:
            for k in ("rouge-1", "rouge-2", "rouge-l"):
                scores[k].append(0.0)
        if pred and label:
            bleu = sentence_bleu([list(label)], list(pred), smoothing_function=smooth)
        else:
            bleu = 0.0
        scores["bleu-4"].append(round(bleu * 100, 4))
        scores["accuracy"].append(100.0 if pred.strip() == label.strip() else 0.0)
    return {k: (sum(v) / len(v) if v else 0.0) for k, v in scores.items()}
