"""Reading the data files and THUDM's preprocessing (``ptuning/main.py``), per base model.

Training example (``preprocess_function_train``):

* ChatGLM-6B: the prompt is the bare query, or with ``--history_column`` the
  ``[Round i]\\n问：q\\n答：r\\n`` template from i = 0. The prompt ids keep ``max_source_length
  - 1`` tokens and the answer ``max_target_length - 2``; the sequence is ``prompt [gMASK] <sop>
  answer <eop>`` and the labels -100 over ``prompt [gMASK]``, then ``<sop> answer <eop>``
  (``[-100] * context_length + input_ids[mask_position + 1:]``).
* ChatGLM2-6B: the prompt is always ``[Round n]\\n\\n问：q\\n\\n答：`` (from the tokenizer's
  ``build_prompt``); ``[gMASK] sop`` are prepended and the total kept to ``max_source_length``,
  the answer keeps ``max_target_length`` tokens; the sequence is ``[gMASK] sop prompt answer
  </s>`` with labels -100 over ``[gMASK] sop prompt``.

Upstream pads every row to the longest possible length with the pad id and (with
``ignore_pad_token_for_loss``) turns every label equal to the pad id into -100. Padding sits
at the end, after every supervised token, and neither model lets an earlier token see a later
one there, so llmchat pads a micro-batch only to its longest row: the loss is the same.

Evaluation example (``preprocess_function_eval``): the prompt ids as the tokenizer's
``__call__`` with ``max_length``/``truncation`` gives them (specials included, text truncated
to ``max_source_length - 2``), the reference the answer truncated the same way.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmchat.errors import UsageError

MAX_DATA_BYTES = 1 << 30


class DataWarning(UserWarning):
    """A data problem that does not stop the run (truncated answers)."""


@dataclass
class Example:
    query: str
    answer: str
    history: list[tuple[str, str]] | None
    line: int  # 1-based line (JSON lines, CSV) or item number (JSON list)


def _text(v: Any) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else str(v)


def read_examples(path: str, prompt_col: str, response_col: str, history_col: str | None,
                  *, limit: int | None = None) -> list[Example]:
    """The examples of a JSON-lines, JSON-list or CSV file; a bad line is a ``UsageError``
    naming it. Rows with an empty prompt or answer are skipped, as upstream does."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{path}: no such file")
    if p.stat().st_size > MAX_DATA_BYTES:
        raise UsageError(f"{path}: over {MAX_DATA_BYTES >> 20} MiB")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
    rows = _csv_rows(text, path) if p.suffix.lower() == ".csv" else _json_rows(text, path)
    if not rows:
        raise UsageError(f"{path}: empty file (no examples)")
    out: list[Example] = []
    for line, row in rows:
        for col in (prompt_col, response_col, history_col):
            if col is not None and col not in row:
                have = ", ".join(map(repr, row)) or "none"
                raise UsageError(f"{path} line {line}: no {col!r} column (columns: {have})")
        hist = None
        if history_col is not None:
            hist = _history(row[history_col], path, line)
        query, answer = _text(row[prompt_col]), _text(row[response_col])
        if query and answer:  # upstream keeps a row only when both are non-empty
            out.append(Example(query, answer, hist, line))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise UsageError(f"{path}: no example has both a {prompt_col!r} and a "
                         f"{response_col!r} value")
    return out


def _json_rows(text: str, path: str) -> list[tuple[int, dict[str, Any]]]:
    if text.lstrip().startswith("["):  # one JSON list, which datasets' json loader takes too
        try:
            items = json.loads(text)
        except ValueError as e:
            raise UsageError(f"{path}: not valid JSON ({e})") from None
        rows = list(enumerate(items, 1)) if isinstance(items, list) else []
    else:
        rows = []
        for n, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                rows.append((n, json.loads(raw)))
            except ValueError as e:
                raise UsageError(f"{path} line {n}: not valid JSON ({e})") from None
    for n, row in rows:
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {n}: not a JSON object")
    return rows


