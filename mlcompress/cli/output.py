"""The single place a command writes to: rich for people, one JSON object for machines.

Results go to stdout; progress bars and logs go to stderr. Progress is shown only when stderr is
a terminal and neither ``--json`` nor ``--quiet`` is given, so pipelines and CI logs stay clean.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from mlcompress.progress import Progress, Update


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
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

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
    def tracker(self) -> Iterator[Progress]:
        """A receiver for the library's :class:`~mlcompress.progress.Update` s: one bar per
        phase on an interactive stderr (rates measured over that phase alone), else nothing."""
        if not self.interactive:
            yield lambda update: None
            return
        bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )
        phases: dict[str, tuple[Any, float, float]] = {}
        with bar:
            def receive(update: Update) -> None:
                if update.phase not in phases:
                    task = bar.add_task(update.phase, total=update.total, rate="")
                    phases[update.phase] = (task, time.perf_counter(), update.done)
                task, started, first = phases[update.phase]
                elapsed = time.perf_counter() - started
                figures = [f"{(update.done - first) / elapsed:.1f} {update.unit}/s"] if update.unit and elapsed > 0.5 else []
                figures += [f"{k} {v:.4g}" for k, v in update.info.items() if isinstance(v, float)]
                bar.update(task, completed=update.done, total=update.total, rate=" ".join(figures))

            yield receive


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
