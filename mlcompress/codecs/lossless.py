"""``lossless`` codec: floats and integers entropy-coded bit-exactly by bit-field planes.

Why planes: in trained weights the exponent field is highly predictable (a few bits of entropy)
while low mantissa bits are nearly uniform. Splitting each value's bit pattern into fixed fields
-- the exponent on its own, the sign with the top mantissa bits, then the remaining bytes -- and
entropy-coding each field separately captures almost all of the redundancy (ZipNN's observation).
A plane whose ANS stream would not be smaller than its fixed-width bytes is stored raw, so
nearly-random mantissa bytes cost nothing extra and decode at memory speed.

The split is a bijection on bit patterns, so NaN payloads, +-Inf, -0.0 and subnormals survive.
The field layout of each dtype is part of the format (docs/format.md, "lossless codec").
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from mlcompress import entropy
from mlcompress.codecs import register
from mlcompress.codecs.raw import tensor_from_le_bytes, tensor_to_le_bytes
from mlcompress.container import TensorRecord, itemsize
from mlcompress.errors import MrcFormatError

# A field is a list of (shift, width) bit ranges of the value's unsigned bit pattern, concatenated
# from the least significant part upwards.
Field = tuple[tuple[int, int], ...]


def _bytes_fields(nbytes: int) -> list[Field]:
    return [((8 * i, 8),) for i in reversed(range(nbytes))]


FIELDS: dict[str, list[Field]] = {
    "float32": [((23, 8),), ((16, 7), (31, 1)), ((8, 8),), ((0, 8),)],
    "bfloat16": [((7, 8),), ((0, 7), (15, 1))],
    "float16": [((10, 5),), ((8, 2), (15, 1)), ((0, 8),)],
    "float64": [((52, 11),), ((48, 4), (63, 1))] + [((8 * i, 8),) for i in reversed(range(6))],
    "int64": _bytes_fields(8),
    "int32": _bytes_fields(4),
    "int16": _bytes_fields(2),
    "int8": _bytes_fields(1),
    "uint8": _bytes_fields(1),
    "bool": _bytes_fields(1),
}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _width(field: Field) -> int:
    return sum(w for _, w in field)


def _raw_dtype(field: Field) -> np.dtype:
    return np.dtype("<u1") if _width(field) <= 8 else np.dtype("<u2")


def _bits(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """The tensor's bit patterns as unsigned integers of the same width."""
    raw = np.frombuffer(tensor_to_le_bytes(tensor), dtype=np.uint8)
    return raw.view(np.dtype(_UINT[itemsize(dtype)]).newbyteorder("<")).astype(_UINT[itemsize(dtype)])


def _extract(u: np.ndarray, field: Field) -> np.ndarray:
    out = np.zeros(u.shape, dtype=np.uint32)
    acc = 0
    for shift, width in field:
        part = (u >> u.dtype.type(shift)) & u.dtype.type((1 << width) - 1)
        out |= part.astype(np.uint32) << np.uint32(acc)
        acc += width
    return out


def _insert(u: np.ndarray, field: Field, values: np.ndarray) -> None:
    acc = 0
    for shift, width in field:
        part = (values >> np.uint32(acc)) & np.uint32((1 << width) - 1)
        u |= part.astype(u.dtype) << u.dtype.type(shift)
        acc += width


class LosslessCodec:
    name = "lossless"

    def encode(self, tensor: torch.Tensor, options: Mapping[str, Any]) -> tuple[bytes, dict]:
        from mlcompress.container import dtype_name

        dtype = dtype_name(tensor.dtype)
        u = _bits(tensor, dtype)
        blobs, planes = [], []
        for field in FIELDS[dtype]:
            values = _extract(u, field)
            raw = values.astype(_raw_dtype(field)).tobytes()
            coded = entropy.encode_symbols(values.astype(np.int32)) if values.size else raw
            mode, blob = ("ans", coded) if len(coded) < len(raw) else ("raw", raw)
            blobs.append(blob)
            planes.append({"mode": mode, "length": len(blob)})
        return b"".join(blobs), {"planes": planes}

    def check(self, record: TensorRecord) -> None:
        params = record.params
        if set(params) != {"planes"} or not isinstance(params["planes"], list):
            raise MrcFormatError(f"lossless tensor {record.name!r} must have exactly a 'planes' list")
        fields = FIELDS[record.dtype]
        planes = params["planes"]
        if len(planes) != len(fields):
            raise MrcFormatError(
                f"lossless tensor {record.name!r}: {len(planes)} planes, dtype {record.dtype} has {len(fields)}"
            )
        total = 0
        for plane, field in zip(planes, fields):
            if not isinstance(plane, dict) or set(plane) != {"mode", "length"} or plane["mode"] not in ("ans", "raw"):
                raise MrcFormatError(f"lossless tensor {record.name!r} has a malformed plane entry")
            length = plane["length"]
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise MrcFormatError(f"lossless tensor {record.name!r} has an invalid plane length")
            if plane["mode"] == "raw" and length != record.numel * _raw_dtype(field).itemsize:
                raise MrcFormatError(f"lossless tensor {record.name!r}: raw plane size does not match its shape")
            total += length
        if total != record.length:
            raise MrcFormatError(f"lossless tensor {record.name!r}: plane lengths do not add up to the payload")

    def decode(self, payload: bytes, record: TensorRecord) -> torch.Tensor:
        n = record.numel
        size = itemsize(record.dtype)
        u = np.zeros(n, dtype=_UINT[size])
        view = memoryview(payload)
        pos = 0
        for plane, field in zip(record.params["planes"], FIELDS[record.dtype]):
            blob = view[pos : pos + plane["length"]]
            pos += plane["length"]
            if plane["mode"] == "raw":
                values = np.frombuffer(blob, dtype=_raw_dtype(field)).astype(np.uint32)
            else:
                decoded = entropy.decode_symbols(blob, expected_count=n)
                if decoded.size and (decoded.min() < 0 or decoded.max() >= (1 << _width(field))):
                    raise MrcFormatError(f"lossless tensor {record.name!r}: plane value outside its bit field")
                values = decoded.astype(np.uint32)
            _insert(u, field, values)
        data = u.astype(u.dtype.newbyteorder("<"), copy=False).tobytes()
        return tensor_from_le_bytes(data, record.dtype, record.shape)


register(LosslessCodec())
