"""How the chosen candidate indices of a tensor's blocks are stored: the REC payload.

Two index codings (docs/format.md, "REC codec"):

* ``fixed`` -- each index in exactly ``bits`` bits, packed least-significant bit first into a
  little-endian bit stream: index ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``. The payload
  is ``ceil(blocks * bits / 8)`` bytes; the unused high bits of the last byte are zero. This is
  MIRACLE's cost, and the default for importance sampling and greedy selection, whose indices are
  uniform.
* ``entropy`` -- for ordered random coding, whose small indices are much more likely (roughly
  ``P(k) ~ 1/k``, Zipf-like). Index ``k`` is split into its bucket ``e = floor(log2(k + 1))`` and
  offset ``k + 1 - 2^e`` (``e`` bits). Buckets are ANS-coded with the empirical model of their
  ``u32`` histogram over ``[0, bits]`` (``bits + 1`` counts, stored: 68 bytes at 16 bits, where a
  general symbol table would cost 12 bytes per symbol -- as much as the coding saves on a few
  hundred blocks); offsets are packed like ``fixed`` with their variable widths. Payload:
  ``u32 counts[bits + 1]``, ``u32 n_words``, ``u32 words[n_words]``, the packed offsets. Within a
  bucket the ORC index is close to uniform, so little is lost by not modelling offsets.

The bucket model follows the constriction conventions of :mod:`mlcompress.codecs.entropy`: probabilities
are ``counts / sum`` in float64 over the buckets that occur (exact integers in, the same quantised
model on every machine), ``Categorical(..., perfect=False)``, ``AnsCoder`` with ``encode_reverse``;
the decoder checks the coder is empty and the decoded histogram equals the stored counts (decoding
past the end would silently return zeros).
"""

from __future__ import annotations

import struct

from mlcompress.lazy import numpy as np

from mlcompress.errors import MrcFormatError
from mlcompress.lazy import constriction

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
        counts = np.bincount(bucket, minlength=bits + 1).astype(np.int64)
        present = np.flatnonzero(counts)
        words = np.zeros(0, dtype=np.uint32)
        if present.size > 1:

            rank = np.searchsorted(present, bucket).astype(np.int32)
            coder = constriction.stream.stack.AnsCoder()
            coder.encode_reverse(np.ascontiguousarray(rank), _bucket_model(counts[present]))
            words = coder.get_compressed().astype("<u4", copy=False)
        return b"".join((counts.astype("<u4").tobytes(), _LEN.pack(words.size), words.tobytes(), pack_bits(offset, bucket)))
    raise ValueError(f"unknown REC index coding {coding!r}")


def _bucket_model(counts: np.ndarray):

    return constriction.stream.model.Categorical(counts.astype(np.float64) / float(counts.sum()), perfect=False)


def decode_indices(payload: bytes | memoryview, blocks: int, bits: int, coding: str) -> np.ndarray:
    """int64 ``[blocks]`` indices from a payload; any inconsistency is :class:`MrcFormatError`."""
    view = memoryview(payload)
    if coding == "fixed":
        return unpack_bits(view, np.full(blocks, bits))
    if coding != "entropy":
        raise MrcFormatError(f"unknown REC index coding {coding!r}")
    head = 4 * (bits + 1)
    if len(view) < head + _LEN.size:
        raise MrcFormatError("REC payload is truncated (bucket histogram)")
    counts = np.frombuffer(view, dtype="<u4", count=bits + 1).astype(np.int64)
    if int(counts.sum()) != blocks:
        raise MrcFormatError(f"REC payload's bucket histogram counts {int(counts.sum())} indices, expected {blocks}")
    (n_words,) = _LEN.unpack_from(view, head)
    words_end = head + _LEN.size + 4 * n_words
    if words_end > len(view):
        raise MrcFormatError("REC payload is truncated inside the bucket stream")
    present = np.flatnonzero(counts)
    if present.size <= 1:
        if n_words:
            raise MrcFormatError("REC payload has coded words for a single bucket")
        bucket = np.full(blocks, present[0] if present.size else 0, dtype=np.int64)
    else:
        words = np.frombuffer(view, dtype="<u4", count=n_words, offset=head + _LEN.size).astype(np.uint32)
        if n_words and words[-1] == 0:  # never written; constriction raises a plain ValueError
            raise MrcFormatError("REC bucket stream is damaged (its last word is zero)")
        coder = constriction.stream.stack.AnsCoder(words)
        try:
            rank = coder.decode(_bucket_model(counts[present]), blocks)
        except (ValueError, AssertionError) as exc:
            raise MrcFormatError(f"REC bucket stream cannot be decoded: {exc}") from None
        if not coder.is_empty() or not np.array_equal(np.bincount(rank, minlength=present.size), counts[present]):
            raise MrcFormatError("REC bucket stream does not decode to its stored histogram")
        bucket = present[rank].astype(np.int64)
    offset = unpack_bits(view[words_end:], bucket)
    indices = np.left_shift(1, bucket) + offset - 1
    if indices.size and indices.max() >= 1 << bits:
        raise MrcFormatError(f"REC payload decodes to an index outside [0, 2^{bits})")
    return indices
