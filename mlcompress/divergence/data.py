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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch

from mlcompress.errors import InputError, UsageError

ScoreRule = Literal["llama-cpp", "second-half", "all"]
SCORE_RULES: tuple[str, ...] = ("llama-cpp", "second-half", "all")
PER_DOCUMENT_RULES: tuple[str, ...] = ("second-half", "all")
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
    for value, where in jsonl_records(path, field):
        if isinstance(value, str):
            if tokenize is None:
                raise _no_tokenizer(path)
            yield tokenize(value), where
        else:
            yield value, where


def jsonl_records(path: Path, field: str) -> Iterator[tuple[str | list[int], str]]:
    """Each non-blank line's text (a ``str`` from ``field``) or pre-tokenized ``input_ids``
    (a ``list[int]``), with ``file:line``; every malformed line is an :class:`InputError`."""
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
                yield text, where
            elif "input_ids" in obj:
                yield _token_list(obj["input_ids"], where), where
            else:
                keys = ", ".join(sorted(obj)[:8]) or "none"
                raise InputError(
                    f"{where}: no {field!r} field and no 'input_ids' (keys: {keys})",
                    hint="name the text field with --field",
                )


#: How the texts of a .jsonl file are joined into the one text of ``--score llama-cpp``: as if
#: each text were one line of a plain text file (which llama.cpp would read as one prompt).
JOIN = "\n"


def read_token_stream(path: str | Path, *, field: str = "text", tokenize: Tokenize | None = None) -> list[int]:
    """The whole data set as ONE token stream, tokenized once, as llama.cpp's perplexity tool
    reads its ``-f`` file (``--score llama-cpp``).

    A plain text file is tokenized as it is. The texts of a ``.jsonl`` file are joined with
    :data:`JOIN` and the result is tokenized once (so a tokenizer that adds BOS adds it once, at
    the start of the stream, and tokens may merge across the joins exactly as they would in the
    text file); lines of pre-tokenized ``input_ids`` are concatenated as given. A file mixing the
    two is refused: there is no single stream it could stand for.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist or is not a file")
    if path.suffix.lower() not in JSONL_SUFFIXES:
        for ids, _ in _text_document(path, tokenize):
            return list(ids)
        raise InputError(f"{path} holds no documents", hint="give a file with text to score")
    texts: list[str] = []
    ids: list[int] = []
    for value, where in jsonl_records(path, field):
        if isinstance(value, str):
            texts.append(value)
        else:
            ids.extend(value)
        if texts and ids:
            raise InputError(
                f"{where}: the file mixes text and input_ids lines, so it is not one token stream",
                hint="give text only or input_ids only",
            )
    if texts:
        if tokenize is None:
            raise _no_tokenizer(path)
        return list(tokenize(JOIN.join(texts)))
    if not ids:
        raise InputError(f"{path} holds no documents", hint="give a file with text to score")
    return ids


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
