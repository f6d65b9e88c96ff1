"""The entropy stream (mlcompress.codecs.entropy): exact round trips and strict validation of damage."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from mlcompress.codecs import entropy
from mlcompress.errors import MrcFormatError


def _roundtrip(values: np.ndarray) -> np.ndarray:
    stream = entropy.encode_symbols(values)
    out = entropy.decode_symbols(stream, expected_count=values.size)
    assert out.dtype == np.int32
    return out


@pytest.mark.parametrize(
    "values",
    [
        np.array([], dtype=np.int64),
        np.array([7], dtype=np.int64),
        np.full(1000, -3, dtype=np.int32),
        np.array([0, 1], dtype=np.uint8),
        np.array([-(2**31), 2**31 - 1, 0, -1, 5] * 30, dtype=np.int64),
        np.random.default_rng(0).integers(-50, 50, 5000),
        np.random.default_rng(1).geometric(0.3, 20_000) - 10,
        np.random.default_rng(2).integers(0, 256, 10_000).astype(np.uint8),
    ],
    ids=["empty", "single", "constant-negative", "two", "int32-extremes", "uniform-signed", "skewed", "bytes"],
)
def test_roundtrip_exact(values):
    out = _roundtrip(values)
    np.testing.assert_array_equal(out, values.astype(np.int64))


def test_wide_alphabet_takes_the_sorting_path():
    # A range over 2**20 goes through np.unique rather than the counting fast path.
    values = np.array([-(2**30), 2**30, 0, 5, 2**30, -7] * 100, dtype=np.int64)
    np.testing.assert_array_equal(_roundtrip(values), values)


def test_single_symbol_stream_has_no_words():
    stream = entropy.encode_symbols(np.full(10_000, 42))
    # u32 n_table, i32 symbol, u64 count, u64 n_values, u32 n_words: nothing else.
    assert len(stream) == 4 + 4 + 8 + 8 + 4
    np.testing.assert_array_equal(entropy.decode_symbols(stream), np.full(10_000, 42))


def test_skewed_data_compresses_near_entropy():
    rng = np.random.default_rng(3)
    p = np.array([0.7, 0.2, 0.05, 0.05])
    values = rng.choice(4, size=50_000, p=p)
    stream = entropy.encode_symbols(values)
    counts = np.bincount(values) / values.size
    ideal_bytes = -(counts * np.log2(counts)).sum() * values.size / 8
    assert ideal_bytes < len(stream) < ideal_bytes * 1.01 + 100


def test_symbols_outside_int32_are_refused():
    with pytest.raises(ValueError, match="int32"):
        entropy.encode_symbols(np.array([0, 2**31]))


def _parts(stream: bytes) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    (n,) = struct.unpack_from("<I", stream, 0)
    symbols = np.frombuffer(stream, "<i4", n, 4).copy()
    counts = np.frombuffer(stream, "<u8", n, 4 + 4 * n).copy()
    n_values, n_words = struct.unpack_from("<QI", stream, 4 + 12 * n)
    words = np.frombuffer(stream, "<u4", n_words, 4 + 12 * n + 12).copy()
    return symbols, counts, n_values, words


def _build(symbols, counts, n_values, words) -> bytes:
    symbols = np.asarray(symbols, "<i4")
    return b"".join([
        struct.pack("<I", symbols.size), symbols.tobytes(), np.asarray(counts, "<u8").tobytes(),
        struct.pack("<QI", n_values, len(words)), np.asarray(words, "<u4").tobytes(),
    ])


@pytest.fixture
def stream() -> bytes:
    return entropy.encode_symbols(np.random.default_rng(4).integers(-5, 5, 3000))


def test_rebuild_helper_is_faithful(stream):
    assert _build(*_parts(stream)) == stream


@pytest.mark.parametrize("cut", [0, 2, 4, 10, -40, -4, -1])
def test_truncated_stream(stream, cut):
    with pytest.raises(MrcFormatError, match="truncated|does not match its declared word count"):
        entropy.decode_symbols(stream[:cut])


def test_extra_bytes_after_stream(stream):
    with pytest.raises(MrcFormatError, match="does not match its declared word count"):
        entropy.decode_symbols(stream + b"\0\0\0\0")


def test_wrong_expected_count(stream):
    with pytest.raises(MrcFormatError, match="holds 3000 values, expected 2999"):
        entropy.decode_symbols(stream, expected_count=2999)


def test_counts_not_summing(stream):
    symbols, counts, n_values, words = _parts(stream)
    with pytest.raises(MrcFormatError, match="counts do not add up"):
        entropy.decode_symbols(_build(symbols, counts, n_values + 1, words))


def test_nonincreasing_table(stream):
    symbols, counts, n_values, words = _parts(stream)
    symbols[[0, 1]] = symbols[[1, 0]]
    with pytest.raises(MrcFormatError, match="not strictly increasing"):
        entropy.decode_symbols(_build(symbols, counts, n_values, words))


def test_duplicate_symbol_in_table(stream):
    symbols, counts, n_values, words = _parts(stream)
    symbols[1] = symbols[0]
    with pytest.raises(MrcFormatError, match="not strictly increasing"):
        entropy.decode_symbols(_build(symbols, counts, n_values, words))


def test_zero_count_in_table(stream):
    symbols, counts, n_values, words = _parts(stream)
    counts[0], counts[1] = 0, counts[1] + counts[0]
    with pytest.raises(MrcFormatError, match="positive counts"):
        entropy.decode_symbols(_build(symbols, counts, n_values, words))


def test_oversize_table_is_refused_before_allocation():
    bad = struct.pack("<I", entropy.MAX_TABLE + 1) + bytes(16)
    with pytest.raises(MrcFormatError, match="above the limit"):
        entropy.decode_symbols(bad)


def test_swapped_counts_change_the_histogram(stream):
    # Counts that still add up but belong to a different table: the decoded histogram disagrees
    # (or the coder runs dry), never a silently wrong array.
    symbols, counts, n_values, words = _parts(stream)
    counts = counts[::-1].copy()
    assert not np.array_equal(counts, _parts(stream)[1])
    with pytest.raises(MrcFormatError):
        entropy.decode_symbols(_build(symbols, counts, n_values, words))


def test_damaged_words_are_detected(stream):
    symbols, counts, n_values, words = _parts(stream)
    words = words[:-1]
    with pytest.raises(MrcFormatError):
        entropy.decode_symbols(_build(symbols, counts, n_values, words))


def test_single_symbol_stream_with_words_is_refused():
    with pytest.raises(MrcFormatError, match="must not carry coded words"):
        entropy.decode_symbols(_build([3], [5], 5, [1]))


def test_empty_stream_with_values_is_refused():
    with pytest.raises(MrcFormatError, match="do not add up"):
        entropy.decode_symbols(_build([], [], 4, []))


def test_decode_indices_agrees_with_decode_symbols(stream):
    table, index = entropy.decode_indices(stream, expected_count=3000)
    np.testing.assert_array_equal(table[index], entropy.decode_symbols(stream))
    assert np.all(np.diff(table) > 0) and index.min() >= 0 and index.max() < table.size


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64])
def test_encode_if_smaller_matches_encode_then_compare(dtype):
    # The shortcut that skips the coder for incompressible data must never change the outcome.
    rng = np.random.default_rng(5)
    for trial in range(40):
        n = int(rng.integers(1, 3000))
        k = int(rng.integers(1, 256))
        p = rng.dirichlet(np.full(k, float(rng.choice([0.05, 1.0, 100.0]))))
        values = rng.choice(k, size=n, p=p).astype(dtype)
        full = entropy.encode_symbols(values)
        for limit in (len(full) - 1, len(full), len(full) + 1, n, 2 * n):
            got = entropy.encode_if_smaller(values, limit)
            assert got == (full if len(full) < limit else None), (trial, limit)
