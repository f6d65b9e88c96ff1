"""How a command shows the library's progress: one rate and ETA per phase, on that phase's clock.

A long command runs in phases (loading, REC setup, REC blocks, lossless tensors, scoring...).
A rate that counts from the start of the command mixes them: after a 249 s setup, a bar over
blocks showed a third of the real blocks/s. So every phase has its own :class:`PhaseMeter`,
started by the phase's first :class:`~mlcompress.progress.Update`, and its rate counts from the
last update before the phase first moved (a phase that announces ``0/N`` and then prepares is
not charged for preparing). ETA = what remains / that rate.

Two views share the meters:

* :class:`Bars`, on an interactive stderr: one rich bar per phase (count, rate, the phase's
  elapsed time, ETA); a phase that completes shows ``done`` and keeps its final time.
* :class:`LogLines`, on a stderr that is not a terminal (CI, nohup, a pipe): one plain line per
  phase at most every :data:`PROGRESS_INTERVAL_S` seconds (``MLCOMPRESS_PROGRESS_INTERVAL``
  overrides it, 0 for every update), and one when a phase completes if it took longer than that::

      REC blocks: 52000/15500000 blocks (0.3%), 9012 blocks/s, ETA 28:35

Unknown figures (no total, no movement yet) are left out, never guessed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from rich.console import Console, RenderableType
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from mlcompress.errors import UsageError
from mlcompress.progress import Update

#: Seconds between two log lines of one phase when stderr is not a terminal.
PROGRESS_INTERVAL_S = 10.0
#: The environment variable that overrides :data:`PROGRESS_INTERVAL_S` (seconds, a float >= 0).
INTERVAL_VARIABLE = "MLCOMPRESS_PROGRESS_INTERVAL"
#: A rate over less time than this is noise (the first blocks of a phase): not shown.
MIN_RATE_SPAN_S = 0.5

Clock = Callable[[], float]


def progress_interval() -> float:
    """:data:`PROGRESS_INTERVAL_S`, or the value of ``MLCOMPRESS_PROGRESS_INTERVAL``."""
    text = os.environ.get(INTERVAL_VARIABLE, "").strip()
    if not text:
        return PROGRESS_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise UsageError(f"{INTERVAL_VARIABLE}={text!r} is not a number of seconds",
                         hint=f"set seconds >= 0, 0 for a line per update, or unset it for the default {PROGRESS_INTERVAL_S:g} s")
    return value


@dataclass
class PhaseMeter:
    """Where one phase stands, on its own clock: started at its first update."""

    started: float
    done: float
    total: float | None = None
    now: float = 0.0
    #: ``(time, done)`` the rate counts from: the last update before the phase first moved.
    origin: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def begin(cls, update: Update, now: float) -> "PhaseMeter":
        return cls(started=now, done=update.done, total=update.total, now=now, origin=(now, update.done))

    def observe(self, update: Update, now: float) -> None:
        if update.done == self.origin[1]:  # not moved yet: whatever it prepares is not its rate
            self.origin = (now, update.done)
        self.done, self.total, self.now = update.done, update.total, now

    @property
    def elapsed(self) -> float:
        return self.now - self.started

    @property
    def rate(self) -> float | None:
        """Units per second since the phase first moved; None until there is something to measure."""
        span, moved = self.now - self.origin[0], self.done - self.origin[1]
        return moved / span if span >= MIN_RATE_SPAN_S and moved > 0 else None

    @property
    def eta(self) -> float | None:
        rate = self.rate
        if rate is None or self.total is None:
            return None
        return max(self.total - self.done, 0.0) / rate

    @property
    def finished(self) -> bool:
        return self.total is not None and self.done >= self.total


@dataclass
class PhaseMeters:
    """A meter per phase name. A phase whose count goes backwards runs again (a new round of
    training, a second pass) and starts a new meter."""

    meters: dict[str, PhaseMeter] = field(default_factory=dict)

    def observe(self, update: Update, now: float) -> tuple[PhaseMeter, bool]:
        """The phase's meter after ``update``, and whether this update (re)started the phase."""
        meter = self.meters.get(update.phase)
        if meter is None or update.done < meter.done:
            meter = self.meters[update.phase] = PhaseMeter.begin(update, now)
            return meter, True
        meter.observe(update, now)
        return meter, False


def count(value: float) -> str:
    return f"{int(value)}" if float(value).is_integer() else f"{value:.4g}"


def per_second(rate: float) -> str:
    """A rate with as many digits as it has meaning: 9012, 45.2, 3.14, 0.012."""
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}" if rate >= 0.1 else f"{rate:.2g}"


