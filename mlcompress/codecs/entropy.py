"""Entropy coding of integer symbols: a self-describing stream over constriction's ANS coder.

Why a wrapper: constriction is fast and exact, but easy to misuse (see docs/format.md, "Entropy
stream"). Its ``Categorical`` model must get ``perfect=False`` explicitly; a float32 and a float64
copy of one table give different bitstreams; decoding past the end silently returns zeros. This
module fixes one convention so every codec gets it right:

* the frequency table is stored as *exact integer counts* of the symbols actually present, and the
  model probabilities are always ``counts / sum(counts)`` in float64 -- the same bits on every
  machine;
* the number of coded values is stored, and the decoded histogram must equal the stored counts
  (a free integrity check on top of the container's CRC);
* a stream with a single distinct symbol stores no ANS words at all.

Stream layout (little-endian): ``u32 n_table``, ``i32 symbols[n_table]`` (strictly increasing),
``u64 counts[n_table]`` (each >= 1), ``u64 n_values`` (= sum of counts), ``u32 n_words``,
``u32 words[n_words]``.
"""

from __future__ import annotations

import struct

from mlcompress.lazy import numpy as np

from mlcompress.errors import MrcFormatError
from mlcompress.lazy import constriction

_HEAD = struct.Struct("<I")
_TAIL = struct.Struct("<QI")

#: Largest alphabet a stream may declare. Bounds the table a decoder allocates before reading it.
MAX_TABLE = 1 << 20


def _categorical(counts: np.ndarray):

    probs = counts.astype(np.float64) / float(counts.sum())
    return constriction.stream.model.Categorical(probs, perfect=False)


def histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values (sorted), each value's index among them, and their counts.

    Same result as ``np.unique(..., return_inverse=True, return_counts=True)``, with a counting
    fast path for small ranges (byte planes, quantization levels) that avoids a full sort.
    """
    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        return values[:0].astype(np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < (1 << 20):
        shifted = (values.astype(np.int64) - lo) if lo else values.astype(np.int64, copy=False)
        full = np.bincount(shifted, minlength=hi - lo + 1)
        present = np.flatnonzero(full)
        lookup = np.zeros(full.size, dtype=np.int64)
        lookup[present] = np.arange(present.size)
        return present + lo, lookup[shifted], full[present]
    symbols, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return symbols, inverse.reshape(-1), counts


def encode_symbols(values: np.ndarray) -> bytes:
    """Entropy-code a 1-D array of integers (any int dtype whose values fit in int32)."""
    return _encode(*_checked_histogram(values))


def encode_if_smaller(values: np.ndarray, limit: int) -> bytes | None:
    """``encode_symbols(values)`` if that stream is shorter than ``limit`` bytes, else ``None``.

    Why: the lossless codec stores a plane raw unless its stream is smaller, and nearly uniform
    planes (low mantissa bytes) can be ruled out from their histogram alone, without running the
    coder. The shortcut never changes the outcome: an ANS stream is never shorter than the
    values' empirical information content (the quantised model's cross-entropy is at least the
    empirical entropy) less the coder's final state, which the 8-byte allowance covers.
    """
    values = np.ascontiguousarray(values).reshape(-1)
    n = int(values.size)
    inverse: np.ndarray | None = None
    if values.dtype in (np.uint8, np.uint16):
        # Bit-field planes: count first, and build the per-value indices only if coding pays.
        full = np.bincount(values)
        symbols = np.flatnonzero(full)
        counts = full[symbols]
    else:
        symbols, inverse, counts, n = _checked_histogram(values)
    if n:
        info_bits = float(np.sum(counts * np.log2(n / counts)))
        if _HEAD.size + 12 * symbols.size + _TAIL.size + info_bits / 8 - 8 >= limit:
            return None
    if inverse is None:
        lookup = np.zeros(full.size, dtype=np.int32)
        lookup[symbols] = np.arange(symbols.size, dtype=np.int32)
        inverse = lookup[values]
    stream = _encode(symbols, inverse, counts, n)
    return stream if len(stream) < limit else None


def _checked_histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    values = np.ascontiguousarray(values).reshape(-1)
    if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
        raise ValueError("entropy coder symbols must fit in int32")
    symbols, inverse, counts = histogram(values)
    if symbols.size > MAX_TABLE:
        raise ValueError(f"alphabet of {symbols.size} symbols exceeds the limit of {MAX_TABLE}")
    return symbols, inverse, counts, int(values.size)


def _encode(symbols: np.ndarray, inverse: np.ndarray, counts: np.ndarray, n: int) -> bytes:

    words = np.zeros(0, dtype=np.uint32)
    if symbols.size > 1:
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(inverse.astype(np.int32, copy=False).reshape(-1), _categorical(counts))
        words = coder.get_compressed().astype("<u4", copy=False)
    return b"".join(
        (
            _HEAD.pack(symbols.size),
            symbols.astype("<i4").tobytes(),
            counts.astype("<u8").tobytes(),
            _TAIL.pack(n, words.size),
            words.tobytes(),
        )
    )


def decode_symbols(stream: bytes | memoryview, expected_count: int | None = None) -> np.ndarray:
    """Decode a stream from :func:`encode_symbols` into an int32 array.

    Validates the layout before allocating anything proportional to the declared sizes, and
    raises :class:`MrcFormatError` on any inconsistency (also when ``expected_count`` is given and
    differs from the stored count).
    """
    symbols, index = decode_indices(stream, expected_count)
    return symbols[index]


def decode_indices(stream: bytes | memoryview, expected_count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`decode_symbols`, but return the table and each value's index into it.

    Why: a caller that maps symbols to something else (the lossless codec maps a field value to
    the bits it sets) can transform the small table once and gather with ``index``, instead of
    transforming every decoded value. ``symbols[index]`` is what :func:`decode_symbols` returns.
    """

    view = memoryview(stream)
    if len(view) < _HEAD.size:
        raise MrcFormatError("entropy stream is truncated (no table size)")
    (n_table,) = _HEAD.unpack_from(view, 0)
    if n_table > MAX_TABLE:
        raise MrcFormatError(f"entropy stream declares {n_table} symbols, above the limit {MAX_TABLE}")
    pos = _HEAD.size
    need = pos + 12 * n_table + _TAIL.size
    if len(view) < need:
        raise MrcFormatError("entropy stream is truncated (table)")
    symbols = np.frombuffer(view, dtype="<i4", count=n_table, offset=pos).astype(np.int32)
    pos += 4 * n_table
    counts = np.frombuffer(view, dtype="<u8", count=n_table, offset=pos).astype(np.uint64)
    pos += 8 * n_table
    n_values, n_words = _TAIL.unpack_from(view, pos)
    pos += _TAIL.size
    if len(view) != pos + 4 * n_words:
        raise MrcFormatError("entropy stream length does not match its declared word count")
    if expected_count is not None and n_values != expected_count:
        raise MrcFormatError(f"entropy stream holds {n_values} values, expected {expected_count}")
    if n_table and (np.any(np.diff(symbols.astype(np.int64)) <= 0) or np.any(counts == 0)):
        raise MrcFormatError("entropy stream table is not strictly increasing with positive counts")
    if int(counts.sum(dtype=np.uint64)) != n_values or (n_values > 0) != (n_table > 0):
        raise MrcFormatError("entropy stream counts do not add up to its value count")
    if n_table <= 1:
        if n_words:
            raise MrcFormatError("entropy stream with one symbol must not carry coded words")
        table = symbols if n_table else np.zeros(1, dtype=np.int32)
        return table, np.zeros(n_values, dtype=np.int32)
    words = np.frombuffer(view, dtype="<u4", count=n_words, offset=pos).astype(np.uint32)
    if n_words and words[-1] == 0:
        # A coder's last word (the top of its state) is never 0; constriction would raise a
        # plain ValueError on it.
        raise MrcFormatError("entropy stream is damaged (its last word is zero)")
    coder = constriction.stream.stack.AnsCoder(words)
    try:
        index = coder.decode(_categorical(counts), int(n_values))
    except (ValueError, AssertionError) as exc:
        raise MrcFormatError(f"entropy stream cannot be decoded: {exc}") from None
    if not coder.is_empty() or not np.array_equal(
        np.bincount(index, minlength=n_table).astype(np.uint64), counts
    ):
        raise MrcFormatError("entropy stream decodes to a histogram other than its stored table")
    return symbols, index


def coded_bits(values: np.ndarray) -> int:
    """Size in bits of ``encode_symbols(values)``'s ANS words alone (no table) -- for reports."""

    symbols, inverse, counts = histogram(np.asarray(values).reshape(-1))
    if symbols.size <= 1:
        return 0
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(inverse.astype(np.int32).reshape(-1), _categorical(counts))
    return int(coder.num_bits())
