"""How the chosen candidate indices of a tensor's blocks are stored: the REC payload.

Two index codings (docs/format.md, "REC codec"):

* ``fixed`` -- each index in exactly ``bits`` bits, packed least-significant bit first into a
  little-endian bit stream: index ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``. The payload
  is ``ceil(blocks * bits / 8)`` bytes; the unused high bits of the last byte are zero. This is
  MIRACLE's cost, and the default for importance sampling and greedy selection, whose indices are
  uniform.
* ``entropy`` -- for ordered random coding, whose small indices are much more likely (roughly
  ``P(k) ~ 1/k``, Zipf-like). Index ``k`` is split into its bucket ``e = floor(log2(k + 1))`` and
  offset ``k + 1 - 2^e`` (``e`` bits). Buckets (at most ``bits + 1`` symbols) go through the shared
  entropy stream (:mod:`mlcompress.entropy`: exact counts, ANS); offsets are packed like ``fixed``
  with their variable widths. Payload: ``u32`` length of the bucket stream, the stream, the packed
  offsets. Within a bucket the ORC index is close to uniform, so little is lost by not modelling
  offsets, and the table stays tiny whatever the number of blocks.
"""

from __future__ import annotations

import struct

import numpy as np

from mlcompress import entropy
from mlcompress.errors import MrcFormatError

__all__ = ["INDEX_CODINGS", "pack_bits", "unpack_bits", "encode_indices", "decode_indices", "fixed_payload_bytes"]

INDEX_CODINGS = ("fixed", "entropy")
_LEN = struct.Struct("<I")


def pack_bits(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Pack non-negative ``values`` (each ``< 2^width``) LSB-first into a little-endian bit stream."""
    values = np.asarray(values, dtype=np.uint64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    total = int(widths.sum())
    if total == 0:
        return b""
    owner = np.repeat(np.arange(values.size), widths)
    starts = np.cumsum(widths) - widths
    shift = np.arange(total, dtype=np.int64) - np.repeat(starts, widths)
    bits = ((values[owner] >> shift.astype(np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits, bitorder="little").tobytes()


def unpack_bits(data: bytes | memoryview, widths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_bits` (int64 values); ``data`` must hold exactly enough bytes."""
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    total = int(widths.sum())
    if len(data) != (total + 7) // 8:
        raise MrcFormatError(f"REC index bits: {len(data)} bytes, expected {(total + 7) // 8}")
    out = np.zeros(widths.size, dtype=np.int64)
    if total == 0:
        return out
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[total:].any():
        raise MrcFormatError("REC index bits: padding bits of the last byte are not zero")
    owner = np.repeat(np.arange(widths.size), widths)
    shift = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(widths) - widths, widths)
    np.add.at(out, owner, bits[:total].astype(np.int64) << shift)
    return out


def fixed_payload_bytes(blocks: int, bits: int) -> int:
    """Exact payload size of ``fixed`` index coding."""
    return (blocks * bits + 7) // 8


def _buckets(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    plus = indices.astype(np.int64) + 1
    bucket = np.floor(np.log2(plus.astype(np.float64))).astype(np.int64)
    # log2 of exact powers of two is exact in float64; guard the neighbours anyway
    bucket -= (np.left_shift(1, bucket) > plus).astype(np.int64)
    bucket += (np.left_shift(1, bucket + 1) <= plus).astype(np.int64)
    return bucket, plus - np.left_shift(1, bucket)


def encode_indices(indices: np.ndarray, bits: int, coding: str) -> bytes:
    """Payload for ``indices`` (each in ``[0, 2^bits)``) under ``coding``."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= 1 << bits):
        raise ValueError(f"REC indices must lie in [0, 2^{bits})")
    if coding == "fixed":
        return pack_bits(indices, np.full(indices.size, bits))
    if coding == "entropy":
        bucket, offset = _buckets(indices)
        stream = entropy.encode_symbols(bucket.astype(np.int32))
        return _LEN.pack(len(stream)) + stream + pack_bits(offset, bucket)
    raise ValueError(f"unknown REC index coding {coding!r}")


def decode_indices(payload: bytes | memoryview, blocks: int, bits: int, coding: str) -> np.ndarray:
    """int64 ``[blocks]`` indices from a payload; any inconsistency is :class:`MrcFormatError`."""
    view = memoryview(payload)
    if coding == "fixed":
        return unpack_bits(view, np.full(blocks, bits))
    if coding != "entropy":
        raise MrcFormatError(f"unknown REC index coding {coding!r}")
    if len(view) < _LEN.size:
        raise MrcFormatError("REC payload is truncated (no bucket stream length)")
    (n,) = _LEN.unpack_from(view, 0)
    if _LEN.size + n > len(view):
        raise MrcFormatError("REC payload is truncated inside the bucket stream")
    bucket = entropy.decode_symbols(view[_LEN.size : _LEN.size + n], expected_count=blocks).astype(np.int64)
    if bucket.size and (bucket.min() < 0 or bucket.max() > bits):
        raise MrcFormatError(f"REC payload has index buckets outside [0, {bits}]")
    offset = unpack_bits(view[_LEN.size + n :], bucket)
    indices = np.left_shift(1, bucket) + offset - 1
    if indices.size and indices.max() >= 1 << bits:
        raise MrcFormatError(f"REC payload decodes to an index outside [0, 2^{bits})")
    return indices
