"""Text data files: a plain UTF-8 text file, or JSON lines with a text field per line.

Two users read them: ``mlcompress diverge --data`` (:mod:`mlcompress.divergence.data`) and the
``lm`` task (:mod:`mlcompress.tasks.lm`), so a file one accepts the other accepts too. It sits
in the tasks layer, below both.

* ``.jsonl`` / ``.ndjson``: one JSON object per line; the text is in ``field`` (default
  ``"text"``), or the line carries pre-tokenized ``"input_ids"`` (a list of ints). Blank lines
  are ignored.
* anything else: a plain UTF-8 text file, one document.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from mlcompress.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".ndjson")

Tokenize = Callable[[str], list[int]]
#: What to do about a JSON line without the text field, for ``diverge`` (which has ``--field``);
#: other readers pass their own.
FIELD_HINT = "name the text field with --field"


def text_document(path: Path, tokenize: Tokenize | None) -> Iterator[tuple[list[int], str]]:
    """A plain text file as one tokenized document (nothing for a blank file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        return
    if tokenize is None:
        raise no_tokenizer(path)
    yield tokenize(text), str(path)


def jsonl_records(path: Path, field: str, *, field_hint: str = FIELD_HINT) -> Iterator[tuple[str | list[int], str]]:
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
                    hint=field_hint,
                )


#: How the texts of a .jsonl file are joined into the one text of ``--score llama-cpp``: as if
#: each text were one line of a plain text file (which llama.cpp would read as one prompt).
JOIN = "\n"


def read_token_stream(path: str | Path, *, field: str = "text", tokenize: Tokenize | None = None,
                      field_hint: str = FIELD_HINT) -> list[int]:
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
        for ids, _ in text_document(path, tokenize):
            return list(ids)
        raise InputError(f"{path} holds no documents", hint="give a file with text to score")
    texts: list[str] = []
    ids: list[int] = []
    for value, where in jsonl_records(path, field, field_hint=field_hint):
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
            raise no_tokenizer(path)
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


def no_tokenizer(path: Path) -> InputError:
    return InputError(
        f"{path} holds text but no tokenizer is available",
        hint="pass --tokenizer (a tokenizer.json or model directory) or pre-tokenized input_ids",
    )
