"""The single place a command writes to: rich for people, one JSON object for machines.

Results go to stdout; progress and logs go to stderr, never stdout. Progress is a bar per phase
on a terminal and a plain line every ~10 s per phase otherwise (CI, nohup, pipes), and nothing
with ``--json`` or ``--quiet`` (:mod:`mlcompress.cli.progress_display`). Written to a file or a
pipe, lines are never wrapped or cut at 80 columns: logs and tables keep their natural width.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any, Callable, Iterator

from rich.console import Console, RenderableType

from mlcompress.cli.progress_display import Bars, LogLines, progress_interval
from mlcompress.progress import Progress, Update

#: Columns of stdout and stderr when they are not terminals: no table or line of ours comes near.
PIPED_WIDTH = 100_000


def _plain(value: Any) -> Any:
    """Make a value JSON-safe: non-finite floats become null, tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Output:
    def __init__(self, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.out = _console(stderr=False)
        self.err = _console(stderr=True)

    @property
    def interactive(self) -> bool:
        return not (self.json_mode or self.quiet) and sys.stderr.isatty()

    def log(self, message: str) -> None:
        """A line for people on stderr (hidden with --quiet)."""
        if not self.quiet:
            self.err.print(message)

    def result(self, data: dict[str, Any], render: Callable[[Console], None] | None = None) -> None:
        """Emit the command's result: JSON on stdout with --json, else ``render`` (or nothing)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(_plain(data), allow_nan=False) + "\n")
            sys.stdout.flush()
        elif not self.quiet and render is not None:
            render(self.out)

    @contextlib.contextmanager
    def tracker(self, detail: Callable[[Update], RenderableType | None] | None = None) -> Iterator[Progress]:
        """A receiver for the library's :class:`~mlcompress.progress.Update` s, each phase's rate
        and ETA on its own clock: bars on an interactive stderr (``detail(update)`` may add a
        live renderable below them), log lines on any other stderr, nothing with --json or
        --quiet."""
        if self.json_mode or self.quiet:
            yield _ignore
        elif self.interactive:
            with Bars(self.err, detail) as bars:
                yield bars
        else:
            yield LogLines(_stderr_line, progress_interval())


def _ignore(update: Update) -> None:
    """The receiver when nothing may be shown."""


def _stderr_line(line: str) -> None:
    """A log line as it is: no markup, no wrapping, flushed at once (a log tailed while it runs)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _console(stderr: bool) -> Console:
    """A console for stdout or stderr; off a terminal, wide enough that nothing wraps or is cut."""
    width = None if Console(stderr=stderr).is_terminal else PIPED_WIDTH
    return Console(stderr=stderr, highlight=False, width=width)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