def _csv_rows(text: str, path: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        reader = csv.DictReader(text.splitlines())
        return [(n, dict(r)) for n, r in enumerate(reader, 2)]
    except csv.Error as e:
        raise UsageError(f"{path}: bad CSV ({e})") from None


def _history(v: Any, path: str, line: int) -> list[tuple[str, str]]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(t, list | tuple) and len(t) == 2
                                          for t in v):
        raise UsageError(f"{path} line {line}: the history must be a list of "
                         "[question, answer] pairs")
    return [(_text(q), _text(r)) for q, r in v]


# -- prompts -----------------------------------------------------------------------------------
def glm_prompt(ex: Example, *, train: bool) -> str:
    """ChatGLM-6B: upstream's train function uses the template whenever a history column is
    given; its eval function only when the history is non-empty."""
    if ex.history is None or (not train and not ex.history):
        return ex.query
    parts = [f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(ex.history)]
    parts.append(f"[Round {len(ex.history)}]\n问：{ex.query}\n答：")
    return "".join(parts)


def glm2_prompt(ex: Example) -> str:
    hist = ex.history or []
    parts = [f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(hist, 1)]
    parts.append(f"[Round {len(hist) + 1}]\n\n问：{ex.query}\n\n答：")
    return "".join(parts)


@dataclass
class Features:
    input_ids: list[int]
    labels: list[int]
    answer_truncated: bool = False


def train_features(ex: Example, tok: Any, glm2: bool, *, source_prefix: str, max_source: int,
                   max_target: int, ignore_pad: bool = True) -> Features:
    """One training row, unpadded (see the module docstring)."""
    if glm2:
        a = tok.encode(source_prefix + glm2_prompt(ex))
        b = tok.encode(ex.answer)
        a = [tok.gmask_id, tok.sop_id, *a][: max(max_source, 2)]  # specials count, kept
        cut = len(b) > max_target
        b = b[:max_target]
        ids = [*a, *b, tok.eos_id]
        labels = [-100] * len(a) + [*b, tok.eos_id]
    else:
        a = tok.encode(source_prefix + glm_prompt(ex, train=True))[: max_source - 1]
        b = tok.encode(ex.answer)
        cut = len(b) > max_target - 2
        b = b[: max_target - 2]
        ids = [*a, tok.gmask_id, tok.sop_id, *b, tok.eos_id]
        ctx = len(a) + 1  # context_length: the index of <sop>
        labels = [-100] * ctx + ids[ctx:]  # <sop> itself is a label (predicted from [gMASK])
    if ignore_pad:
        labels = [-100 if t == tok.pad_id else t for t in labels]
    return Features(ids, labels, cut)


def eval_features(ex: Example, tok: Any, glm2: bool, *, source_prefix: str, max_source: int,
                  max_target: int) -> tuple[list[int], list[int]]:
    """Prompt ids (specials included) and the reference answer's ids for one eval row."""
    text = source_prefix + (glm2_prompt(ex) if glm2 else glm_prompt(ex, train=False))
    keep_a, keep_b = max(max_source - 2, 0), max(max_target - 2, 0)
    a, b = tok.encode(text)[:keep_a], tok.encode(ex.answer)[:keep_b]
    prompt = [tok.gmask_id, tok.sop_id, *a] if glm2 else [*a, tok.gmask_id, tok.sop_id]
    return prompt, b


def build_train_set(examples: list[Example], tok: Any, glm2: bool, args: Any,
                    path: str) -> list[Features]:
    feats = [train_features(ex, tok, glm2, source_prefix=args.source_prefix or "",
                            max_source=args.max_source_length,
                            max_target=args.max_target_length,
                            ignore_pad=args.ignore_pad_token_for_loss) for ex in examples]
    cut = [ex.line for ex, f in zip(examples, feats, strict=True) if f.answer_truncated]
    if cut:  # once, naming where
        keep = args.max_target_length if glm2 else args.max_target_length - 2
        more = f" and {len(cut) - 1} more" if len(cut) > 1 else ""
        warnings.warn(f"{path} line {cut[0]}{more}: the {args.response_column!r} answer is "
                      f"longer than --max_target_length allows ({keep} tokens): truncated",
                      DataWarning, stacklevel=2)
    return feats
