"""The library side of ``mlcompress quantize``: checkpoint -> quantized ``.mrc`` (and safetensors).

Three methods:

* ``uniform`` (data-free): every conv/linear weight quantized at ``bits`` with min/max
  scale/zero-point per tensor, channel or group (:mod:`mlcompress.codecs.quant.uniform`), or, with
  ``step``/``target_ratio``, entropy-constrained on a step grid chosen for the size
  (:mod:`mlcompress.quant.rate`, :mod:`mlcompress.codecs.quant.step`). A task is optional and only
  used to report accuracy before/after.
* ``l2``: the L² loop (:mod:`mlcompress.quant.calibrate`) against a target ratio; needs a task
  for the model architecture and the calibration inputs.
* ``float`` (data-free): low-precision conversion onto bf16, fp16 or fp8
  (:mod:`mlcompress.quant.low_precision` says which tensors); a task is optional, as for uniform.

Everything that can be wrong with the inputs (bit width, ratio, task/checkpoint mismatch, empty
calibration set, existing outputs) is checked before anything is written; files are written
atomically. The reported sizes are read back from the written file.

Streaming (docs/scale.md): the data-free methods that need no whole-model search -- ``--bits``,
``--step`` and ``--float``, without ``--task`` or ``--safetensors`` -- read the checkpoint one
tensor at a time and spool each payload as it is encoded, so memory is bounded by the largest
tensor (:func:`_quantize_streaming`). ``--target-ratio`` sizes trial files of the whole model,
and a task evaluates the whole model, so those hold it in memory.

Under torchrun only ``l2`` runs, data-parallel (:func:`mlcompress.quant.calibrate.l2_compress`):
every process reads the checkpoint and calibration data and trains on its share of each batch;
process 0 alone checks the destinations, evaluates, writes and reads back the files, and sends
its report to the others (so nothing races on an output). The other methods are one quick pass
with nothing to share out, so they refuse torchrun.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mlcompress.assembly import base_metadata, default_output
from mlcompress.atomic import check_destination
from mlcompress.checkpoint import load_checkpoint, save_checkpoint
from mlcompress.checkpoint.source import open_source
from mlcompress.codecs.quant import step as step_grid
from mlcompress.codecs.quant import uniform
from mlcompress.codecs.quant.rdo import DEFAULT_LAMBDA
from mlcompress.container import open_mrc, shared_storage_aliases, write_stream
from mlcompress.device import resolve_device
from mlcompress.distributed import SINGLE, join, refuse_if_launched
from mlcompress.errors import InputError, UsageError
from mlcompress.options import L2, Float, Quant
from mlcompress.progress import Progress, report
from mlcompress.quant.calibrate import L2Config, l2_compress
from mlcompress.codecs.low_precision import float_format as low_precision_format
from mlcompress.quant.low_precision import dequantize_float, float_plan
from mlcompress.quant.rate import group_step_factors, resolve_allocation, search_step, step_factors, step_plan
from mlcompress.quant.plan import (LOSSY_CODECS, FileSize, Plan, measure_file, plan_encoder, quantizable_names,
                                   uniform_plan, write_plan)
from mlcompress.quant.sensitivity import fisher_diagonal, group_sensitivity, tensor_sensitivity
from mlcompress.selection import Selection
from mlcompress.report import Report
from mlcompress.tasks import check_state_dict_fits, evaluate_model, get_task, load_task_model

METHODS = ("uniform", "l2", "float")


def dequantize_uniform(tensors: dict[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """The weights a decoder of ``plan`` rebuilds (quantized tensors replaced, others as they are)."""
    out = dict(tensors)
    for name, (codec, opts) in plan.items():
        if codec == "quant" and opts.get("scheme") == "step":
            out[name] = step_grid.step_quantize(tensors[name], opts["step"], per_channel=opts["per_channel"],
                                                group_size=opts["group_size"], lam=opts["lam"],
                                                dq=opts.get("dq", False),
                                                group_factors=opts.get("group_factors")).dequantize()
        elif codec == "quant":
            out[name] = uniform.quantize_tensor(
                tensors[name], opts["bits"], symmetric=opts["symmetric"],
                per_channel=opts["per_channel"], group_size=opts["group_size"],
            ).dequantize()
    return out


def _metadata(src: Path, options: dict[str, Any], task_obj, before, after) -> dict[str, Any]:
    """The file's header metadata: source, options and, with a task, the metric before/after."""
    metadata = base_metadata(src, options)
    if task_obj is not None:
        metadata.update({"task": task_obj.name, "metric": task_obj.metric_name, "metric_before": before,
                         "metric_after": after})
    return metadata


