"""The one progress callback every long-running call accepts: ``progress(Update)``.

An :class:`Update` names its phase (``"REC blocks"``, ``"tensors"``, ``"fit"``...) and says how
far it is, absolutely (``done`` of ``total``), so a receiver can compute honest rates over each
phase on its own clock, skip updates, or start listening midway. ``info`` carries the phase's
live figures (a training loss, a KL); receivers may ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class Update:
    phase: str
    done: float
    total: float | None = None
    unit: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)


Progress = Callable[[Update], None]


def report(progress: Progress | None, phase: str, done: float, total: float | None = None, unit: str = "",
           **info: Any) -> None:
    """Send one update to ``progress`` if there is a receiver."""
    if progress is not None:
        progress(Update(phase, done, total, unit, info))
