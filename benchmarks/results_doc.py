"""Benchmarks that write their tables into docs/results.md keep each between two markers.

Why markers: a rerun replaces exactly its own block, and everything written by hand around it
(and the other benchmarks' blocks) stays as it is.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def put_between_markers(name: str, text: str, heading: str = "", path: Path = RESULTS) -> None:
    """Replace the block between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` by
    ``text``; when the markers are not there yet, append them (under ``heading``, if given)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = path.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    path.write_text(doc)
    print(f"wrote the {name} table into {path}")


def interpreter() -> str:
    """The running python as the reader would type it: relative to the checkout when it is a
    virtualenv inside it (``.venv``, or a peers' venv under ``runs/``)."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(RESULTS.parents[1]))
    except ValueError:
        return "python"


def record_run(name: str, command: str, seconds: float, text: str, heading: str = "") -> None:
    """Put ``text`` between ``name``'s markers, after a line saying how it was measured: the
    command, the machine and the wall time (every benchmark's table carries them)."""
    import torch  # the benchmarks all run torch; imported here so put_between_markers stays light

    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU, torch {torch.__version__}"
    put_between_markers(name, f"Command: `{interpreter()} {command}`. Machine: {machine}. "
                        f"Wall time {seconds / 60:.1f} min.\n\n{text}", heading=heading)