def _step_plan(tensors: dict[str, torch.Tensor], quant: Quant,
               metadata_for: Callable[[float], dict[str, Any]], select: Callable[[str], bool],
               sensitivity: dict[str, float] | None = None,
               group_factors: dict[str, Any] | None = None) -> tuple[Plan, float]:
    """The entropy-constrained plan: the given step, or the one searched for the target ratio
    (each trial file carries the header the real file will have, so tiny models land too)."""
    kwargs = dict(allocation=quant.allocation, per_channel=quant.per_channel, group_size=quant.group_size,
                  lam=quant.rdo_lambda, select=select, sensitivity=sensitivity, dq=quant.dq,
                  group_factors=group_factors)
    if quant.step is not None:
        return step_plan(tensors, quant.step, **kwargs), quant.step
    with tempfile.TemporaryDirectory(prefix="mlcompress-rate-") as tmp:
        scratch = Path(tmp) / "trial.mrc"
        def measure(p: Plan) -> FileSize:
            step = max(o["step"] for c, o in p.values() if c == "quant")  # the largest norm's: the global step
            return write_plan(scratch, tensors, p, metadata_for(step), force=True)

        step, plan, _ = search_step(tensors, quant.target_ratio, measure, **kwargs)
    return plan, step


def _sensitivity(task, tensors: dict[str, torch.Tensor], select: Callable[[str], bool], quant: Quant, device,
                 progress: Progress | None) -> tuple[dict[str, float], dict[str, Any]]:
    """``--allocation hessian``: each quantized tensor's mean Fisher diagonal on
    ``--calib-samples`` of the task's calibration inputs (the ones L² distils on), and, with
    ``--per-channel``/``--group-size``, the group steps they give (empty without groups)."""
    model = load_task_model(task, tensors, device)
    fisher = fisher_diagonal(model, task.calibration(quant.calib_samples), quantizable_names(tensors, select),
                             device=device, progress=progress)
    layout = {"per_channel": quant.per_channel, "group_size": quant.group_size}
    return tensor_sensitivity(fisher), group_step_factors(tensors, group_sensitivity(fisher, **layout), **layout)


def _sparsity(summary: dict[str, Any], tensors, plan: Plan, dequantized) -> None:
    quantized_names = [n for n, (c, _) in plan.items() if c == "quant"]
    zeros = sum(int((dequantized[n] == 0).sum()) for n in quantized_names)
    summary["sparsity"] = zeros / max(sum(tensors[n].numel() for n in quantized_names), 1)


def _evaluate(task, tensors: dict[str, torch.Tensor], device) -> float:
    model = load_task_model(task, tensors, device)
    return evaluate_model(task, model, device=device).metric


def _outputs(src: Path, output, safetensors, force: bool, check: bool = True) -> tuple[Path, Path | None]:
    """The destinations; ``check`` (the process that writes) also refuses existing files."""
    dst = Path(output) if output is not None else default_output(src)
    if dst.suffix.lower() != ".mrc":
        raise UsageError(f"-o {dst}: the quantized model is written as .mrc", hint="use --safetensors for a dequantized copy")
    if check:
        check_destination(dst, force=force)
    st = Path(safetensors) if safetensors is not None else None
    if st is not None:
        if check:
            check_destination(st, force=force)
        if st.resolve() == dst.resolve():
            raise UsageError("-o and --safetensors name the same file")
    return dst, st


