"""``mlcompress train``: train a plain model of a task, the starting point for compression."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console

from mlcompress.cli import app, options
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
    from mlcompress.tasks import get_task
    from mlcompress.tasks.training import train_to_file

    if output is None:
        raise UsageError("say where to save the model", hint="pass -o model.pt")
    out = Output(json, quiet)
    chosen = get_task(task, data)
    with out.progress(f"training {chosen.name}", total=None) as advance:
        summary = train_to_file(
            chosen, output, force=force, epochs=epochs, steps=steps, lr=lr, batch_size=batch_size,
            seed=seed, device=device,
            progress=lambda step, total, loss: advance(1, rate=f"loss {loss:.4f}"),
        )

    def render(console: Console) -> None:
        console.print(
            f"wrote {summary['output']}: {summary['task']}, {summary['parameters']:,} parameters, "
            f"{summary['steps']} steps in {summary['seconds']:.1f} s; test {summary['metric_name']} "
            f"{summary[summary['metric_name']]:.4f}, test loss {summary['test_loss']:.4f}"
        )

    out.result(summary, render)
