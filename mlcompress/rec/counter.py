"""Counter-based hashing with torch integer ops: the one source of randomness in REC.

Encoder and decoder must draw the same numbers on any machine, any device and any torch
version, and the decoder must be able to draw the numbers of one candidate without the others.
``torch.Generator`` streams promise neither, so every random number in ``mlcompress.rec`` is a
pure function of integers, computed here with int64 tensors whose values are kept in 32 bits by
masks (int64 products wrap as two's complement on CPU and CUDA, and the low 32 bits of a product
are exact either way). The spec (with test vectors) is in docs/format.md, "REC codec".

The hash of a pair of counters ``(a, b)`` under a key is ``fmix32(row(a) ^ col(b))``, where
``row``/``col`` are themselves bijective hashes of ``a``/``b``: a full grid of values is then one
xor of a column of row hashes with a row of column hashes followed by one finalizer per element,
and distinct rows (or columns) never collide.

Two implementations of the same function: :func:`fmix32` on int64 holding ``[0, 2^32)`` (the
reference, obviously portable) and :func:`fmix32_i32` on int32 bit patterns, about three times
faster, used for the large grids. The int32 one relies on torch's int32 multiply wrapping modulo
2^32 (it does, on CPU and CUDA); tests/test_rec_sampler.py checks it against the reference.
"""

from __future__ import annotations

import torch

__all__ = [
    "MASK32",
    "fmix32",
    "fmix32_int",
    "stream_key",
    "row_hash",
    "col_hash",
    "grid_hash",
    "fmix32_i32",
    "to_int32",
    "from_int32",
    "STREAM_CANDIDATES",
    "STREAM_LAYOUT",
    "STREAM_SELECTION",
    "STREAM_ARRIVALS",
]

MASK32 = 0xFFFFFFFF
_M1 = 0x85EBCA6B  # murmur3 fmix32 multipliers
_M2 = 0xC2B2AE35
_ROW_STEP = 0x9E3779B9  # odd Weyl increments: counter -> distinct 32-bit inputs
_COL_STEP = 0x7F4A7C15
_COL_SALT = 0x5BD1E995
_SEED_SALT = 0x9E3779B9
_STREAM_MUL = 0x632BE5AB

#: Stream numbers: independent sequences drawn from one seed.
STREAM_CANDIDATES = 0  # standard normal candidates, (candidate index, coordinate pair)
STREAM_LAYOUT = 1  # Feistel round tables of the block layout
STREAM_SELECTION = 2  # uniforms of importance sampling, (segment, block)
STREAM_ARRIVALS = 3  # Exp(1) inter-arrival times of ordered random coding, (0, candidate)


def fmix32_int(x: int) -> int:
    """murmur3's 32-bit finalizer on a Python int (a bijection of [0, 2^32))."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 13
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on an int64 tensor holding values in [0, 2^32). In place."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_M1).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 13)
    x.mul_(_M2).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 16)
    return x


def _signed(c: int) -> int:
    return c - (1 << 32) if c >= 1 << 31 else c


_M1_S, _M2_S = _signed(_M1), _signed(_M2)


def fmix32_i32(x: torch.Tensor) -> torch.Tensor:
    """:func:`fmix32` on an int32 tensor of 32-bit patterns (logical shifts by masking). In place."""
    x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))
    x.mul_(_M1_S)
    x.bitwise_xor_((x >> 13).bitwise_and_(0x7FFFF))
    x.mul_(_M2_S)
    x.bitwise_xor_((x >> 16).bitwise_and_(0xFFFF))
    return x


def to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in ``[0, 2^32)`` -> int32 tensors with the same bit patterns."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def from_int32(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns -> int64 values in ``[0, 2^32)``."""
    return x.to(torch.int64).bitwise_and_(MASK32)


def stream_key(seed: int, stream: int) -> int:
    """The 32-bit key of ``(seed, stream)``; ``seed`` in [0, 2^64), ``stream`` in [0, 2^32)."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    if not 0 <= stream < 1 << 32:
        raise ValueError(f"stream must be in [0, 2^32), got {stream}")
    k = fmix32_int((seed & MASK32) ^ _SEED_SALT)
    k = fmix32_int(k ^ (seed >> 32))
    return fmix32_int(k ^ ((stream * _STREAM_MUL) & MASK32))


def row_hash(key: int, a: torch.Tensor) -> torch.Tensor:
    """``fmix32((key + a * 0x9E3779B9) mod 2^32)`` for int64 counters ``a`` in [0, 2^32)."""
    return fmix32((a.to(torch.int64) * _ROW_STEP + key).bitwise_and_(MASK32))


def col_hash(key: int, b: torch.Tensor) -> torch.Tensor:
    """``fmix32((key ^ 0x5BD1E995) + b * 0x7F4A7C15 mod 2^32)`` for counters ``b`` in [0, 2^32)."""
    return fmix32((b.to(torch.int64) * _COL_STEP + (key ^ _COL_SALT)).bitwise_and_(MASK32))


def grid_hash(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``fmix32(rows[:, None] ^ cols[None, :])`` as int32 bit patterns: every (row, column) pair.

    ``rows``/``cols`` come from :func:`row_hash`/:func:`col_hash`; one element of the result
    equals the same element computed alone, whatever the batch (it is elementwise).
    """
    return fmix32_i32(torch.bitwise_xor(to_int32(rows)[:, None], to_int32(cols)[None, :]))
