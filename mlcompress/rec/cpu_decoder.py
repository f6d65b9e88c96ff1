"""REC decoding on the CPU in numpy: the same integers as the torch path, at a fraction of the cost.

The torch implementation (:mod:`.counter`, :mod:`.layout`, :mod:`.sampler`, :mod:`.decoder`) is
the one the encoder and CUDA decoding use. On the CPU, decoding a whole file is dominated by
fixed costs: a LeNet-5 posterior has seven small REC tensors, and each needs ~150 elementwise
integer ops (hash finalizers, Feistel rounds, cycle walking), which torch dispatches at several
microseconds apiece however small the tensor. numpy dispatches the same ops in about one, and on
cache-sized slices is as fast per element, so this module computes the CPU decode here.

It is a second implementation of the spec in docs/format.md ("REC codec"), not a new format:
every value is an exact 32-bit integer operation (uint32 arithmetic wraps modulo 2^32 in numpy as
the int32/int64-masked ops do in torch), followed by the one table lookup and the float32
``nu + rho * z`` with two separate roundings. tests/test_rec_cpu_decoder.py checks it against the
torch path on many shapes and seeds, and both against the documented test vectors.
"""

from __future__ import annotations

import numpy as np
import torch

from mlcompress.rec.counter import (
    STREAM_CANDIDATES,
    STREAM_LAYOUT,
    stream_key,
)
from mlcompress.rec.counter import _COL_SALT, _COL_STEP, _M1, _M2, _ROW_STEP  # the spec's constants
from mlcompress.rec.layout import FEISTEL_ROUNDS, BlockLayout
from mlcompress.rec.sampler import TABLE_BITS, normal_table

__all__ = ["decode_weights_cpu"]

_U32 = np.uint32
_LOW_MASK = _U32((1 << TABLE_BITS) - 1)
# Values per slice: small enough that a slice's passes stay in the CPU cache (2^13 to 2^16 were
# timed on a LeNet-5 file; 2^15 and 2^16 tied, 2^13 was 25% slower). The gather into place runs
# per slice too, so no full-size index arrays are built.
_SLICE = 1 << 15


def _fmix32(x: np.ndarray) -> np.ndarray:
    """murmur3's finalizer on a uint32 array, in place (``x`` is also returned)."""
    tmp = np.empty_like(x)
    np.right_shift(x, _U32(16), out=tmp)
    x ^= tmp
    x *= _U32(_M1)
    np.right_shift(x, _U32(13), out=tmp)
    x ^= tmp
    x *= _U32(_M2)
    np.right_shift(x, _U32(16), out=tmp)
    x ^= tmp
    return x


def _row_hash(key: int, a: np.ndarray) -> np.ndarray:
    return _fmix32(a.astype(_U32) * _U32(_ROW_STEP) + _U32(key))


def _col_hash(key: int, b: np.ndarray) -> np.ndarray:
    return _fmix32(b.astype(_U32) * _U32(_COL_STEP) + _U32(key ^ _COL_SALT))


def _grid_hash(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return _fmix32(np.bitwise_xor(rows[:, None], cols[None, :]))


class _Permutation:
    """The layout's keyed Feistel permutation (see :class:`BlockLayout`) on int32 arrays."""

    def __init__(self, layout: BlockLayout) -> None:
        self.numel = layout.numel
        self.a, self.m, self.r = layout._sides()
        key = stream_key(layout.seed, STREAM_LAYOUT)
        rows = _row_hash(key, np.arange(FEISTEL_ROUNDS))
        cols = _col_hash(key, np.arange(max(self.a, self.r)))
        grid = _grid_hash(rows, cols)
        self.tables = []
        for t in range(FEISTEL_ROUNDS):
            other, modulus = (self.r, self.a) if t % 2 == 0 else (self.a, self.r)
            self.tables.append((grid[t, :other] % _U32(modulus)).astype(np.int32))

    def _inverse_rounds(self, x: np.ndarray) -> np.ndarray:
        a, m, r = np.int32(self.a), self.m, self.r
        left = x >> m
        right = x & np.int32(r - 1)
        tmp = np.empty_like(x)
        for t in reversed(range(FEISTEL_ROUNDS)):
            table = self.tables[t]
            if t % 2 == 0:
                left -= np.take(table, right)
                np.right_shift(left, 31, out=tmp)  # -1 where negative, else 0
                tmp &= a
                left += tmp
            else:
                right -= np.take(table, left)
                right &= np.int32(r - 1)
        left <<= m
        left |= right
        return left

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Position of each flat index in ``x`` (int32), with cycle walking."""
        y = np.empty_like(x)
        for s0 in range(0, x.size, _SLICE):
            y[s0 : s0 + _SLICE] = self._inverse_rounds(x[s0 : s0 + _SLICE])
        idx = np.flatnonzero(y >= self.numel)
        while idx.size:
            walked = self._inverse_rounds(y[idx])
            y[idx] = walked
            idx = idx[walked >= self.numel]
        return y


def _candidate_z(key: int, k: np.ndarray, dim: int, table: np.ndarray) -> np.ndarray:
    """float32 ``[len(k), dim]``: standard normal candidates ``z_k`` (:func:`.sampler.candidates`)."""
    pairs = (dim + 1) // 2
    h = _grid_hash(_row_hash(key, k), _col_hash(key, np.arange(pairs)))
    z = np.empty((k.size, pairs, 2), dtype=np.float32)
    np.take(table, h >> _U32(TABLE_BITS), out=z[:, :, 0])
    np.take(table, h & _LOW_MASK, out=z[:, :, 1])
    z = z.reshape(k.size, 2 * pairs)
    return z if dim == 2 * pairs else z[:, :dim]


def decode_weights_cpu(
    layout: BlockLayout,
    indices: torch.Tensor | np.ndarray,
    *,
    seed: int,
    prior_mean: float,
    prior_std: float,
) -> torch.Tensor:
    """float32 CPU ``[layout.numel]``: what :func:`.decoder.decode_weights` returns, computed in numpy."""
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
    if idx.shape != (layout.num_blocks,):
        raise ValueError(f"expected {layout.num_blocks} indices, got {tuple(idx.shape)}")
    table = normal_table("cpu")[0].numpy()
    key = stream_key(seed, STREAM_CANDIDATES)
    base, extra = divmod(layout.numel, layout.num_blocks)
    z = np.empty(layout.numel, dtype=np.float32)
    done = 0
    for first, last, size in ((0, extra, base + 1), (extra, layout.num_blocks, base)):
        per_slice = max(1, _SLICE // size)
        for b0 in range(first, last, per_slice):
            b1 = min(last, b0 + per_slice)
            part = _candidate_z(key, idx[b0:b1], size, table)
            z[done : done + part.size] = part.reshape(-1)
            done += part.size
    # w = nu + rho * z: float32 product, then float32 sum (two roundings, as the torch path).
    z *= np.float32(prior_std)
    z += np.float32(prior_mean)
    # Gather into place slice by slice: out[f] = z[position_of(f)].
    permutation = _Permutation(layout)
    out = np.empty(layout.numel, dtype=np.float32)
    for s0 in range(0, layout.numel, _SLICE):
        s1 = min(layout.numel, s0 + _SLICE)
        np.take(z, permutation.inverse(np.arange(s0, s1, dtype=np.int32)), out=out[s0:s1])
    return torch.from_numpy(out)
