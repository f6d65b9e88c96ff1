"""Evaluation text for language-model divergence: documents, tokenization, and scoring windows.

Inputs, chosen by file suffix:

* ``.jsonl`` / ``.ndjson``: one JSON object per line; the text is in ``field`` (default
  ``"text"``), or the line carries pre-tokenized ``"input_ids"`` (a list of ints). Each line is
  one document; blank lines are ignored.
* anything else: a plain UTF-8 text file, tokenized as one document (as llama.cpp does with
  wikitext), so windows run across paragraph breaks.

Windows: each document is cut into windows of at most ``ctx`` tokens starting every ``stride``
tokens. Within a window, token ``j`` is predicted from tokens ``< j``. Scoring rules (documented in
docs/diverge.md):

* ``second-half`` (default, as llama.cpp's perplexity and KL tools): only tokens in the second half
  of each window are scored, so every scored token has at least ``ctx/2`` tokens of context and
  the measures do not mix in the poorly conditioned first positions.
* ``all``: every token that has context inside its window is scored: with overlapping windows
  (``stride < ctx``) that is every token but the first of the document; with disjoint windows
  (the default ``stride = ctx``) the first token of each window is skipped too.

With overlapping windows a token is scored once only, in the first window that may score it. Documents are streamed: nothing here holds more than one document's token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch

from mlcompress.errors import InputError, UsageError

ScoreRule = Literal["all", "second-half"]
SCORE_RULES: tuple[str, ...] = ("all", "second-half")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class Document:
    """One tokenized document; ``where`` names it for error messages (``file:line``)."""

    index: int
    ids: list[int]
    where: str


@dataclass
class Window:
    """Up to ``ctx`` tokens of one document; targets ``ids[first:]`` are scored."""

    doc: int
    ids: torch.Tensor  # int64 [length]
    first: int  # index of the first scored target within the window (>= 1)

    @property
    def n_scored(self) -> int:
        return self.ids.numel() - self.first


Tokenize = Callable[[str], list[int]]


def read_documents(
    path: str | Path, *, field: str = "text", tokenize: Tokenize | None = None
) -> Iterator[Document]:
    """Yield the documents of ``path`` one by one, tokenized, each with at least 2 tokens.

    Raises :class:`InputError` naming the file and line for invalid JSON, a line without
    ``field`` (or ``input_ids``), text when no tokenizer is available, a document shorter than
    2 tokens, and for a file with no documents at all.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist or is not a file")
    count = 0
    if path.suffix.lower() in JSONL_SUFFIXES:
        source = _jsonl_documents(path, field, tokenize)
    else:
        source = _text_document(path, tokenize)
    for ids, where in source:
        if len(ids) < 2:
            raise InputError(
                f"{where}: has {len(ids)} token(s); scoring a next-token prediction needs at "
                "least 2",
                hint="remove or merge short lines",
            )
        yield Document(index=count, ids=ids, where=where)
        count += 1
    if count == 0:
        raise InputError(f"{path} holds no documents", hint="give a file with text to score")


def _text_document(path: Path, tokenize: Tokenize | None) -> Iterator[tuple[list[int], str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        return
    if tokenize is None:
        raise _no_tokenizer(path)
    yield tokenize(text), str(path)


def _jsonl_documents(
    path: Path, field: str, tokenize: Tokenize | None
) -> Iterator[tuple[list[int], str]]:
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{lineno + 1}: not UTF-8 ({exc.reason})") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if field in obj:
                text = obj[field]
                if not isinstance(text, str):
                    raise InputError(f"{where}: field {field!r} is not a string")
                if tokenize is None:
                    raise _no_tokenizer(path)
                yield tokenize(text), where
            elif "input_ids" in obj:
                yield _token_list(obj["input_ids"], where), where
            else:
                keys = ", ".join(sorted(obj)[:8]) or "none"
                raise InputError(
                    f"{where}: no {field!r} field and no 'input_ids' (keys: {keys})",
                    hint="name the text field with --field",
                )


def _token_list(value: object, where: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise InputError(f"{where}: 'input_ids' must be a list of non-negative integers")
    return value


def _no_tokenizer(path: Path) -> InputError:
    return InputError(
        f"{path} holds text but no tokenizer is available",
        hint="pass --tokenizer (a tokenizer.json or model directory) or pre-tokenized input_ids",
    )


def windows(
    doc: Document, *, ctx: int, stride: int, score: ScoreRule = "second-half"
) -> Iterator[Window]:
    """The scoring windows of one document (see the module docstring for the rules)."""
    if ctx < 2:
        raise UsageError(f"--ctx must be at least 2 (got {ctx})")
    if not 1 <= stride <= ctx:
        raise UsageError(f"--stride must be between 1 and --ctx={ctx} (got {stride})")
    if score not in SCORE_RULES:
        raise UsageError(f"--score must be one of {', '.join(SCORE_RULES)} (got {score!r})")
    n = len(doc.ids)
    ids = torch.tensor(doc.ids, dtype=torch.long)
    scored_until = 1  # global index of the first target not yet scored (token 0 never is)
    start = 0
    while scored_until < n:
        end = min(start + ctx, n)
        length = end - start
        first = max(1, length // 2 if score == "second-half" else 1, scored_until - start)
        if first < length:
            yield Window(doc=doc.index, ids=ids[start:end], first=first)
        scored_until = max(scored_until, end)
        if end == n:
            break
        start += stride


def batches(items: Iterator[Window], batch_size: int) -> Iterator[list[Window]]:
    """Group consecutive windows into lists of ``batch_size`` (the last may be shorter)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    batch: list[Window] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def pad_batch(batch: list[Window], pad_id: int = 0) -> torch.Tensor:
    """Right-pad windows into ``[batch, max_len]``. Causal models never look right, so the pads
    cannot change any scored position and no attention mask is needed."""
    longest = max(w.ids.numel() for w in batch)
    out = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    for row, w in enumerate(batch):
        out[row, : w.ids.numel()] = w.ids
    return out
