"""``mlcompress quantize``: data-free integer quantization or L² against a target ratio."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mlcompress import api
from mlcompress.cli import options
from mlcompress.cli.app import app
from mlcompress.errors import UsageError
from mlcompress.cli.output import Output, human_bytes


@app.command()
def quantize(
    model: Annotated[Path, typer.Argument(help="Checkpoint: .pt/.pth/.bin, .safetensors, TorchScript, or a Hugging Face model directory.")],
    method: Annotated[str, typer.Option("--method", help="uniform (data-free) or l2 (learned, needs --task).")] = "uniform",
    bits: Annotated[int, typer.Option("--bits", help="uniform: bits per weight, 1-16.")] = 8,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="uniform: one scale/zero-point per output channel.")] = False,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="uniform: one scale/zero-point per N consecutive weights of a channel.")] = None,
    symmetric: Annotated[bool, typer.Option("--symmetric", help="uniform: levels -M..M with zero-point 0.")] = False,
    task: options.OptionalTask = None,
    data: options.DataDir = None,
    target_ratio: Annotated[float, typer.Option("--target-ratio", help="l2: file size target, fp32 bytes / file bytes.")] = 20.0,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="l2: calibration inputs taken from the task's training set.")] = 1000,
    kernel: Annotated[str, typer.Option("--kernel", help="l2: differentiable counter kernel: cos, linear or triangle.")] = "cos",
    output: options.Output = None,
    safetensors: Annotated[Optional[Path], typer.Option("--safetensors", help="Also write the dequantized weights here.", dir_okay=False)] = None,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    force: options.Force = False,
    unsafe_pickle: options.UnsafePickle = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Quantize a checkpoint into a .mrc file (levels entropy-coded) and report the real size."""
    out = Output(json, quiet)
    if method == "uniform":
        chosen: api.Method = api.Quant(bits=bits, symmetric=symmetric, per_channel=per_channel, group_size=group_size,
                                       task=task, data=str(data) if data is not None else None, device=device)
    elif method == "l2":
        chosen = api.L2(task=task or "", data=str(data) if data is not None else None, target_ratio=target_ratio,
                        calib_samples=calib_samples, kernel=kernel, seed=seed, device=device)
    else:
        raise UsageError(f"unknown method {method!r}", hint="use one of: uniform, l2")
    with out.tracker() as progress:
        summary = api.encode(model, output, method=chosen, force=force, unsafe_pickle=unsafe_pickle,
                             progress=progress, dequantized=safetensors).to_json()

    def render(console: Console) -> None:
        what = f"{summary['bits']}-bit uniform" if summary["method"] == "uniform" else f"L² (target {summary['target_ratio']:g}x)"
        console.print(
            f"wrote {summary['output']}: {what}, {human_bytes(summary['fp32_bytes'])} fp32 -> "
            f"{human_bytes(summary['file_bytes'])} ({summary['ratio']:.2f}x); "
            f"{summary['bits_per_quantized_weight']:.3f} bits per quantized weight stored, "
            f"sparsity {summary['sparsity']:.1%}"
        )
        if "metric_before" in summary:
            console.print(
                f"test {summary['metric']}: {summary['metric_before']:.4f} before, {summary['metric_after']:.4f} after"
            )
        if "safetensors" in summary:
            console.print(f"wrote {summary['safetensors']} (dequantized weights)")

    out.result(summary, render)