def quantize_checkpoint(
    src: str | os.PathLike,
    *,
    method: str = "uniform",
    bits: int | None = None,
    symmetric: bool = False,
    per_channel: bool = False,
    group_size: int | None = None,
    task: str | None = None,
    data: str | os.PathLike | None = None,
    target_ratio: float | None = None,
    step: float | None = None,
    allocation: str = "auto",
    rdo_lambda: float = DEFAULT_LAMBDA,
    dq: bool = False,
    calib_samples: int = 1000,
    kernel: str = "cos",
    l2_config: L2Config | None = None,
    float_format: str = "bf16",
    device: str | torch.device = "auto",
    output: str | os.PathLike | None = None,
    safetensors: str | os.PathLike | None = None,
    force: bool = False,
    unsafe_pickle: bool = False,
    seed: int = 0,
    select: Selection = Selection(),
    progress: Progress | None = None,
) -> Report:
    """Quantize the checkpoint at ``src``; the report adds accuracy before/after and sparsity.
    ``select`` (``--include``/``--exclude``) narrows which tensors are quantized; the others
    are stored losslessly."""
    start = time.perf_counter()
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}", hint=f"use one of: {', '.join(METHODS)}")
    if method == "uniform":
        quant = Quant(bits=bits, symmetric=symmetric, per_channel=per_channel, group_size=group_size, step=step,
                      target_ratio=target_ratio, allocation=allocation, rdo_lambda=rdo_lambda, select=select,
                      task=task, calib_samples=calib_samples, dq=dq)
        quant.validate()
    elif method == "float":
        Float(format=float_format, per_channel=per_channel, select=select).validate()
    elif select.narrows:
        raise UsageError("--include/--exclude apply to data-free quantization (--bits, --step, --target-ratio) and "
                         "--float", hint="L² trains the transform of every conv/linear weight together")
    else:
        target_ratio = L2.target_ratio if target_ratio is None else target_ratio
        L2(task=task or "", target_ratio=target_ratio, calib_samples=calib_samples, kernel=kernel).validate()
        if calib_samples < 1:
            raise InputError("the calibration set is empty", hint="pass --calib-samples with a positive number")
        config = l2_config or L2Config(target_ratio=target_ratio, kernel=kernel, seed=seed)
        config.validate()
    if method != "l2":
        refuse_if_launched("quantize --float" if method == "float" else f"quantize --method {method}")
    world = join(device) if method == "l2" else SINGLE
    dev = resolve_device(device)
    src = Path(src)
    if task is None and safetensors is None and (method == "float" or (method == "uniform" and target_ratio is None)):
        dst, _ = _outputs(src, output, None, force)
        options_obj = quant if method == "uniform" else Float(format=float_format, per_channel=per_channel,
                                                              select=select)
        return _quantize_streaming(src, dst, options_obj, force=force, unsafe_pickle=unsafe_pickle,
                                   progress=progress, start=start)
    with world.guard():  # a bad input seen by one process only stops all, one line each
        dst, st = _outputs(src, output, safetensors, force, check=world.is_main)
        tensors = load_checkpoint(src, unsafe_pickle=unsafe_pickle)
        task_obj = None
        if task is not None:
            task_obj = get_task(task, data, src)
            check_state_dict_fits(task_obj, tensors)
        summary: dict[str, Any] = {"input": str(src)}
        before = _evaluate(task_obj, tensors, dev) if task_obj is not None and world.is_main else None
        chosen = select.resolve(tensors, shared_storage_aliases(tensors))

    if method == "uniform" and quant.entropy_constrained:
        # ``auto`` is resolved here, once, so the header and the report name the rule that ran.
        quant = dataclasses.replace(quant, allocation=resolve_allocation(tensors, quant.allocation))
        def trial_metadata(trial_step: float) -> dict[str, Any]:
            # The header of the file being sized: the real one but for metric_after, which is
            # not known yet (metric_before stands in: a number of the same kind).
            return _metadata(src, dict(quant.as_dict(), step=trial_step), task_obj, before, before)

        sensitivity, group_factors = (_sensitivity(task_obj, tensors, chosen, quant, dev, progress)
                                      if quant.allocation == "hessian" else (None, None))
        plan, chosen_step = _step_plan(tensors, quant, trial_metadata, chosen, sensitivity, group_factors)
        options = dict(quant.as_dict(), step=chosen_step)
        to_store, dequantized = tensors, dequantize_uniform(tensors, plan)
        summary.update(options)
        _sparsity(summary, tensors, plan, dequantized)
    elif method == "uniform":
        plan = uniform_plan(tensors, quant.resolved_bits, symmetric=symmetric, per_channel=per_channel,
                            group_size=group_size, select=chosen)
        options = quant.as_dict()
        to_store, dequantized = tensors, dequantize_uniform(tensors, plan)
        summary.update(options)
        _sparsity(summary, tensors, plan, dequantized)
    elif method == "float":
        plan = float_plan(tensors, float_format, per_channel=per_channel, select=chosen)
        options = Float(format=float_format, per_channel=per_channel, select=select).as_dict()
        to_store, dequantized = tensors, dequantize_float(tensors, plan)
        summary.update(options)
    else:
        with world.guard():
            calibration = task_obj.calibration(calib_samples)
            if calibration is None or len(calibration) == 0:
                raise InputError("the calibration set is empty", hint="pass --calib-samples with a positive number")
            model = load_task_model(task_obj, tensors, "cpu")
        result = l2_compress(model, calibration, config, device=dev, progress=progress, world=world)
        plan, to_store, dequantized = result.plan, result.tensors, result.dequantized
        options = {"method": "l2", "target_ratio": config.target_ratio, "kernel": config.kernel,
                   "calib_samples": calib_samples, "rounds": config.rounds, "seed": config.seed}
        summary.update(options)
        summary.update({"sparsity": result.sparsity, "widen_factor": result.widen_factor,
                        "optimisation_seconds": result.seconds})

    report = None
    with world.guard():  # process 0 alone evaluates and writes; a failure there stops the others too
        if world.is_main:
            after = _evaluate(task_obj, dequantized, dev) if task_obj is not None else None
            size = write_plan(dst, to_store, plan, _metadata(src, options, task_obj, before, after), force=force)
            if st is not None:
                save_checkpoint(dequantized, st, force=force)
                summary["safetensors"] = str(st)
            summary.update(size.as_dict())
            summary["quantized_tensors"] = sum(1 for c, _ in plan.values() if c in LOSSY_CODECS)
            if task_obj is not None:
                summary.update({"task": task_obj.name, "metric": task_obj.metric_name, "metric_before": before,
                                "metric_after": after})
            report = Report.of(open_mrc(dst), options["method"], time.perf_counter() - start, summary)
    return world.broadcast(report)


