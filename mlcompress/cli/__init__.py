"""The ``mlcompress`` command line: a thin Typer layer over the library.

Each command lives in its own module and registers itself on :data:`app`. :func:`main` is the one
place that turns exceptions into exit codes: user errors (:class:`MlcompressError`) print a single
``error: ...`` line and exit with the error's code (1, or 3 for a failed gate); usage errors exit
2; anything else is a bug and says so. Tracebacks only with ``--debug`` or ``MLCOMPRESS_DEBUG=1``.

Click's own usage errors (a missing option or argument, a bad value, an unknown option) are
usage errors like ours: one ``error: ...`` line naming the command's ``--help``, exit 2. Click
would print three lines of usage banner instead, which CI logs and scripts cannot tell from output.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

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


#: What click >= 8.2 raises for a bare ``mlcompress``: its message is the help (older click exits 0).
_HELP_INSTEAD = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _click_usage(exc: BaseException | None) -> Any:
    """The click usage error behind ``exc``, if it is one or was raised while handling one.

    Recognised by what it is, not only by class: a Typer that vendors its own click raises
    usage errors that are not ``click.UsageError`` instances, and must still exit 2.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, click.UsageError) or (
            type(exc).__module__.split(".")[0] in ("click", "typer") and getattr(exc, "exit_code", None) == 2
            and callable(getattr(exc, "format_message", None))
        ):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _usage_line(exc: Any) -> str:
    """One line: click's message, and where the command's options are listed."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "mlcompress"
    return f"error: {' '.join(exc.format_message().split()).rstrip('.')} (see {where} --help)\n"


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
    except _HELP_INSTEAD as exc:  # `mlcompress` alone: the help is the answer
        exc.show()
        code = exc.exit_code
    except click.UsageError as exc:
        sys.stderr.write(_usage_line(exc))
        code = 2
    except click.ClickException as exc:
        sys.stderr.write(f"error: {' '.join(exc.format_message().split())}\n")
        code = exc.exit_code
    except Exception as exc:  # a bug in mlcompress, not the user's mistake
        usage = _click_usage(exc)
        if usage is not None:  # a usage error that surfaced wrapped in another exception
            sys.stderr.write(_usage_line(usage))
            return 2
        if _debug_wanted(argv):
            traceback.print_exc()
        sys.stderr.write(
            f"error: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
            "(run with --debug for a traceback and report it)\n"
        )
        code = 1
    return 0 if code is None else int(code)
