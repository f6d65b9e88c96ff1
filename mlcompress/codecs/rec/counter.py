"""Counter-based hashing: the one source of randomness in REC.

Encoder and decoder must draw the same numbers on any machine, any device and any torch or
numpy version, and the decoder must be able to draw the numbers of one candidate without the
others. ``torch.Generator`` streams promise neither, so every random number in REC is a pure
function of integers: 32-bit words under exact arithmetic modulo 2^32. The spec (with test
vectors) is in docs/format.md, "REC codec".

The hash of a pair of counters ``(a, b)`` under a key is ``fmix32(row(a) ^ col(b))``, where
``row``/``col`` are themselves bijective hashes of ``a``/``b``: a full grid of values is then one
xor of a column of row hashes with a row of column hashes followed by one finalizer per element,
and distinct rows (or columns) never collide.

Each function is written once and takes the array module ``xp`` (torch by default, as the
encoder uses it; numpy for CPU decoding): words are whatever :mod:`.backend` makes them (uint32
in numpy, int32 bit patterns in torch), and :func:`fmix32_int`/:func:`stream_key` run the same
finalizer on Python ints.
"""

from __future__ import annotations

from typing import Any

from mlcompress.lazy import torch

from mlcompress.codecs.rec.backend import MASK32, PYINT, Backend, backend, from_int32, to_int32

__all__ = [
    "MASK32",
    "fmix32",
    "fmix32_int",
    "stream_key",
    "row_hash",
    "col_hash",
    "grid_hash",
    "to_int32",
    "from_int32",
    "STREAM_CANDIDATES",
    "STREAM_LAYOUT",
    "STREAM_SELECTION",
    "STREAM_ARRIVALS",
    "STREAM_TYING",
    "STREAM_SIGNS",
]

M1 = 0x85EBCA6B  # murmur3 fmix32 multipliers
M2 = 0xC2B2AE35
ROW_STEP = 0x9E3779B9  # odd Weyl increments: counter -> distinct 32-bit inputs
COL_STEP = 0x7F4A7C15
COL_SALT = 0x5BD1E995
SEED_SALT = 0x9E3779B9
STREAM_MUL = 0x632BE5AB

#: Stream numbers: independent sequences drawn from one seed.
STREAM_CANDIDATES = 0  # standard normal candidates, (candidate index, coordinate pair)
STREAM_LAYOUT = 1  # Feistel round tables of the block layout
STREAM_SELECTION = 2  # uniforms of importance sampling, (segment, block)
STREAM_ARRIVALS = 3  # Exp(1) inter-arrival times of ordered random coding, (0, candidate)
STREAM_TYING = 4  # Feistel round tables of the hashing trick's weight -> free variable map
STREAM_SIGNS = 5  # random signs of the hashing trick, (0, flat weight index)


def _finalize(b: Backend, x: Any, tmp: Any = None) -> Any:
    """murmur3's 32-bit finalizer, a bijection of words, on backend ``b``: in place for arrays.

    ``tmp`` is an optional scratch array of ``x``'s shape (saves numpy an allocation per shift).
    """
    x ^= b.srl(x, 16, tmp)
    x = b.mul(x, M1)
    x ^= b.srl(x, 13, tmp)
    x = b.mul(x, M2)
    x ^= b.srl(x, 16, tmp)
    return x


def fmix32_int(x: int) -> int:
    """murmur3's 32-bit finalizer on a Python int (a bijection of [0, 2^32))."""
    return _finalize(PYINT, x & MASK32)


def fmix32(x: Any, *, xp: Any = torch) -> Any:
    """murmur3's 32-bit finalizer on an array of ``xp`` words, in place (and returned).

    Words are uint32 (numpy) or int32 bit patterns (torch); a torch int64 tensor of values in
    [0, 2^32) is also taken, hashed as words and written back as such.
    """
    b = backend(xp)
    if b.name == "torch" and x.dtype == torch.int64:
        return x.copy_(from_int32(_finalize(b, to_int32(x))))
    return _finalize(b, x)


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of ``(seed, stream)``; ``seed`` in [0, 2^64), ``stream`` in [0, 2^32)."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    if not 0 <= stream < 1 << 32:
        raise ValueError(f"stream must be in [0, 2^32), got {stream}")
    k = fmix32_int((seed & MASK32) ^ SEED_SALT)
    k = fmix32_int(k ^ (seed >> 32))
    return fmix32_int(k ^ ((stream * STREAM_MUL) & MASK32))


def _counter_hash(b: Backend, a: Any, step: int, offset: int) -> Any:
    x = b.mul(b.words(a), step)
    x += b.word(offset)
    return _finalize(b, x)


def row_hash(key: int, a: Any, *, xp: Any = torch) -> Any:
    """Words ``fmix32((key + a * 0x9E3779B9) mod 2^32)`` for integer counters ``a`` in [0, 2^32)."""
    return _counter_hash(backend(xp), a, ROW_STEP, key)


def col_hash(key: int, b: Any, *, xp: Any = torch) -> Any:
    """Words ``fmix32((key ^ 0x5BD1E995) + b * 0x7F4A7C15 mod 2^32)`` for counters ``b`` in [0, 2^32)."""
    return _counter_hash(backend(xp), b, COL_STEP, key ^ COL_SALT)


def grid_hash(rows: Any, cols: Any, *, xp: Any = torch) -> Any:
    """Words ``fmix32(rows[:, None] ^ cols[None, :])``: every (row, column) pair.

    ``rows``/``cols`` are words from :func:`row_hash`/:func:`col_hash`; one element of the result
    equals the same element computed alone, whatever the batch (it is elementwise).
    """
    h = rows[:, None] ^ cols[None, :]
    b = backend(xp)
    return _finalize(b, h, b.scratch_like(h))
