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

import sys
from typing import Any, Mapping

from mlcompress.codecs import entropy
from mlcompress.codecs.raw import tensor_from_le_bytes, tensor_to_le_bytes
from mlcompress.errors import MrcFormatError
from mlcompress.format.dtypes import dtype_name, itemsize, torch_dtype
from mlcompress.format.records import TensorRecord
from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch

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
_UINT = {1: "u1", 2: "u2", 4: "u4", 8: "u8"}  # numpy dtype names (native order)


def _width(field: Field) -> int:
    return sum(w for _, w in field)


def _raw_itemsize(field: Field) -> int:
    """Bytes per value of a field's raw plane: 1 up to 8 bits, else 2."""
    return 1 if _width(field) <= 8 else 2


def _raw_dtype(field: Field) -> np.dtype:
    return np.dtype(f"<u{_raw_itemsize(field)}")


def _bits(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """The tensor's bit patterns as native unsigned integers of the same width."""
    size = itemsize(dtype)
    if sys.byteorder == "little":  # a view of the tensor's memory, no copy
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        return flat.view(torch.uint8).numpy().view(_UINT[size])
    raw = np.frombuffer(tensor_to_le_bytes(tensor), dtype=np.uint8)
    return raw.view(np.dtype(_UINT[size]).newbyteorder("<")).astype(_UINT[size])


def _extract(u: np.ndarray, field: Field) -> np.ndarray:
    """The field's values for every element, as the plane's raw dtype (uint8 or uint16)."""
    shift, width = field[0]
    if len(field) == 1 and width == 8 and shift % 8 == 0 and sys.byteorder == "little":
        return np.ascontiguousarray(u.view(np.uint8).reshape(u.size, u.itemsize)[:, shift // 8])
    out = (u >> u.dtype.type(shift)) & u.dtype.type((1 << width) - 1)
    acc = width
    for shift, width in field[1:]:
        part = (u >> u.dtype.type(shift)) & u.dtype.type((1 << width) - 1)
        part <<= u.dtype.type(acc)
        out |= part
        acc += width
    return out.astype(_raw_dtype(field))


class LosslessCodec:
    name = "lossless"

    def encode(self, tensor: torch.Tensor, options: Mapping[str, Any]) -> tuple[bytes, dict]:
        dtype = dtype_name(tensor.dtype)
        u = _bits(tensor, dtype)
        blobs, planes = [], []
        for field in FIELDS[dtype]:
            values = _extract(u, field)
            raw = values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()
            coded = entropy.encode_if_smaller(values, len(raw)) if values.size else None
            mode, blob = ("ans", coded) if coded is not None else ("raw", raw)
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
            if plane["mode"] == "raw" and length != record.numel * _raw_itemsize(field):
                raise MrcFormatError(f"lossless tensor {record.name!r}: raw plane size does not match its shape")
            total += length
        if total != record.length:
            raise MrcFormatError(f"lossless tensor {record.name!r}: plane lengths do not add up to the payload")

    def decode(self, payload: bytes, record: TensorRecord, device: Any = "cpu") -> torch.Tensor:
        # Decode speed matters (it runs on every load), so the field values are put back with
        # as few whole-tensor passes as possible: an 8-bit field that is a whole byte is copied
        # straight into that byte; other raw fields are shifted into place in the element's
        # integer width; an ANS plane's small table is shifted into place once and then gathered
        # by the decoded indices. Fields are disjoint, so the order of the planes does not matter.
        n = record.numel
        if n == 0:
            return torch.empty(record.shape, dtype=torch_dtype(record.dtype))
        udtype = np.dtype(_UINT[itemsize(record.dtype)])
        u = np.zeros(n, dtype=udtype)
        as_bytes = u.view(np.uint8).reshape(n, udtype.itemsize) if sys.byteorder == "little" else None
        view = memoryview(payload)
        pos = 0
        for plane, field in zip(record.params["planes"], FIELDS[record.dtype]):
            blob = view[pos : pos + plane["length"]]
            pos += plane["length"]
            limit = 2 if record.dtype == "bool" else 1 << _width(field)
            whole_byte = as_bytes is not None and len(field) == 1 and field[0][1] == 8 and field[0][0] % 8 == 0
            if plane["mode"] == "raw":
                values = np.frombuffer(blob, dtype=_raw_dtype(field))
                if limit < 1 << 8 * values.itemsize and int(values.max()) >= limit:
                    raise MrcFormatError(f"lossless tensor {record.name!r}: plane value outside its bit field")
                if whole_byte:
                    as_bytes[:, field[0][0] // 8] = values
                else:
                    _or_placed(u, values, field)
            else:
                table, index = entropy.decode_indices(blob, expected_count=n)
                if int(table.min()) < 0 or int(table.max()) >= limit:
                    raise MrcFormatError(f"lossless tensor {record.name!r}: plane value outside its bit field")
                if whole_byte:
                    as_bytes[:, field[0][0] // 8] = np.take(table.astype(np.uint8), index)
                else:
                    placed = np.zeros(table.size, dtype=udtype)
                    _or_placed(placed, table, field)
                    u |= np.take(placed, index)
        if sys.byteorder == "little":
            return torch.from_numpy(u).view(torch_dtype(record.dtype)).reshape(record.shape)
        return tensor_from_le_bytes(u.astype(udtype.newbyteorder("<")).tobytes(), record.dtype, record.shape)


def _or_placed(u: np.ndarray, values: np.ndarray, field: Field) -> None:
    """OR field values ``values`` (validated to fit the field) into place in ``u``."""
    wide = values.astype(u.dtype)
    acc = 0
    for shift, width in field:
        part = wide >> u.dtype.type(acc) if acc else wide.copy() if len(field) > 1 else wide
        if acc + width < _width(field):
            part &= u.dtype.type((1 << width) - 1)
        part <<= u.dtype.type(shift)
        u |= part
        acc += width


CODEC = LosslessCodec()
