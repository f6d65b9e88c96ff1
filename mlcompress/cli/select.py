"""``--include GLOB`` / ``--exclude GLOB``: the options every lossy command shares, defined once.

The rules are :mod:`mlcompress.selection`'s (shell globs on whole names, exclusion wins, ties
are one tensor, a glob that matches nothing is an error).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Include = Annotated[
    Optional[list[str]],
    typer.Option("--include", metavar="GLOB", show_default=False,
                 help="Compress only tensors whose name matches this shell glob (repeatable; * also matches dots). "
                 "The others are stored losslessly."),
]
Exclude = Annotated[
    Optional[list[str]],
    typer.Option("--exclude", metavar="GLOB", show_default=False,
                 help="Never compress tensors whose name matches this shell glob (repeatable; wins over --include); "
                 "they are stored losslessly."),
]

