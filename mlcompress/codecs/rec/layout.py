"""Block layout: which weights of a tensor form which REC block.

MIRACLE splits a tensor's weights at random into blocks of about equal size, each coded by one
candidate index. The split must be reproducible by the decoder from header fields alone
(``numel``, ``num_blocks``, ``seed``): no index lists are stored. It must also be cheap, since the
decoder pays for it on every weight; a sort of random keys costs more than all the rest of decoding.
So the layout is a keyed pseudo-random *bijection* of positions, evaluated per index:

* Positions ``p`` in ``[0, numel)`` are in block order: block ``b`` holds the ``size_b``
  consecutive positions from ``start_b``, sizes ``numel // B`` plus one for the first
  ``numel % B`` blocks. Slot ``j`` of block ``b`` is position ``start_b + j``.
* Position ``p`` maps to the flat (row-major) weight index ``perm(p)``: a 4-round Feistel network
  on the mixed-radix domain ``[0, A) x [0, R)`` (``R = 2^m``, ``m = ceil(bits(numel - 1) / 2)``,
  ``A = ceil(numel / R)``), each round adding a keyed table lookup modulo the side's size, and
  cycle-walking the few values that land in ``[numel, A*R)``. Round tables come from
  :mod:`mlcompress.codecs.rec.counter`, so this is bit-identical everywhere. The exact recipe
  (with test vectors) is in docs/format.md.

The network is :class:`Permutation`, written once over the array module ``xp`` (numpy for CPU
decoding, torch for the encoder and CUDA; :mod:`.backend`); :class:`BlockLayout`'s index methods
take ``xp`` too and default to torch.

Luby-Rackoff: four Feistel rounds with independent random round functions give a pseudo-random
permutation, which is all blocks need (each block a random sample of the tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlcompress.lazy import torch

from mlcompress.codecs.rec.backend import backend
from mlcompress.codecs.rec.counter import STREAM_LAYOUT, col_hash, grid_hash, row_hash, stream_key

__all__ = ["BlockLayout", "Permutation", "FEISTEL_ROUNDS"]

FEISTEL_ROUNDS = 4


@dataclass(frozen=True)
class BlockLayout:
    """The split of ``numel`` weights into ``num_blocks`` blocks under ``seed``.

    All methods are pure functions of these three fields. ``device`` arguments only say where
    the (integer, exact) results are computed.
    """

    numel: int
    num_blocks: int
    seed: int

    def __post_init__(self) -> None:
        if self.numel < 1:
            raise ValueError(f"BlockLayout: numel must be >= 1, got {self.numel}")
        if not 1 <= self.num_blocks <= self.numel:
            raise ValueError(
                f"BlockLayout: num_blocks must be in [1, numel={self.numel}], got {self.num_blocks}"
            )
        if self.numel >= 1 << 31:
            raise ValueError(f"BlockLayout: at most 2^31 - 1 weights per tensor, got {self.numel}")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError(f"BlockLayout: seed must be in [0, 2^64), got {self.seed}")

    # -- block sizes -------------------------------------------------------------------------
    @property
    def max_block_size(self) -> int:
        """Size of the largest block, ``ceil(numel / num_blocks)``."""
        return -(-self.numel // self.num_blocks)

    def block_sizes(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 ``[num_blocks]``: ``numel // B`` plus one for the first ``numel % B`` blocks."""
        base, extra = divmod(self.numel, self.num_blocks)
        sizes = torch.full((self.num_blocks,), base, dtype=torch.int64, device=device)
        sizes[:extra] += 1
        return sizes

    def block_starts(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 ``[num_blocks]``: first position of each block."""
        base, extra = divmod(self.numel, self.num_blocks)
        b = torch.arange(self.num_blocks, dtype=torch.int64, device=device)
        return b * base + torch.clamp(b, max=extra)

    # -- the permutation ---------------------------------------------------------------------
    def _sides(self) -> tuple[int, int, int]:
        """``(A, m, R = 2^m)``: positions are split as ``x = left * R + right``, ``left < A``."""
        m = ((self.numel - 1).bit_length() + 1) // 2
        r = 1 << m
        return -(-self.numel // r), m, r

    def _map(self, x: Any, device: Any, dtype: Any, xp: Any, inverse: bool) -> Any:
        b = backend(xp)
        if x is not None:
            x = b.to_device(x, device)
        return b.astype(Permutation(self, xp=xp, device=device)(x, inverse=inverse), dtype)

    def flat_index(
        self,
        positions: Any = None,
        device: torch.device | str = "cpu",
        dtype: Any = None,
        *,
        xp: Any = torch,
    ) -> Any:
        """Flat weight index of each position (default: all positions, in block order).

        Computing a subset gives the same values as computing all and indexing: each position
        is mapped on its own. ``dtype``: int64 (``None``, the default) or int32 (what
        index_select also takes). ``xp``: the array module of ``positions`` and of the result.
        """
        return self._map(positions, device, dtype, xp, inverse=False)

    def position_of(
        self,
        flat: Any = None,
        device: torch.device | str = "cpu",
        dtype: Any = None,
        *,
        xp: Any = torch,
    ) -> Any:
        """Inverse of :meth:`flat_index`: the position of each flat weight index.

        The decoder *gathers* weights into place through it (``out = by_position[position_of()]``,
        slice by slice with :meth:`Permutation.of_range`), which is several times faster than
        scattering them through :meth:`flat_index`.
        """
        return self._map(flat, device, dtype, xp, inverse=True)

    def block_index_matrix(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 ``[num_blocks, max_block_size]``: flat index of slot ``j`` of block ``b``.

        Slots past a block's size hold ``-1`` (the padding the encoder scores as zero).
        """
        d = self.max_block_size
        sizes = self.block_sizes(device)
        starts = self.block_starts(device)
        j = torch.arange(d, dtype=torch.int64, device=device)
        valid = j[None, :] < sizes[:, None]
        pos = (starts[:, None] + j[None, :]).clamp(max=self.numel - 1)
        flat = self.flat_index(pos.reshape(-1), device=device).reshape(self.num_blocks, d)
        return torch.where(valid, flat, torch.full_like(flat, -1))


class Permutation:
    """The keyed Feistel permutation of a :class:`BlockLayout` on one array backend.

    Written once for numpy and torch (:mod:`.backend`): values are int32 in both, and every
    step below is an exact integer operation, so both give the same bits. The round tables are
    built once per instance; :meth:`rounds` is one pass of the network, calling the instance
    adds cycle walking. ``stream`` keys the round tables: the block layout's own (1), or the
    hashing trick's (:mod:`.hashing`), which reuses the network on another key.
    """

    def __init__(self, layout: BlockLayout, *, xp: Any = torch, device: Any = "cpu",
                 stream: int = STREAM_LAYOUT) -> None:
        b = self._b = backend(xp)
        self._xp = xp
        self.numel = layout.numel
        self.device = device
        a, m, r = self.a, self.m, self.r = layout._sides()
        key = stream_key(layout.seed, stream)
        # All rounds in one grid of hashes (one call per op instead of one per round and op):
        # T_t[v] = fmix32(row(t) ^ col(v)) under the layout key.
        rows = row_hash(key, b.arange_words(FEISTEL_ROUNDS, device), xp=xp)
        cols = col_hash(key, b.arange_words(max(a, r), device), xp=xp)
        grid = grid_hash(rows, cols, xp=xp)
        # Even rounds add T[right] mod A to the left, odd rounds T[left] mod R to the right.
        self.tables = [
            b.umod_int32(grid[t, : (r if t % 2 == 0 else a)], a if t % 2 == 0 else r)
            for t in range(FEISTEL_ROUNDS)
        ]

    def rounds(self, x: Any, inverse: bool = False, out: Any = None) -> Any:
        """One pass of the (inverse) Feistel network on int32 values in ``[0, A*R)``.

        The result goes to ``out`` when given (it may be ``x`` itself), else to a new array.
        """
        b, a, m, low = self._b, self.a, self.m, self.r - 1
        right = x & low
        left = b.sra(x, m, out)
        tmp = self._xp.empty_like(right)  # scratch: a round's table step, then its wrap
        for t in reversed(range(FEISTEL_ROUNDS)) if inverse else range(FEISTEL_ROUNDS):
            if t % 2 == 0:
                step = b.take(self.tables[t], right, tmp)
                if inverse:
                    left -= step
                else:
                    left += step
                    left -= a
                wrap = b.sra(left, 31, tmp)  # -1 where left < 0: back into [0, A) without a branch
                wrap &= a
                left += wrap
            else:
                step = b.take(self.tables[t], left, tmp)
                if inverse:
                    right -= step
                else:
                    right += step
                right &= low
        left <<= m
        left |= right
        return left

    def walk(self, y: Any, inverse: bool = False) -> Any:
        """Cycle walking, in place on the output ``y`` of :meth:`rounds`: values that landed in
        ``[numel, A*R)`` are passed through the network again until they are in ``[0, numel)``.

        Fewer than R ~ sqrt(numel) values start outside, and each step leaves with probability
        >= numel / (A * R); only those few values are iterated.
        """
        idx = self._b.nonzero(y >= self.numel)
        while len(idx):
            walked = self.rounds(y[idx], inverse)
            y[idx] = walked
            idx = idx[walked >= self.numel]
        return y

    def of_range(self, start: int, stop: int, inverse: bool = False) -> Any:
        """int32 (inverse) permutation of ``start .. stop - 1``."""
        x = self._b.arange_int32(start, stop, self.device)
        return self.walk(self.rounds(x, inverse, out=x), inverse)

    def __call__(self, x: Any = None, inverse: bool = False) -> Any:
        """The (inverse) permutation of int32 values ``x`` (default: all of ``[0, numel)``)."""
        b = self._b
        n = self.numel if x is None else len(x)
        y = b.empty((n,), "int32", self.device)
        step = b.slice_size(self.device)
        for s0 in range(0, n, step):
            s1 = min(n, s0 + step)
            src = b.arange_int32(s0, s1, self.device) if x is None else b.int32(x[s0:s1])
            self.rounds(src, inverse, out=y[s0:s1])
        return self.walk(y, inverse)
