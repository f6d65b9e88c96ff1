"""Which tensors ``quantize --float`` converts, and the weights a decoder of the result rebuilds.

The rule follows what practitioners mean by each format (docs/quantize.md):

* ``bf16``/``fp16`` is a cast of the whole model, like ``model.to(torch.bfloat16)``: every
  float32 or float64 tensor is converted, biases and norm scales included. Tensors that are
  already 16-bit (or integers) are stored as they are: a 16-bit to 16-bit cast would lose range
  or precision and save nothing.
* ``fp8-e4m3``/``fp8-e5m2`` is weight quantization, as in FP8 checkpoints for inference: only
  conv/linear weights (:func:`mlcompress.quant.plan.is_quantizable`) are converted, each with
  its own scale; everything else stays bit-exact in its dtype. An fp8 scale cannot represent a
  NaN or an infinity, so a converted tensor holding one is refused before anything is written.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from mlcompress.codecs import low_precision
from mlcompress.errors import InputError
from mlcompress.quant.plan import Plan, is_quantizable


def converts(tensor: torch.Tensor, fmt: low_precision.FloatFormat) -> bool:
    """Whether ``--float fmt`` converts ``tensor`` (see the module docstring)."""
    if not tensor.dtype.is_floating_point or str(tensor.dtype).removeprefix("torch.") not in fmt.sources:
        return False
    return is_quantizable(tensor) if fmt.scaled else True


def float_plan(tensors: Mapping[str, torch.Tensor], format_name: str, *, per_channel: bool = False,
               select: Callable[[str], bool] | None = None) -> Plan:
    """``float`` for the tensors the format converts (and ``select`` keeps), ``lossless`` for
    the rest; fp8 tensors with NaN or infinite values are an :class:`InputError` naming the
    first of them."""
    fmt = low_precision.float_format(format_name)
    plan: Plan = {}
    for name, tensor in tensors.items():
        if not converts(tensor, fmt) or (select is not None and not select(name)):
            plan[name] = ("lossless", {})
            continue
        if fmt.scaled and not bool(torch.isfinite(tensor.to(torch.float32)).all()):
            raise InputError(f"tensor {name!r} has NaN or infinite values (or values beyond float32's range), which "
                             f"{fmt.name} cannot scale", hint="fix the checkpoint, or use --float bf16 or fp16, which keep them")
        options = {"format": fmt.name}
        if fmt.scaled:
            options["per_channel"] = per_channel
        plan[name] = ("float", options)
    return plan


def dequantize_float(tensors: Mapping[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """The weights a decoder of ``plan`` rebuilds (converted tensors replaced, others as they are),
    computed by the codec's own conversion and restoration, so they equal the decoded file."""
    out = dict(tensors)
    done: dict[int, torch.Tensor] = {}  # by source identity, so tied tensors stay one tensor
    for name, (codec, opts) in plan.items():
        source = tensors[name]
        if codec == "float" and id(source) not in done:
            fmt = low_precision.FORMATS[opts["format"]]
            converted = low_precision.convert(source, fmt, per_channel=bool(opts.get("per_channel", False)))
            done[id(source)] = low_precision.restore(converted, source.dtype)
        if codec == "float":
            out[name] = done[id(source)]
    return out
