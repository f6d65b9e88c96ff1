"""``mlcompress encode``: checkpoint -> ``.mrc``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mlcompress.cli import app, options
from mlcompress.cli.output import Output, human_bytes
from mlcompress.errors import UsageError


@app.command()
def encode(
    model: Annotated[Path, typer.Argument(help="Checkpoint: .pt/.pth/.bin, .safetensors, TorchScript, or a Hugging Face model directory.")],
    output: options.Output = None,
    lossless: Annotated[bool, typer.Option("--lossless", help="Store every tensor bit-exactly (entropy-coded float bit fields).")] = False,
    force: options.Force = False,
    unsafe_pickle: options.UnsafePickle = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Compress a checkpoint into a .mrc container."""
    from mlcompress.encode import encode_lossless

    out = Output(json, quiet)
    if not lossless:
        raise UsageError("choose how to encode", hint="pass --lossless")
    with out.progress("encoding", total=None) as advance:
        summary = encode_lossless(model, output, force=force, unsafe_pickle=unsafe_pickle, progress=advance)

    def render(console: Console) -> None:
        console.print(
            f"wrote {summary['output']}: {summary['tensors']} tensors, "
            f"{human_bytes(summary['original_bytes'])} -> {human_bytes(summary['file_bytes'])} "
            f"({summary['ratio']:.3f}x, lossless) in {summary['seconds']:.2f} s"
        )

    out.result(summary, render)
