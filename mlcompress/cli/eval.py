"""``mlcompress eval``: accuracy and loss of a checkpoint, ``.mrc`` or posterior file on a task."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mlcompress import api
from mlcompress.cli import options
from mlcompress.cli.app import app
from mlcompress.cli.output import Output


@app.command("eval")
def eval_command(
    file: Annotated[Path, typer.Argument(help="Weights: .pt/.safetensors/.mrc checkpoint or a posterior file.")],
    task: options.TaskName,
    data: options.DataDir = None,
    samples: Annotated[int, typer.Option("--samples", help="Posterior files: evaluate N weight draws instead of the mean.")] = 0,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    unsafe_pickle: options.UnsafePickle = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Evaluate FILE on the test set of --task: loss and accuracy."""
    out = Output(json, quiet)
    with out.tracker() as progress:
        summary = api.evaluate(task, file, data=data, samples=samples, seed=seed, device=device,
                               unsafe_pickle=unsafe_pickle, progress=progress)

    def render(console: Console) -> None:
        name = summary["metric_name"]
        how = ""
        if summary["kind"] == "posterior":
            how = f" (posterior, {summary['samples']} samples)" if summary["samples"] else " (posterior mean)"
        spread = f" ± {summary[name + '_std']:.4f}" if name + "_std" in summary else ""
        console.print(
            f"{summary['file']}{how} on {summary['task']}: {name} {summary[name]:.4f}{spread}, "
            f"loss {summary['loss']:.4f} over {summary['examples']} test examples"
        )

    out.result(summary, render)