def _quantize_streaming(src: Path, dst: Path, options: Quant | Float, *, force: bool, unsafe_pickle: bool,
                        progress: Progress | None, start: float) -> Report:
    """``--bits``, ``--step`` or ``--float`` one tensor at a time (the plan comes from the
    header's dtypes and shapes; ``--step``'s norm allocation and fp8's finiteness check read each
    tensor once beforehand), each payload spooled as it is produced. The file is the one the
    in-memory path writes for the same options, byte for byte."""
    source = open_source(src, unsafe_pickle=unsafe_pickle)
    chosen = options.select.resolve(source.names, source.aliases)
    infos = source.infos()
    if isinstance(options, Float):
        fmt = low_precision_format(options.format)
        plan = float_plan(source.view() if fmt.scaled else infos, options.format, per_channel=options.per_channel,
                          select=chosen)
    elif options.step is not None:
        options = dataclasses.replace(options, allocation=resolve_allocation(infos, options.allocation))
        factors = step_factors(source.view() if options.allocation == "norm" else infos, options.allocation, chosen)
        plan = step_plan(infos, options.step, per_channel=options.per_channel, group_size=options.group_size,
                         lam=options.rdo_lambda, factors=factors, dq=options.dq)
    else:
        plan = uniform_plan(infos, options.resolved_bits, symmetric=options.symmetric,
                            per_channel=options.per_channel, group_size=options.group_size, select=chosen)
    as_dict = options.as_dict()
    encode = plan_encoder(plan)
    zeros = quantized = 0

    def encode_one(name: str, tensor: torch.Tensor):
        nonlocal zeros, quantized
        if plan[name][0] == "quant":  # sparsity: zeros of what a decoder rebuilds
            rebuilt = dequantize_uniform({name: tensor}, {name: plan[name]})[name]
            zeros += rebuilt.numel() - int(torch.count_nonzero(rebuilt))  # not (t == 0).sum(): 8 B/element
            del rebuilt
            quantized += tensor.numel()
        return encode(name, tensor)

    written = write_stream(dst, source, encode_one, _metadata(src, as_dict, None, None, None), force=force,
                 progress=lambda done, total: report(progress, "quantize", done / 1e6, total / 1e6, "MB"))
    summary: dict[str, Any] = {"input": str(src), **as_dict}
    if isinstance(options, Quant):
        summary["sparsity"] = zeros / max(quantized, 1)
    summary.update(measure_file(dst).as_dict())
    summary["quantized_tensors"] = sum(1 for c, _ in plan.values() if c in LOSSY_CODECS)
    return Report.of(written, as_dict["method"], time.perf_counter() - start, summary)
