"""One wording for "this file cannot be read as X", whatever the underlying library raised.

torch, safetensors and zipfile report damaged files with a zoo of exception types and multi-line
messages. Users get one line naming the file, the format tried and the library's first line; the
original exception stays chained for ``--debug``.
"""

from __future__ import annotations

from pathlib import Path

from mlcompress.errors import CheckpointError


def unreadable(path: Path, kind: str, exc: BaseException) -> CheckpointError:
    """The error to raise (``from exc``) when ``path`` cannot be read as ``kind``."""
    return CheckpointError(
        f"cannot read {path} as {kind}: {first_line(exc)}",
        hint=f"the file is damaged or not a {kind} file",
    )


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, at most 200 characters."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:200]
    return type(exc).__name__
