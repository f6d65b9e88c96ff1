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
#: Values counted, indexed, coded or decoded at a time. Why slices: a whole-tensor pass would
#: make int64 and int32 copies of every value (a 38M-value embedding: ~450 MB); in slices the
#: temporaries stay at a few MB. The stream is the same for any slice size: counts add up, and the
#: ANS coder's state moves one value at a time, so coding the slices last to first is coding the
#: whole array in reverse (and decoding them in turn pops the same values).
CHUNK = 1 << 20
#: Value ranges below this are counted with a table indexed by ``value - min`` instead of sorting.
_COUNTING_RANGE = 1 << 20


def _categorical(counts: np.ndarray):

    probs = counts.astype(np.float64) / float(counts.sum())
    return constriction.stream.model.Categorical(probs, perfect=False)


def slices(n: int, chunk: int | None = None) -> list[slice]:
    """Consecutive slices of at most ``chunk`` (default :data:`CHUNK`) values covering ``range(n)``."""
    step = max(int(chunk or CHUNK), 1)
    return [slice(a, min(a + step, n)) for a in range(0, n, step)]


def range_counts(values: np.ndarray, lo: int, size: int) -> np.ndarray:
    """``np.bincount(values - lo, minlength=size)`` (int64) for values in ``[lo, lo + size)``,
    counted a slice at a time so that no int64 copy of all the values is made."""
    counts = np.zeros(size, dtype=np.int64)
    for sl in slices(values.size):
        part = values[sl].astype(np.int64)
        if lo:
            part -= lo
        counts += np.bincount(part, minlength=size)
    return counts


class _Table:
    """The distinct values of an array (sorted) with their counts, and each value's index.

    The same symbols, counts and indices as ``np.unique(..., return_inverse=True,
    return_counts=True)``: by counting over ``value - min`` when the range is small (byte planes,
    quantization levels), else by sorting each slice's distinct values and searching them.
    """

    def __init__(self, values: np.ndarray):
        self.lo, self.lookup = 0, None
        if values.size == 0:
            self.symbols = np.zeros(0, dtype=np.int64)
            self.counts = np.zeros(0, dtype=np.int64)
            return
        lo, hi = int(values.min()), int(values.max())
        if hi - lo < _COUNTING_RANGE:
            full = range_counts(values, lo, hi - lo + 1)
            present = np.flatnonzero(full)
            self.lo, self.lookup = lo, np.zeros(full.size, dtype=np.int32)
            self.lookup[present] = np.arange(present.size, dtype=np.int32)
            self.symbols, self.counts = present + lo, full[present]
            return
        self.symbols = np.unique(np.concatenate([np.unique(values[sl]) for sl in slices(values.size)]))
        self.counts = np.zeros(self.symbols.size, dtype=np.int64)
        for sl in slices(values.size):
            self.counts += np.bincount(self.index(values[sl]), minlength=self.symbols.size)

    def index(self, part: np.ndarray) -> np.ndarray:
        """Each value's position in :attr:`symbols`, as a fresh contiguous int32 array."""
        if self.lookup is None:
            return np.searchsorted(self.symbols, part).astype(np.int32)
        # int32 arithmetic: a narrow dtype would wrap, and value - min < 2**20 fits.
        return self.lookup[part.astype(np.int32) - self.lo if self.lo else part]


