"""``mlcompress decode``: ``.mrc`` -> safetensors, .pt, or a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlcompress import api
from mlcompress.cli import options
from mlcompress.cli.app import app
from mlcompress.cli.output import Output, human_bytes

# A string, not a Path: a trailing "/" (a directory output) must survive parsing.
DecodeOutput = Annotated[Optional[str], typer.Option(
    "--output", "-o", show_default=False,
    help="Output: a .safetensors or .pt file (default: beside the .mrc, as .safetensors), or a directory "
         "(ending in / or existing) for a Hugging Face model directory that from_pretrained loads.")]


@app.command()
def decode(
    container: Annotated[Path, typer.Argument(help="A .mrc file.")],
    output: DecodeOutput = None,
    like: Annotated[Optional[Path], typer.Option("--like", show_default=False, help="Directory output: the model directory the .mrc came from; its tokenizer and other small files are copied (needed when the .mrc keeps no config.json).")] = None,
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size", show_default=False, help="Directory output: split the weights into shards of at most this size (500MB, 2GB; default 50GB, as transformers).")] = None,
    force: options.Force = False,
    device: options.Device = "auto",
    threads: options.Threads = None,
    keep_dtype: Annotated[bool, typer.Option("--keep-dtype", help="Write --float tensors in their low-precision dtype (bf16, fp16, or fp8 with a float32 <name>_scale beside each) instead of the dtype they were encoded from.")] = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Restore the weights of a .mrc file (default: beside it, as .safetensors), one tensor at a time."""
    out = Output(json, quiet)
    with out.tracker() as progress:
        report = api.decode_file(container, output, force=force, device=device, keep_dtype=keep_dtype,
                                 threads=threads, like=like, max_shard_size=max_shard_size, progress=progress)
    summary = {**report.details, "output": str(report.path), "tensors": report.tensors,
               "parameters": report.parameters, "seconds": report.seconds}

    def render(console: Console) -> None:
        files = len(summary["output_files"])
        console.print(
            f"wrote {summary['output']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
            f"{human_bytes(summary['output_bytes'])}" + (f" ({files} files)" if files > 1 else "")
            + f" in {summary['seconds']:.2f} s"
        )

    out.result(summary, render)
