"""Reproducible REC candidates: standard normal variates as a pure function of counters.

Candidate ``k`` of a REC stream is a vector ``z_k`` of standard normal variates, coordinate ``j``
of which is a pure function of ``(seed, k, j)``: any candidate can be regenerated alone, in any
batch, on CPU or CUDA, and gives the same float32 bits. That is what lets a ``.mrc`` file store
only the chosen index of each block.

The transform is integer-only up to one table lookup (docs/format.md, "REC codec"):

* ``h = fmix32(row(k) ^ col(j >> 1))`` under the key of ``(seed, STREAM_CANDIDATES)``
  (:mod:`mlcompress.codecs.rec.counter`); even ``j`` use the high 16 bits of ``h``, odd ``j`` the low 16.
* ``z = NORMAL_TABLE[those 16 bits]``, where ``NORMAL_TABLE[i]`` is the float32 rounding of the
  standard normal quantile at ``(i + 0.5) / 65536``.

Why a table: transcendental functions (log, cos, erfinv) differ by an ulp between CPU, CUDA and
compiled code, so Box-Muller can give different float32 bits on different machines. A lookup
cannot. The price is a discrete N(0, 1) with 65536 equiprobable values and tails cut at
``|z| <= 4.33``; the table is built once with Python's own float64 ``NormalDist.inv_cdf`` and pinned
by a CRC-32 so a platform whose arithmetic differs is caught, not trusted.

Weights are ``w = nu + rho * z`` as two separately rounded float32 operations (multiply, then
add; never a fused multiply-add): :func:`candidate_weights` is the one decode path.

Every function takes the array module ``xp`` (torch by default, as the encoder uses it; numpy for
CPU decoding) and is written once for both (:mod:`.backend`).
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from statistics import NormalDist
from typing import Any

from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch

from mlcompress.codecs.rec.backend import MASK32, backend
from mlcompress.codecs.rec.counter import STREAM_CANDIDATES, col_hash, grid_hash, row_hash, stream_key

__all__ = [
    "TABLE_BITS",
    "NORMAL_TABLE_CRC32",
    "normal_table",
    "candidate_codes",
    "candidates",
    "candidate_weights",
    "uniforms",
]

TABLE_BITS = 16
_TABLE_SIZE = 1 << TABLE_BITS
_LOW_MASK = _TABLE_SIZE - 1
#: CRC-32 of the table's little-endian float32 bytes; part of the format.
NORMAL_TABLE_CRC32 = 0x1296E3AD


@lru_cache(maxsize=1)
def _normal_table_numpy() -> tuple[Any, Any]:
    dist = NormalDist()
    q = np.array([dist.inv_cdf((i + 0.5) / _TABLE_SIZE) for i in range(_TABLE_SIZE)], dtype=np.float64)
    table = q.astype("<f4")
    crc = zlib.crc32(table.tobytes())
    if NORMAL_TABLE_CRC32 and crc != NORMAL_TABLE_CRC32:
        raise RuntimeError(
            f"REC normal table checksum {crc:#010x} != {NORMAL_TABLE_CRC32:#010x}: this platform's "
            "float64 arithmetic differs; REC files would not decode identically here"
        )
    table = table.astype(np.float32)
    table.flags.writeable = False  # shared by every caller
    square = table * table
    square.flags.writeable = False
    return table, square


_DEVICE_TABLES: dict[str, tuple[Any, Any]] = {}


def normal_table(device: torch.device | str = "cpu", *, xp: Any = torch) -> tuple[Any, Any]:
    """``(table, table**2)`` as float32 ``xp`` arrays on ``device`` (the square only for scoring)."""
    if backend(xp).name == "numpy":
        return _normal_table_numpy()
    key = str(torch.device(device))
    if key not in _DEVICE_TABLES:
        table, square = _normal_table_numpy()
        # copies: torch tensors are writable, and the cached numpy arrays are shared read-only
        _DEVICE_TABLES[key] = (torch.tensor(table, device=device), torch.tensor(square, device=device))
    return _DEVICE_TABLES[key]


def code_grid(key: int, k: Any, cols: Any, *, xp: Any = torch) -> Any:
    """int32 ``[len(k), 2 * len(cols)]``: the 16-bit table codes of candidates ``k`` (counters).

    ``key`` is the stream key of ``(seed, STREAM_CANDIDATES)`` and ``cols`` the column hashes of
    the coordinate pairs (:func:`col_hash` of ``0 .. pairs - 1``): pair ``p`` of candidate ``k``
    is hashed once, its high 16 bits coding coordinate ``2p`` and its low 16 bits ``2p + 1``.
    """
    b = backend(xp)
    h = grid_hash(row_hash(key, k, xp=xp), cols, xp=xp)
    # int32 in both backends (numpy gathers with int32 indices faster than with uint32 ones)
    codes = b.empty((h.shape[0], h.shape[1], 2), "int32", b.device(h))
    b.srl(h, TABLE_BITS, out=codes[:, :, 0])
    xp.bitwise_and(h, _LOW_MASK, out=codes[:, :, 1])
    return codes.reshape(h.shape[0], 2 * h.shape[1])


def candidate_codes(seed: int, k: Any, dim: int, *, xp: Any = torch) -> Any:
    """int32 ``[len(k), dim]``: the 16-bit table code of coordinate ``j`` of candidate ``k``.

    Computed on ``k``'s device; the codes are exact integers, equal everywhere. (Coordinates
    past ``dim`` in the last pair are computed and dropped: a shorter candidate is a prefix.)
    """
    b = backend(xp)
    key = stream_key(seed, STREAM_CANDIDATES)
    cols = col_hash(key, b.arange_words((dim + 1) // 2, b.device(k)), xp=xp)
    codes = code_grid(key, k, cols, xp=xp)
    return codes if dim == codes.shape[1] else codes[:, :dim]


def candidates(seed: int, k: Any, dim: int, *, xp: Any = torch) -> Any:
    """float32 ``[len(k), dim]``: standard normal candidates ``z_k`` (first ``dim`` coordinates)."""
    b = backend(xp)
    table, _ = normal_table(b.device(k), xp=xp)
    codes = candidate_codes(seed, k, dim, xp=xp)
    return b.take(table, codes.reshape(-1)).reshape(codes.shape)


def candidate_weights(z: Any, nu: Any, rho: Any, *, xp: Any = torch, out: Any = None) -> Any:
    """``nu + rho * z`` in float32, rounded after the product and after the sum (no FMA).

    The single decode path of REC weights: the encoder's statistics and the decoder's output both
    go through it, so a file decodes to the same bits on every device. ``out`` may be ``z``
    (in place); ``nu``/``rho`` are numbers or arrays broadcasting against ``z``.
    """
    b = backend(xp)
    prod = xp.multiply(z, b.float32(rho, z), out=out)
    return xp.add(prod, b.float32(nu, z), out=out)


def uniforms(seed: int, stream: int, a: Any, b: Any, *, xp: Any = torch) -> Any:
    """float64 ``[len(a), len(b)]`` uniforms in (0, 1): ``(hash(a_i, b_j) + 0.5) / 2^32``.

    Used for the encoder's selection randomness (never by the decoder).
    """
    key = stream_key(seed, stream)
    h = backend(xp).unsigned_f64(grid_hash(row_hash(key, a, xp=xp), col_hash(key, b, xp=xp), xp=xp))
    h += 0.5
    h *= 1.0 / (MASK32 + 1)
    return h
