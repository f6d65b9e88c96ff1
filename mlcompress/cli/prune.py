"""``mlcompress prune``: remove the least important (or random) weights of a checkpoint or a
posterior file, optionally fine-tune, store compactly (docs/pruning.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlcompress import api
from mlcompress.cli import options
from mlcompress.cli.app import app
from mlcompress.cli.output import Output, human_bytes
from mlcompress.errors import UsageError
from mlcompress.selection import selection_of

Include = Annotated[Optional[list[str]], typer.Option(
    "--include", metavar="GLOB", show_default=False,
    help="Prune only tensors whose name matches (shell glob, repeatable); the others are stored unchanged.")]
Exclude = Annotated[Optional[list[str]], typer.Option(
    "--exclude", metavar="GLOB", show_default=False,
    help="Never prune tensors whose name matches (shell glob, repeatable; wins over --include).")]


@app.command()
def prune(
    model: Annotated[Path, typer.Argument(help="Checkpoint (.pt/.pth/.bin, .safetensors, TorchScript, a Hugging Face model directory, .mrc) or a posterior file (fit-posterior's output).")],
    sparsity: Annotated[float, typer.Option("--sparsity", help="Fraction of conv/linear weights to prune, in [0, 1).")],
    criterion: Annotated[Optional[str], typer.Option("--criterion", help="What goes first: random, magnitude (smallest |w|, or |mean - prior mean|) or kl (least KL to the prior; posterior files only). Default magnitude.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", hidden=True, help="Deprecated name of --criterion.")] = None,
    scope: Annotated[str, typer.Option("--scope", help="global (rank all weights together) or layer (same fraction per tensor).")] = "global",
    task: options.OptionalTask = None,
    data: options.DataDir = None,
    finetune_steps: Annotated[int, typer.Option("--finetune-steps", help="Fine-tune this many steps on --task with the pruned weights held at zero.")] = 0,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Also quantize the pruned weights (uniform, 1-16 bits) in the .mrc.")] = None,
    include: Include = None,
    exclude: Exclude = None,
    output: options.Output = None,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    force: options.Force = False,
    unsafe_pickle: options.UnsafePickle = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Prune a checkpoint or posterior; write .mrc (entropy-coded, pruned weights nearly free),
    .safetensors (a posterior stays a posterior, pruned variables set to their prior) or .pt."""
    out = Output(json, quiet)
    chosen = api.Prune(sparsity=sparsity, criterion=_criterion(criterion, method, out), scope=scope, task=task,
                       data=str(data) if data is not None else None, finetune_steps=finetune_steps, bits=bits,
                       seed=seed, device=device, select=selection_of(include, exclude))
    with out.tracker() as progress:
        summary = api.encode(model, output, method=chosen, force=force, unsafe_pickle=unsafe_pickle,
                             progress=progress).to_json()

    def render(console: Console) -> None:
        console.print(_headline(summary))
        if "metric_before" in summary:
            console.print(
                f"test {summary['metric']}: {summary['metric_before']:.4f} before, {summary['metric_after']:.4f} after"
            )

    out.result(summary, render)


def _criterion(criterion: str | None, method: str | None, out: Output) -> str:
    """``--criterion``, or the deprecated ``--method`` (with a warning); both only if they agree."""
    if method is not None:
        if criterion is not None and criterion != method:
            raise UsageError(f"--criterion {criterion} and --method {method} disagree", hint="pass --criterion only")
        out.log("warning: --method is deprecated for prune; use --criterion")
    return criterion or method or "magnitude"


def _headline(summary: dict) -> str:
    what = f"wrote {summary['output']}: {summary['criterion']} pruning ({summary['scope']})"
    if summary.get("output_kind") == "posterior":
        return (f"{what} of a posterior, {summary['achieved_sparsity']:.1%} of its coded variables set to their "
                f"prior; KL {summary['kl_bits_before']:.0f} -> {summary['kl_bits_after']:.0f} bits")
    return (f"{what}, sparsity {summary['achieved_sparsity']:.1%}; {human_bytes(summary['fp32_bytes'])} fp32 -> "
            f"{human_bytes(summary['file_bytes'])} ({summary['ratio']:.2f}x)")
