"""``mlcompress prune``: zero the smallest (or random) weights, optionally fine-tune, store compactly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlcompress import api
from mlcompress.cli import options
from mlcompress.cli.app import app
from mlcompress.cli.output import Output, human_bytes


@app.command()
def prune(
    model: Annotated[Path, typer.Argument(help="Checkpoint: .pt/.pth/.bin, .safetensors, TorchScript, or a Hugging Face model directory.")],
    sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of conv/linear weights to zero, in [0, 1).")],
    method: Annotated[str, typer.Option("--method", help="magnitude (smallest |w|) or random.")] = "magnitude",
    scope: Annotated[str, typer.Option("--scope", help="global (rank all weights together) or layer (same fraction per tensor).")] = "global",
    task: options.OptionalTask = None,
    data: options.DataDir = None,
    finetune_steps: Annotated[int, typer.Option("--finetune-steps", help="Fine-tune this many steps on --task with the pruned weights held at zero.")] = 0,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Also quantize the pruned weights (uniform, 1-16 bits) in the .mrc.")] = None,
    output: options.Output = None,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    force: options.Force = False,
    unsafe_pickle: options.UnsafePickle = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Prune a checkpoint; write .mrc (entropy-coded, zeros nearly free) or .safetensors/.pt."""
    out = Output(json, quiet)
    chosen = api.Prune(sparsity=sparsity, method=method, scope=scope, task=task,
                       data=str(data) if data is not None else None, finetune_steps=finetune_steps, bits=bits,
                       seed=seed, device=device)
    with out.tracker() as progress:
        summary = api.encode(model, output, method=chosen, force=force, unsafe_pickle=unsafe_pickle,
                             progress=progress).to_json()

    def render(console: Console) -> None:
        console.print(
            f"wrote {summary['output']}: {summary['method']} pruning ({summary['scope']}), sparsity "
            f"{summary['achieved_sparsity']:.1%}; {human_bytes(summary['fp32_bytes'])} fp32 -> "
            f"{human_bytes(summary['file_bytes'])} ({summary['ratio']:.2f}x)"
        )
        if "metric_before" in summary:
            console.print(
                f"test {summary['metric']}: {summary['metric_before']:.4f} before, {summary['metric_after']:.4f} after"
            )

    out.result(summary, render)
