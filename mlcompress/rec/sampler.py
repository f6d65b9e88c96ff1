"""Reproducible REC candidates: standard normal variates as a pure function of counters.

Candidate ``k`` of a REC stream is a vector ``z_k`` of standard normal variates, coordinate ``j``
of which is a pure function of ``(seed, k, j)``: any candidate can be regenerated alone, in any
batch, on CPU or CUDA, and gives the same float32 bits. That is what lets a ``.mrc`` file store
only the chosen index of each block.

The transform is integer-only up to one table lookup (docs/format.md, "REC codec"):

* ``h = fmix32(row(k) ^ col(j >> 1))`` under the key of ``(seed, STREAM_CANDIDATES)``
  (:mod:`mlcompress.rec.counter`); even ``j`` use the high 16 bits of ``h``, odd ``j`` the low 16.
* ``z = NORMAL_TABLE[those 16 bits]``, where ``NORMAL_TABLE[i]`` is the float32 rounding of the
  standard normal quantile at ``(i + 0.5) / 65536``.

Why a table: transcendental functions (log, cos, erfinv) differ by an ulp between CPU, CUDA and
compiled code, so Box-Muller can give different float32 bits on different machines. A lookup
cannot. The price is a discrete N(0, 1) with 65536 equiprobable values and tails cut at
``|z| <= 4.33``; the table is built once with Python's own float64 ``NormalDist.inv_cdf`` and pinned
by a CRC-32 so a platform whose arithmetic differs is caught, not trusted.

Weights are ``w = nu + rho * z`` as two separately rounded float32 operations (multiply, then
add; never a fused multiply-add): :func:`candidate_weights` is the one decode path.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from statistics import NormalDist

import numpy as np
import torch

from mlcompress.rec.counter import (
    MASK32,
    STREAM_CANDIDATES,
    col_hash,
    from_int32,
    grid_hash,
    row_hash,
    stream_key,
)

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
def _normal_table_cpu() -> torch.Tensor:
    dist = NormalDist()
    q = np.array([dist.inv_cdf((i + 0.5) / _TABLE_SIZE) for i in range(_TABLE_SIZE)], dtype=np.float64)
    table = q.astype("<f4")
    crc = zlib.crc32(table.tobytes())
    if NORMAL_TABLE_CRC32 and crc != NORMAL_TABLE_CRC32:
        raise RuntimeError(
            f"REC normal table checksum {crc:#010x} != {NORMAL_TABLE_CRC32:#010x}: this platform's "
            "float64 arithmetic differs; REC files would not decode identically here"
        )
    return torch.from_numpy(table.astype(np.float32))


_DEVICE_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def normal_table(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(table, table**2)`` as float32 tensors on ``device`` (the square only for scoring)."""
    key = str(torch.device(device))
    if key not in _DEVICE_TABLES:
        cpu = _normal_table_cpu()
        _DEVICE_TABLES[key] = (cpu.to(device), (cpu * cpu).to(device))
    return _DEVICE_TABLES[key]


def candidate_codes(seed: int, k: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 ``[len(k), dim]``: the 16-bit table code of coordinate ``j`` of candidate ``k``.

    Computed on ``k``'s device; the codes are exact integers, equal everywhere. (Coordinates
    past ``dim`` in the last pair are computed and dropped: a shorter candidate is a prefix.)
    """
    key = stream_key(seed, STREAM_CANDIDATES)
    pairs = (dim + 1) // 2
    rows = row_hash(key, k)
    cols = col_hash(key, torch.arange(pairs, dtype=torch.int64, device=k.device))
    h = grid_hash(rows, cols)
    codes = torch.empty((k.shape[0], pairs, 2), dtype=torch.int32, device=k.device)
    torch.bitwise_and(h >> TABLE_BITS, _LOW_MASK, out=codes[:, :, 0])
    torch.bitwise_and(h, _LOW_MASK, out=codes[:, :, 1])
    codes = codes.view(k.shape[0], 2 * pairs)
    return codes if dim == 2 * pairs else codes[:, :dim]


def candidates(seed: int, k: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 ``[len(k), dim]``: standard normal candidates ``z_k`` (first ``dim`` coordinates)."""
    table, _ = normal_table(k.device)
    codes = candidate_codes(seed, k, dim).contiguous()
    return torch.index_select(table, 0, codes.view(-1)).view(codes.shape)


def candidate_weights(z: torch.Tensor, nu: torch.Tensor | float, rho: torch.Tensor | float) -> torch.Tensor:
    """``nu + rho * z`` in float32, rounded after the product and after the sum (no FMA).

    The single decode path of REC weights: the encoder's statistics and the decoder's output both
    go through it, so a file decodes to the same bits on every device.
    """
    prod = torch.mul(z, torch.as_tensor(rho, dtype=torch.float32, device=z.device))
    return torch.add(prod, torch.as_tensor(nu, dtype=torch.float32, device=z.device))


def uniforms(seed: int, stream: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 ``[len(a), len(b)]`` uniforms in (0, 1): ``(hash(a_i, b_j) + 0.5) / 2^32``.

    Used for the encoder's selection randomness (never by the decoder).
    """
    key = stream_key(seed, stream)
    h = from_int32(grid_hash(row_hash(key, a), col_hash(key, b)))
    return (h.to(torch.float64) + 0.5) * (1.0 / (MASK32 + 1))
