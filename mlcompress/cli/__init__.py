"""The ``mlcompress`` command line: a thin Typer layer over the library.

Each command lives in its own module and registers itself on :data:`app`. :func:`main` is the one
place that turns exceptions into exit codes: user errors (:class:`MlcompressError`) print a single
``error: ...`` line and exit with the error's code (1, or 3 for a failed gate); usage errors exit
2; anything else is a bug and says so. Tracebacks only with ``--debug`` or ``MLCOMPRESS_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
import traceback
import click
import typer

# Command modules register themselves on `app` when imported; one line per command.
from mlcompress.cli import decode as _decode  # noqa: F401
from mlcompress.cli import diverge as _diverge  # noqa: F401
from mlcompress.cli import encode as _encode  # noqa: F401
from mlcompress.cli import eval as _eval  # noqa: F401
from mlcompress.cli import fit_posterior as _fit_posterior  # noqa: F401
from mlcompress.cli import inspect as _inspect  # noqa: F401
from mlcompress.cli import prune as _prune  # noqa: F401
from mlcompress.cli import quantize as _quantize  # noqa: F401
from mlcompress.cli import train as _train  # noqa: F401
from mlcompress.cli.app import app
from mlcompress.errors import MlcompressError


def _debug_wanted(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MLCOMPRESS_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns (and exits with) the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="mlcompress", standalone_mode=False)
    except MlcompressError as exc:
        if _debug_wanted(argv):
            traceback.print_exc()
        sys.stderr.write(f"error: {exc.one_line()}\n")
        code = exc.exit_code
    except click.exceptions.Abort:
        sys.stderr.write("error: interrupted\n")
        code = 130
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        code = 130
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except Exception as exc:  # a bug in mlcompress, not the user's mistake
        if _debug_wanted(argv):
            traceback.print_exc()
        sys.stderr.write(
            f"error: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
            "(run with --debug for a traceback and report it)\n"
        )
        code = 1
    return 0 if code is None else int(code)
