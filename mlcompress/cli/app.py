"""The Typer application every command module registers itself on."""

from __future__ import annotations

from typing import Optional

import typer

from mlcompress.distributed import refuse_if_launched
from mlcompress.version import __version__

#: The commands that shard their work under torchrun (docs/scale.md); the others would only run
#: N copies racing on one output file. ``quantize`` shards ``--method l2`` only and refuses its
#: one-pass methods itself.
SHARDED_COMMANDS = ("encode", "diverge", "fit-posterior", "quantize")

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
    ctx: typer.Context,
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Compress trained PyTorch models into small .mrc files, restore them, and measure what it cost."""
    if ctx.invoked_subcommand not in SHARDED_COMMANDS:
        refuse_if_launched(f"mlcompress {ctx.invoked_subcommand}")
