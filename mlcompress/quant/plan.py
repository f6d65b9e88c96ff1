"""Which tensors of a model get quantized, how each is stored, and what the file costs.

Default rule (documented in docs/quantize.md): a floating-point tensor with at least 2 dimensions
and at least :data:`MIN_QUANT_NUMEL` elements -- the weights of convolutions and linear layers --
is quantized; everything else (biases, norm scales, embeddings' tiny cousins, integer buffers) is
stored exactly by the ``lossless`` codec. Those tensors are a tiny share of the bytes but often
sensitive to rounding, so quantizing them buys little and risks accuracy.

The size that matters is the *file*: :func:`measure_file` encodes to a real ``.mrc`` (in a
temporary directory when no destination is given) and reports bytes and bits per weight from the
actual payloads, never from nominal widths.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mlcompress.assembly import smallest_lossless
from mlcompress.container import EncodedTensor, encode_entries, encode_tensor, open_mrc, write_encoded

MIN_QUANT_NUMEL = 64
#: Codecs whose payloads are the quantized (lossy) tensors a file's bits per weight are about.
LOSSY_CODECS = ("quant", "float")
Plan = dict[str, tuple[str, dict[str, Any]]]


def is_quantizable(tensor: Any) -> bool:
    """Conv/linear-style weights: floating point, >= 2 dims, >= MIN_QUANT_NUMEL elements.

    Judged from ``dtype`` and ``shape`` alone, so a streaming source's header entry
    (:class:`~mlcompress.checkpoint.source.TensorInfo`) answers without reading the tensor.
    """
    return tensor.dtype.is_floating_point and len(tensor.shape) >= 2 and math.prod(tensor.shape) >= MIN_QUANT_NUMEL


def quantizable_names(tensors: Mapping[str, Any], select: Callable[[str], bool] | None = None) -> list[str]:
    """The names quantization takes: quantizable tensors, narrowed by ``select``
    (:meth:`mlcompress.selection.Selection.resolve`) when given."""
    return [name for name, t in tensors.items() if is_quantizable(t) and (select is None or select(name))]


def uniform_plan(
    tensors: Mapping[str, Any],
    bits: int,
    *,
    symmetric: bool = False,
    per_channel: bool = False,
    group_size: int | None = None,
    select: Callable[[str], bool] | None = None,
) -> Plan:
    """``quant`` (uniform) for the :func:`quantizable_names`, ``lossless`` for the rest.
    ``tensors`` may hold header entries instead of tensors (only dtypes and shapes are read)."""
    options = {"scheme": "uniform", "bits": bits, "symmetric": symmetric, "per_channel": per_channel,
               "group_size": group_size}
    chosen = set(quantizable_names(tensors, select))
    return {name: (("quant", dict(options)) if name in chosen else ("lossless", {})) for name in tensors}


@dataclass
class FileSize:
    """Measured cost of an encoded model (tied tensors counted once, as everywhere)."""

    file_bytes: int
    fp32_bytes: int
    quantized_params: int
    quantized_payload_bytes: int
    other_payload_bytes: int
    total_params: int

    @property
    def fp32_ratio(self) -> float:
        """fp32 bytes over file bytes: the figure ``--target-ratio`` aims at."""
        return self.fp32_bytes / self.file_bytes

    @property
    def bits_per_quantized_weight(self) -> float:
        """Payload bits of the quantized tensors (levels + their parameters) per weight."""
        return 8 * self.quantized_payload_bytes / max(self.quantized_params, 1)

    @property
    def file_bits_per_param(self) -> float:
        return 8 * self.file_bytes / max(self.total_params, 1)

    def as_dict(self) -> dict[str, Any]:
        """The method-specific figures (sizes and ratios come from the file's :class:`Report`)."""
        return {
            "bits_per_quantized_weight": self.bits_per_quantized_weight,
            "file_bits_per_param": self.file_bits_per_param,
            "quantized_params": self.quantized_params,
            "total_params": self.total_params,
        }


def write_plan(
    path: str | os.PathLike | None,
    tensors: Mapping[str, torch.Tensor],
    plan: Plan,
    metadata: Mapping[str, Any],
    *,
    force: bool = False,
) -> FileSize:
    """Encode ``tensors`` by ``plan`` into ``path`` (or a scratch file when ``None``) and measure it.

    Tensors planned as ``lossless`` are stored by ``lossless`` or, when that is not smaller (tiny
    biases), ``raw`` -- the same rule as ``mlcompress encode --lossless``.
    """
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    if path is None:
        with tempfile.TemporaryDirectory(prefix="mlcompress-size-") as tmp:
            return write_plan(Path(tmp) / "model.mrc", tensors, plan, metadata)
    write_encoded(path, encode_entries(tensors, plan_encoder(plan)), metadata, force=force)
    return measure_file(path)


def plan_encoder(plan: Plan) -> Callable[[str, torch.Tensor], EncodedTensor]:
    """Encodes one tensor as ``plan`` says; tensors planned ``lossless`` are stored by the
    lossless codec or, when that is not smaller (tiny biases), ``raw``, the same rule as
    ``mlcompress encode --lossless``."""
    def encode_one(name: str, tensor: torch.Tensor) -> EncodedTensor:
        codec, options = plan[name]
        if codec == "lossless":
            return smallest_lossless(name, tensor)
        return encode_tensor(name, tensor, codec, options)

    return encode_one


def measure_file(path: str | os.PathLike) -> FileSize:
    """Sizes read back from a written ``.mrc``'s header (payload lengths per codec)."""
    f = open_mrc(path)
    q_params = q_bytes = other = total = 0
    for rec in f.records:
        if rec.alias_of is not None:
            continue
        total += rec.numel
        if rec.codec in LOSSY_CODECS:
            q_params += rec.numel
            q_bytes += rec.length
        else:
            other += rec.length
    return FileSize(f.file_size, 4 * total, q_params, q_bytes, other, total)
