"""``mlcompress quantize``: data-free integer quantization, L² against a target ratio, or a
low-precision float conversion (``--float``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console

from mlcompress import api
from mlcompress.cli import options, select
from mlcompress.cli.app import app
from mlcompress.codecs.quant.rdo import DEFAULT_LAMBDA
from mlcompress.distributed import main_process, refuse_if_launched
from mlcompress.selection import selection_of
from mlcompress.errors import UsageError
from mlcompress.cli.output import Output, human_bytes

#: Options that choose an integer grid, so they contradict ``--float`` (by their parameter names).
_INTEGER_ONLY = {"method": "--method", "bits": "--bits", "group_size": "--group-size", "symmetric": "--symmetric",
                 "step": "--step", "allocation": "--allocation", "rdo_lambda": "--rdo-lambda", "dq": "--dq",
                 "target_ratio": "--target-ratio", "calib_samples": "--calib-samples", "kernel": "--kernel"}


def _given(ctx: typer.Context, names: dict[str, str]) -> list[str]:
    """The flags among ``names`` that the command line set (not left at their defaults)."""
    return [flag for name, flag in names.items()
            if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]


@app.command()
def quantize(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="Checkpoint: .pt/.pth/.bin, .safetensors, TorchScript, or a Hugging Face model directory.")],
    method: Annotated[str, typer.Option("--method", help="uniform (data-free) or l2 (learned, needs --task).")] = "uniform",
    bits: Annotated[Optional[int], typer.Option("--bits", help="uniform: a fixed-width grid of this many bits per level, 1-16 (default 8 unless --step or --target-ratio).")] = None,
    step: Annotated[Optional[float], typer.Option("--step", help="uniform, entropy-constrained: the grid step of the tensor with the largest norm (others by --allocation).")] = None,
    allocation: Annotated[str, typer.Option("--allocation", help="--step/--target-ratio: auto (equal for transformers with LayerNorm/RMSNorm, norm otherwise), norm (steps proportional to each tensor's Frobenius norm) or equal (one step); hessian (needs --task): steps from each tensor's Fisher diagonal on the task's calibration inputs, step ∝ mean(F)^-1/2, and with --per-channel/--group-size each group's (never coarser than the RMS scaling).")] = "auto",
    rdo_lambda: Annotated[float, typer.Option("--rdo-lambda", help="--step/--target-ratio: rate-distortion optimised rounding, weight in step^2 per bit (default 0: nearest rounding, measured best for the output; ln2/6 ≈ 0.1155 is the high-rate slope, lowest weight error). With --dq: the trellis's rate weight.")] = DEFAULT_LAMBDA,
    dq: Annotated[bool, typer.Option("--dq", help="--step/--target-ratio: dependent (trellis-coded) quantization, two interleaved grids and a 4-state machine as in VVC/NNC (docs/quantize.md).")] = False,
    per_channel: Annotated[bool, typer.Option("--per-channel", help="uniform and fp8: one scale (and zero-point) per output channel.")] = False,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="uniform: one scale/zero-point per N consecutive weights of a channel.")] = None,
    symmetric: Annotated[bool, typer.Option("--symmetric", help="uniform: levels -M..M with zero-point 0.")] = False,
    float_format: Annotated[Optional[str], typer.Option("--float", help="Instead of integer levels, round to a smaller float format: bf16, fp16 (every float32/float64 tensor), fp8-e4m3 or fp8-e5m2 (conv/linear weights, scaled per tensor or with --per-channel).", metavar="FORMAT")] = None,
    task: options.OptionalTask = None,
    data: options.DataDir = None,
    target_ratio: Annotated[Optional[float], typer.Option("--target-ratio", help="File size target, fp32 bytes / file bytes: uniform searches the entropy-constrained step for it; l2 trains for it (default 20).")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="l2 and --allocation hessian: calibration inputs taken from the task's training set.")] = 1000,
    kernel: Annotated[str, typer.Option("--kernel", help="l2: differentiable counter kernel: cos, linear or triangle.")] = "cos",
    output: options.Output = None,
    safetensors: Annotated[Optional[Path], typer.Option("--safetensors", help="Also write the dequantized weights here.", dir_okay=False)] = None,
    seed: options.Seed = 0,
    device: options.Device = "auto",
    include: select.Include = None,
    exclude: select.Exclude = None,
    force: options.Force = False,
    unsafe_pickle: options.UnsafePickle = False,
    json: options.Json = False,
    quiet: options.Quiet = False,
    debug: options.Debug = False,
) -> None:
    """Quantize a checkpoint into a .mrc file (levels entropy-coded) and report the real size."""
    if float_format is not None or method != "l2":  # only L² shards its work under torchrun
        refuse_if_launched("quantize --float" if float_format is not None else f"quantize --method {method}")
    out = Output(json and main_process(), quiet or not main_process())  # under torchrun, process 0 speaks
    if float_format is not None:
        conflicting = _given(ctx, _INTEGER_ONLY)
        if conflicting:
            raise UsageError(f"--float does not combine with {', '.join(conflicting)}",
                             hint="--float rounds to a float format; the others choose an integer grid")
        chosen: api.Method = api.Float(format=float_format, per_channel=per_channel, task=task,
                                       data=str(data) if data is not None else None, device=device,
                                       select=selection_of(include, exclude))
        chosen.validate()  # before torch is imported: a usage error answers at once
    elif method == "uniform":
        chosen = api.Quant(bits=bits, symmetric=symmetric, per_channel=per_channel, group_size=group_size,
                           step=step, target_ratio=target_ratio, allocation=allocation, rdo_lambda=rdo_lambda,
                           task=task, data=str(data) if data is not None else None, device=device,
                           select=selection_of(include, exclude), calib_samples=calib_samples, dq=dq)
        chosen.validate()  # before torch is imported: a usage error answers at once
    elif method == "l2":
        given = _given(ctx, {"step": "--step", "bits": "--bits", "allocation": "--allocation", "rdo_lambda": "--rdo-lambda",
                             "dq": "--dq"})
        if given:
            raise UsageError(f"--method l2 does not take {', '.join(given)}", hint="L² learns its own step and dead zone")
        if include or exclude:
            raise UsageError("--include/--exclude apply to data-free quantization and --float",
                             hint="L² trains the transform of every conv/linear weight together")
        chosen = api.L2(task=task or "", data=str(data) if data is not None else None,
                        target_ratio=api.L2.target_ratio if target_ratio is None else target_ratio,
                        calib_samples=calib_samples, kernel=kernel, seed=seed, device=device)
    else:
        raise UsageError(f"unknown method {method!r}", hint="use one of: uniform, l2")
    with out.tracker() as progress:
        summary = api.encode(model, output, method=chosen, force=force, unsafe_pickle=unsafe_pickle,
                             progress=progress, dequantized=safetensors).to_json()

    def render(console: Console) -> None:
        if summary["method"] == "float":
            scales = (" per-channel" if summary["per_channel"] else " per-tensor") if "fp8" in summary["format"] else ""
            what, extra = f"{summary['format']}{scales}", f"{summary['quantized_tensors']} tensors converted"
        else:
            what = {"uniform": lambda: f"{summary['bits']}-bit uniform",
                    "step": lambda: f"entropy-constrained, step {summary['step']:.4g} ({summary['allocation']} allocation"
                                    + (", dependent quantization)" if summary.get("dq") else ")"),
                    }.get(summary["method"], lambda: f"L² (target {summary['target_ratio']:g}x)")()
            extra = f"sparsity {summary['sparsity']:.1%}"
        console.print(
            f"wrote {summary['output']}: {what}, {human_bytes(summary['fp32_bytes'])} fp32 -> "
            f"{human_bytes(summary['file_bytes'])} ({summary['ratio']:.2f}x); "
            f"{summary['bits_per_quantized_weight']:.3f} bits per quantized weight stored, {extra}"
        )
        if "metric_before" in summary:
            console.print(
                f"test {summary['metric']}: {summary['metric_before']:.4f} before, {summary['metric_after']:.4f} after"
            )
        if "safetensors" in summary:
            console.print(f"wrote {summary['safetensors']} (dequantized weights)")

    out.result(summary, render)
