"""The Typer application every command module registers itself on."""

from __future__ import annotations

from typing import Optional

import typer

from mlcompress.version import __version__

app = typer.Typer(
    name="mlcompress",
    help="Compress trained PyTorch models into small .mrc files, restore them, and measure what it cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlcompress {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Compress trained PyTorch models into small .mrc files, restore them, and measure what it cost."""
