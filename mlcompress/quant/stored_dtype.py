"""Decoding a ``.mrc`` with its low-precision tensors left in the format they are stored in.

An ordinary decode widens every ``float``-codec tensor back to the dtype the model had, which is
what evaluation and fine-tuning want. Serving wants the small dtype itself (``decode
--keep-dtype``): bf16/fp16 tensors come back as bf16/fp16, and an fp8 tensor as its fp8 values
plus a float32 tensor ``<name>_scale`` beside it, the layout of FP8 checkpoints for inference
engines (compressed-tensors, vLLM). The scale has the weight's number of dimensions, 1 in all
but the first (output channels, or 1 for a per-tensor scale), so ``weight.float() * scale``
broadcasts to the decoded weights, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from mlcompress.codecs.low_precision import CODEC, FORMATS
from mlcompress.container import MrcFile
from mlcompress.errors import InputError

SCALE_SUFFIX = "_scale"


def _scaled_names(mrc: MrcFile) -> dict[str, str]:
    """Every tensor name (aliases included) whose record is fp8, mapped to its scale's name."""
    out: dict[str, str] = {}
    for rec in mrc.records:
        target = mrc.record(rec.name)
        if target.codec == CODEC.name and FORMATS[target.params["format"]].scaled:
            out[rec.name] = rec.name + SCALE_SUFFIX
    return out


def decode_stored_dtype(mrc: MrcFile, *, device: Any = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``mrc`` on ``device``: ``float``-codec tensors in their stored format (fp8
    ones followed by ``<name>_scale``), the others as an ordinary decode gives them. Aliases stay
    one tensor object; a scale name that is already a tensor of the file is an :class:`InputError`."""
    scaled = _scaled_names(mrc)
    taken = set(mrc.names)
    clash = next((s for s in scaled.values() if s in taken), None)
    if clash is not None:
        raise InputError(f"cannot keep the fp8 dtype: the file already has a tensor named {clash!r}",
                         hint="decode without --keep-dtype")
    stored: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for rec in mrc.records:
        if rec.alias_of is not None:
            continue
        if rec.codec != CODEC.name:
            stored[rec.name] = mrc.tensor(rec.name, device=device)
            continue
        converted = CODEC.decode_converted(mrc.payload(rec.name), rec)
        stored[rec.name] = converted.values.to(device)
        if converted.scale is not None:
            shape = (converted.scale.numel(),) + (1,) * max(len(rec.shape) - 1, 0)
            scales[rec.name] = converted.scale.reshape(shape).to(device)
    out: dict[str, torch.Tensor] = {}
    for rec in mrc.records:
        target = rec.alias_of or rec.name
        out[rec.name] = stored[target]
        if rec.name in scaled:
            out[scaled[rec.name]] = scales[target]
    return out
