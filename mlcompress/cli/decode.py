"""``mlcompress decode``: ``.mrc`` -> safetensors or .pt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mlcompress import api
from mlcompress.cli import options
from mlcompress.cli.app import app
from mlcompress.cli.output import Output, human_bytes


@app.command()
def decode(
    container: Annotated[Path, typer.Argument(help="A .mrc file.")],
    output: options.Output = None,
    force: options.Force = False,
    device: options.Device = "auto",
    threads: options.Threads = None,
    keep_dtype: Annotated[bool, typer.Option("--keep-dtype", help="Write --float tensors in their low-precision dtype (bf16, fp16, or fp8 with a float32 <name>_scale beside each) instead of the dtype they were encoded from.")] = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Restore the weights of a .mrc file (default: beside it, as .safetensors)."""
    out = Output(json, quiet)
    report = api.decode_file(container, output, force=force, device=device, keep_dtype=keep_dtype, threads=threads)
    summary = {**report.details, "output": str(report.path), "tensors": report.tensors,
               "parameters": report.parameters, "seconds": report.seconds}

    def render(console: Console) -> None:
        console.print(
            f"wrote {summary['output']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
            f"{human_bytes(summary['output_bytes'])} in {summary['seconds']:.2f} s"
        )

    out.result(summary, render)
