"""A ``.mrc`` file's tensors as a checkpoint writer receives them: first what they will be, then
their values one at a time.

A streaming writer must know every tensor's name, shape and dtype before decoding any, to lay
out its header; a ``.mrc`` header says all of that. :func:`plan_decode` reads it, and
:func:`decoded_tensors` then decodes the stored tensors in that order, one alive at a time, so
memory is bounded by the largest tensor instead of the model.

``keep_dtype`` (``decode --keep-dtype``) leaves tensors of the ``float`` codec in the format
they are stored in, the layout of FP8 checkpoints for inference engines (compressed-tensors,
vLLM): bf16/fp16 tensors as bf16/fp16, and an fp8 tensor as its fp8 values followed by a float32
tensor ``<name>_scale`` with the weight's number of dimensions, 1 in all but the first (output
channels, or 1 for a per-tensor scale), so ``weight.float() * scale`` broadcasts to the ordinary
decode, bit for bit. Without it, every tensor comes back in the dtype it was encoded from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from mlcompress.checkpoint.safetensors_stream import TensorEntry
from mlcompress.codecs.low_precision import CODEC as FLOAT_CODEC
from mlcompress.codecs.low_precision import FORMATS
from mlcompress.container import MrcFile
from mlcompress.errors import InputError
from mlcompress.format.dtypes import torch_dtype

#: What ``keep_dtype`` appends to an fp8 tensor's name for its scale.
SCALE_SUFFIX = "_scale"


@dataclass(frozen=True)
class DecodePlan:
    """The output of a decode, known from the header alone.

    ``entries`` are the tensors stored once, in the file's order (an fp8 scale right after its
    tensor, with ``keep_dtype``); ``names`` every output name in order, tied ones included;
    ``aliases`` maps each tied name to the stored entry it is the same tensor as.
    """

    entries: list[TensorEntry]
    names: list[str]
    aliases: dict[str, str]
    scales: frozenset[str]  # the entries that are fp8 scales (keep_dtype), decoded with their tensor


def _kept(mrc: MrcFile, name: str) -> tuple[torch.dtype, tuple[int, ...] | None]:
    """The dtype ``name`` keeps with ``keep_dtype`` and its scale's shape (None: no scale)."""
    rec = mrc.record(name)
    if rec.codec != FLOAT_CODEC.name:
        return torch_dtype(rec.dtype), None
    fmt = FORMATS[rec.params["format"]]
    if not fmt.scaled:
        return fmt.torch_dtype, None
    return fmt.torch_dtype, _scale_shape(rec.shape, rec.params["scales"])


def _scale_shape(shape: tuple[int, ...], scales: int) -> tuple[int, ...]:
    """``(scales, 1, 1...)``: the weight's number of dimensions, so the scale broadcasts."""
    return (scales,) + (1,) * max(len(shape) - 1, 0)


def plan_decode(mrc: MrcFile, *, keep_dtype: bool = False) -> DecodePlan:
    """What decoding ``mrc`` gives, from its header. With ``keep_dtype`` a scale name that is
    already a tensor of the file is an :class:`InputError` (checked before anything is decoded)."""
    entries: list[TensorEntry] = []
    names: list[str] = []
    aliases: dict[str, str] = {}
    scales: set[str] = set()
    for rec in mrc.records:
        target = mrc.record(rec.name)
        dtype, scale = _kept(mrc, rec.name) if keep_dtype else (torch_dtype(target.dtype), None)
        outputs = [(rec.name, target.name, target.shape, dtype)]
        if scale is not None:
            outputs.append((rec.name + SCALE_SUFFIX, target.name + SCALE_SUFFIX, scale, torch.float32))
            scales.add(rec.name + SCALE_SUFFIX)
        for name, stored, shape, kind in outputs:
            names.append(name)
            if rec.alias_of is None:
                entries.append(TensorEntry(name, shape, kind))
            else:
                aliases[name] = stored
    clash = next((n for n in mrc.names if n in scales), None)
    if clash is not None:
        raise InputError(f"cannot keep the fp8 dtype: the file already has a tensor named {clash!r}",
                         hint="decode without --keep-dtype")
    return DecodePlan(entries, names, aliases, frozenset(scales))


def decoded_tensors(mrc: MrcFile, plan: DecodePlan, *, device: Any = "cpu",
                    threads: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each of ``plan.entries``, in order, decoded on ``device`` one at a
    time: the generator holds no tensor once it has handed it over."""
    for entry in plan.entries:
        if entry.name in plan.scales:
            continue  # handed over with its tensor, just before
        rec = mrc.record(entry.name)
        if entry.dtype == torch_dtype(rec.dtype):
            yield entry.name, mrc.tensor(entry.name, device=device, threads=threads)
        else:  # keep_dtype: a float-codec tensor in its stored format
            yield from _converted(rec, FLOAT_CODEC.decode_converted(mrc.payload(rec.name), rec), device)


def _converted(rec: Any, converted: Any, device: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """A stored-format tensor, then its scale (fp8), as :func:`decoded_tensors` hands them over."""
    yield rec.name, converted.values.to(device)
    if converted.scale is not None:
        yield rec.name + SCALE_SUFFIX, converted.scale.reshape(_scale_shape(rec.shape, converted.scale.numel())).to(device)


def decoded_dict(plan: DecodePlan, tensors: Iterator[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every output tensor of ``plan`` by name, in memory, from :func:`decoded_tensors` (or a
    transformation of it); tied names are one tensor object."""
    stored = dict(tensors)
    return {name: stored[plan.aliases.get(name, name)] for name in plan.names}
