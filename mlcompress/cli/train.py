"""``mlcompress train``: train a plain model of a task, the starting point for compression."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

from mlcompress import api
from mlcompress.cli import options
from mlcompress.cli.app import app
from mlcompress.cli.output import Output
from mlcompress.errors import UsageError


@app.command()
def train(
    task: options.TaskName,
    output: options.Output = None,
    data: options.DataDir = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Passes over the training set (default: the task's).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimiser steps instead of --epochs.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam learning rate (default: the task's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Batch size (default: the task's).")] = None,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    force: options.Force = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Train a model of --task and save its weights (-o model.pt or .safetensors)."""
    if output is None:
        raise UsageError("say where to save the model", hint="pass -o model.pt")
    out = Output(json, quiet)
    with out.tracker() as progress:
        summary = api.train(task, output, data=data, force=force, progress=progress, epochs=epochs, steps=steps,
                            lr=lr, batch_size=batch_size, seed=seed, device=device)

    def render(console: Console) -> None:
        console.print(
            f"wrote {summary['output']}: {summary['task']}, {summary['parameters']:,} parameters, "
            f"{summary['steps']} steps in {summary['seconds']:.1f} s; test {summary['metric_name']} "
            f"{summary[summary['metric_name']]:.4f}, test loss {summary['test_loss']:.4f}"
        )

    out.result(summary, render)