def clock_time(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _progress(meter: PhaseMeter, unit: str) -> str:
    """``done/total unit (pct%)``, or ``done unit`` without a total."""
    if meter.total is None:
        return f"{count(meter.done)} {unit}".rstrip()
    shown = f"{count(meter.done)}/{count(meter.total)} {unit}".rstrip()
    return f"{shown} ({100.0 * meter.done / meter.total:.1f}%)" if meter.total > 0 else shown


def _rate(meter: PhaseMeter, unit: str) -> str:
    rate = meter.rate
    return "" if rate is None else f"{per_second(rate)} {unit}/s" if unit else f"{per_second(rate)}/s"


def _figures(info: Mapping[str, Any]) -> list[str]:
    """The phase's live numbers (a loss, a KL) as ``name value``; other info is for the caller."""
    return [f"{k} {v:.4g}" for k, v in info.items() if isinstance(v, float)]


def log_line(phase: str, meter: PhaseMeter, unit: str, info: Mapping[str, Any]) -> str:
    """One plain line: ``phase: done/total unit (pct%), rate unit/s, ETA m:ss[, figures]``;
    ``done in m:ss`` instead of the ETA once the phase is complete."""
    eta = meter.eta
    ending = f"done in {clock_time(meter.elapsed)}" if meter.finished else f"ETA {clock_time(eta)}" if eta is not None else ""
    parts = [_progress(meter, unit), _rate(meter, unit), ending, *_figures(info)]
    return f"{phase}: " + ", ".join(p for p in parts if p)


class LogLines:
    """The view without a terminal: a line per phase every ``interval`` seconds at most, plus
    its completion when it lasted longer than that. ``write`` gets whole lines."""

    def __init__(self, write: Callable[[str], None], interval: float, clock: Clock = time.monotonic) -> None:
        self.write, self.interval, self.clock = write, interval, clock
        self.meters = PhaseMeters()
        self.last_line: dict[str, float] = {}
        self.closed: set[str] = set()

    def __call__(self, update: Update) -> None:
        now = self.clock()
        meter, fresh = self.meters.observe(update, now)
        if fresh:
            self.last_line[update.phase] = now
            self.closed.discard(update.phase)
        if update.phase in self.closed:
            return
        due = now - self.last_line[update.phase] >= self.interval
        if due or (meter.finished and meter.elapsed > self.interval):
            self.write(log_line(update.phase, meter, update.unit, update.info))
            self.last_line[update.phase] = now
        if meter.finished:
            self.closed.add(update.phase)


class _Board(RichProgress):
    """rich's progress display, with room below the bars for one live detail (fit-posterior's
    table of losses and KL), drawn from the latest update at each refresh."""

    def __init__(self, *columns: Any, detail: Callable[[Update], RenderableType | None] | None = None,
                 **kwargs: Any) -> None:
        self.detail = detail  # set before rich's __init__, which renders once
        self.latest: Update | None = None
        self.shown: RenderableType | None = None
        super().__init__(*columns, **kwargs)

    def get_renderables(self):  # noqa: ANN201 - rich's signature
        yield from super().get_renderables()
        latest = self.latest
        if self.detail is not None and latest is not None:
            made = self.detail(latest)
            self.shown = made if made is not None else self.shown
        if self.shown is not None:
            yield self.shown


class Bars:
    """The view on a terminal: a context manager whose instance receives updates and keeps one
    bar per phase. ``detail(update)`` may return something to draw below the bars (None keeps
    what it returned last). Phases still open when the command succeeds are shown as done."""

    def __init__(self, console: Console, detail: Callable[[Update], RenderableType | None] | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.meters = PhaseMeters()
        self.tasks: dict[str, Any] = {}
        self.board = _Board(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[progress]}"),
            TextColumn("{task.fields[figures]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console, transient=False, get_time=clock, detail=detail,
        )

    def __enter__(self) -> "Bars":
        self.board.start()
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is None:  # the command got through every phase it started
            for task in self.tasks.values():
                self.board.stop_task(task)
                self.board.update(task, eta="done")
        self.board.stop()

    def __call__(self, update: Update) -> None:
        meter, fresh = self.meters.observe(update, self.clock())
        eta = meter.eta
        shown = dict(
            completed=update.done, total=update.total, progress=_progress(meter, update.unit),
            figures=" ".join(p for p in [_rate(meter, update.unit), *_figures(update.info)] if p),
            eta="done" if meter.finished else f"ETA {clock_time(eta)}" if eta is not None else "",
        )
        task = self.tasks.get(update.phase)
        if task is None:
            task = self.tasks[update.phase] = self.board.add_task(update.phase, **shown)
        else:
            if fresh:
                self.board.reset(task, total=update.total)
            self.board.update(task, **shown)
        if meter.finished:
            self.board.stop_task(task)
        if self.board.detail is not None:
            self.board.latest = update
