"""Errors that mlcompress reports to its users.

Every failure a user can cause (a bad file, a bad option, a budget that cannot be met) is raised
as a subclass of :class:`MlcompressError`. The CLI maps these to a one-line ``error: ...`` message
and an exit code, and never shows a traceback for them; anything else is a bug in mlcompress and
is reported as such. Keep messages to one line that says what is wrong and what to do.
"""

from __future__ import annotations


class MlcompressError(Exception):
    """Base class of every user-facing error. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint joined on one line, as the CLI prints them."""
        text = " ".join(str(self).split())
        if self.hint:
            text = f"{text} ({' '.join(self.hint.split())})"
        return text


class UsageError(MlcompressError):
    """The command line itself is wrong (conflicting or missing options)."""

    exit_code = 2


class InputError(MlcompressError):
    """An input file, option value or data set cannot be used as given."""


class CheckpointError(InputError):
    """A checkpoint cannot be read or written (unknown format, unsafe pickle, bad contents)."""


class MrcFormatError(InputError):
    """A ``.mrc`` container is malformed: truncated, damaged, or inconsistent with its header."""


class CodecError(MlcompressError):
    """A codec cannot encode the given tensor with the given options."""


class GateFailed(MlcompressError):
    """A measured value exceeded a user-set threshold (``--fail-above``); exit code 3 for CI."""

    exit_code = 3
