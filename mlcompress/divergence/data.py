"""Evaluation text for language-model divergence: documents, tokenization, and scoring windows.

Inputs, chosen by file suffix:

* ``.jsonl`` / ``.ndjson``: one JSON object per line; the text is in ``field`` (default
  ``"text"``), or the line carries pre-tokenized ``"input_ids"`` (a list of ints). Each line is
  one document; blank lines are ignored.
* anything else: a plain UTF-8 text file, tokenized as one document (as llama.cpp does with
  wikitext), so windows run across paragraph breaks.

Windows (documented in docs/diverge.md, with a worked example):

* ``llama-cpp`` (default): the data are ONE token stream (see :func:`read_token_stream`), cut into
  ``floor(N / ctx)`` disjoint chunks; the rule itself lives in :mod:`.llamacpp`.
* ``second-half`` and ``all`` cut each document on its own: windows of at most ``ctx`` tokens
  starting every ``stride`` tokens; within a window, token ``j`` is predicted from tokens ``< j``.
  ``second-half`` scores targets ``length//2 ... length-1`` of each window, so every scored token
  has at least ``length/2`` tokens of context; ``all`` scores every token that has context inside
  its window: with overlapping windows (``stride < ctx``) every token but the first of the
  document; with disjoint windows (the default ``stride = ctx``) the first token of each window is
  skipped too.

With overlapping windows a token is scored once only, in the first window that may score it. Documents are streamed: nothing here holds more than one document's token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch

from mlcompress.errors import InputError, UsageError
from mlcompress.tasks.text import (  # noqa: F401 (re-exported: the reader is shared with the lm task)
    JOIN,
    JSONL_SUFFIXES,
    Tokenize,
    jsonl_records,
    no_tokenizer as _no_tokenizer,
    read_token_stream,
    text_document as _text_document,
)

ScoreRule = Literal["llama-cpp", "second-half", "all"]
SCORE_RULES: tuple[str, ...] = ("llama-cpp", "second-half", "all")
PER_DOCUMENT_RULES: tuple[str, ...] = ("second-half", "all")


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


def _jsonl_documents(
    path: Path, field: str, tokenize: Tokenize | None
) -> Iterator[tuple[list[int], str]]:
    for value, where in jsonl_records(path, field):
        if isinstance(value, str):
            if tokenize is None:
                raise _no_tokenizer(path)
            yield tokenize(value), where
        else:
            yield value, where


def windows(
    doc: Document, *, ctx: int, stride: int, score: ScoreRule = "second-half"
) -> Iterator[Window]:
    """The scoring windows of one document (see the module docstring for the rules)."""
    if ctx < 2:
        raise UsageError(f"--ctx must be at least 2 (got {ctx})")
    if not 1 <= stride <= ctx:
        raise UsageError(f"--stride must be between 1 and --ctx={ctx} (got {stride})")
    if score not in PER_DOCUMENT_RULES:
        raise UsageError(f"per-document windows need --score {' or '.join(PER_DOCUMENT_RULES)} (got {score!r})")
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