def symbol_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (sorted) and their counts, as ``np.unique(values, return_counts=True)``
    gives them (counted in slices; no per-value array is made)."""
    table = _Table(np.asarray(values).reshape(-1))
    return table.symbols, table.counts


def encode_symbols(values: np.ndarray) -> bytes:
    """Entropy-code a 1-D array of integers (any int dtype whose values fit in int32)."""
    values = np.ascontiguousarray(values).reshape(-1)
    return _encode(_checked_table(values), values)


def encode_if_smaller(values: np.ndarray, limit: int) -> bytes | None:
    """``encode_symbols(values)`` if that stream is shorter than ``limit`` bytes, else ``None``.

    Why: the lossless codec stores a plane raw unless its stream is smaller, and nearly uniform
    planes (low mantissa bytes) can be ruled out from their histogram alone, without running the
    coder. The shortcut never changes the outcome: an ANS stream is never shorter than the
    values' empirical information content (the quantised model's cross-entropy is at least the
    empirical entropy) less the coder's final state, which the 8-byte allowance covers.
    """
    values = np.ascontiguousarray(values).reshape(-1)
    table = _checked_table(values)
    n, counts = int(values.size), table.counts
    if n:
        info_bits = float(np.sum(counts * np.log2(n / counts)))
        if _HEAD.size + 12 * counts.size + _TAIL.size + info_bits / 8 - 8 >= limit:
            return None
    stream = _encode(table, values)
    return stream if len(stream) < limit else None


def _checked_table(values: np.ndarray) -> _Table:
    if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
        raise ValueError("entropy coder symbols must fit in int32")
    table = _Table(values)
    if table.symbols.size > MAX_TABLE:
        raise ValueError(f"alphabet of {table.symbols.size} symbols exceeds the limit of {MAX_TABLE}")
    return table


def _coder(table: _Table, values: np.ndarray):
    """An ANS coder holding ``values`` (at least two distinct symbols), coded last slice first."""
    coder = constriction.stream.stack.AnsCoder()
    model = _categorical(table.counts)
    for sl in reversed(slices(values.size)):
        coder.encode_reverse(table.index(values[sl]), model)
    return coder


def _encode(table: _Table, values: np.ndarray) -> bytes:

    words = np.zeros(0, dtype=np.uint32)
    if table.symbols.size > 1:
        words = _coder(table, values).get_compressed().astype("<u4", copy=False)
    return b"".join(
        (
            _HEAD.pack(table.symbols.size),
            table.symbols.astype("<i4").tobytes(),
            table.counts.astype("<u8").tobytes(),
            _TAIL.pack(values.size, words.size),
            words,
        )
    )


class _Decoder:
    """A validated stream header, and the coded values a slice at a time (:meth:`indices`)."""

    def __init__(self, stream: bytes | memoryview, expected_count: int | None):
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
        self.n_values, self.counts, self.coder = int(n_values), counts, None
        self.symbols = symbols if n_table else np.zeros(1, dtype=np.int32)
        if n_table <= 1:
            if n_words:
                raise MrcFormatError("entropy stream with one symbol must not carry coded words")
            return
        words = np.frombuffer(view, dtype="<u4", count=n_words, offset=pos).astype(np.uint32, copy=False)
        if n_words and words[-1] == 0:
            # A coder's last word (the top of its state) is never 0; constriction would raise a
            # plain ValueError on it.
            raise MrcFormatError("entropy stream is damaged (its last word is zero)")
        self.coder = constriction.stream.stack.AnsCoder(words)

    def indices(self, sizes):
        """Yield the values' table indices (int32) in slices of ``sizes`` (which add up to the
        stream's count); the end state and the decoded histogram are checked after the last."""
        if self.coder is None:
            for size in sizes:
                yield np.zeros(size, dtype=np.int32)
            return
        model = _categorical(self.counts)
        seen = np.zeros(self.counts.size, dtype=np.uint64)
        for size in sizes:
            try:
                index = self.coder.decode(model, int(size))
            except (ValueError, AssertionError) as exc:
                raise MrcFormatError(f"entropy stream cannot be decoded: {exc}") from None
            seen += np.bincount(index, minlength=self.counts.size).astype(np.uint64)
            yield index
        if not self.coder.is_empty() or not np.array_equal(seen, self.counts):
            raise MrcFormatError("entropy stream decodes to a histogram other than its stored table")


def decode_symbols(stream: bytes | memoryview, expected_count: int | None = None) -> np.ndarray:
    """Decode a stream from :func:`encode_symbols` into an int32 array.

    Validates the layout before allocating anything proportional to the declared sizes, and
    raises :class:`MrcFormatError` on any inconsistency (also when ``expected_count`` is given and
    differs from the stored count).
    """
    symbols, index = decode_indices(stream, expected_count)
    return symbols[index]


def decode_slices(stream: bytes | memoryview, sizes, expected_count: int | None = None):
    """Yield the decoded values (int32) in consecutive slices of ``sizes`` values each.

    Why: a decoder that turns levels into floats slice by slice never holds all the levels; the
    checks of :func:`decode_symbols` all apply (the last ones once the last slice is taken).
    """
    decoder = _Decoder(stream, expected_count)
    for index in decoder.indices(sizes):
        yield decoder.symbols[index]


def decode_indices(stream: bytes | memoryview, expected_count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`decode_symbols`, but return the table and each value's index into it.

    Why: a caller that maps symbols to something else (the lossless codec maps a field value to
    the bits it sets) can transform the small table once and gather with ``index``, instead of
    transforming every decoded value. ``symbols[index]`` is what :func:`decode_symbols` returns.
    """
    decoder = _Decoder(stream, expected_count)
    (index,) = decoder.indices([decoder.n_values])
    return decoder.symbols, index


def coded_bits(values: np.ndarray) -> int:
    """Size in bits of ``encode_symbols(values)``'s ANS words alone (no table) -- for reports."""

    values = np.ascontiguousarray(values).reshape(-1)
    table = _Table(values)
    if table.symbols.size <= 1:
        return 0
    return int(_coder(table, values).num_bits())
