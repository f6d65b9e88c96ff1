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
  cycle-walking the few values that land in ``[numel, A*R)``. Round tables come from :mod:`mlcompress.rec.counter`, so
  this is bit-identical everywhere. The exact recipe (with test vectors) is in docs/format.md.

Luby-Rackoff: four Feistel rounds with independent random round functions give a pseudo-random
permutation, which is all blocks need (each block a random sample of the tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlcompress.rec.counter import STREAM_LAYOUT, col_hash, from_int32, grid_hash, row_hash, stream_key

__all__ = ["BlockLayout", "FEISTEL_ROUNDS"]

FEISTEL_ROUNDS = 4
_SLICE = 1 << 16


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

    def _tables(self, device: torch.device | str) -> list[torch.Tensor]:
        """int32 round tables: even rounds add ``T[right] mod A`` to the left, odd rounds
        ``T[left] mod R`` to the right; ``T_t[v] = fmix32(row(t) ^ col(v))`` under the layout key."""
        a, _, r = self._sides()
        key = stream_key(self.seed, STREAM_LAYOUT)
        # All rounds in one grid of hashes (one call per op instead of one per round and op).
        rows = row_hash(key, torch.arange(FEISTEL_ROUNDS, dtype=torch.int64, device=device))
        cols = col_hash(key, torch.arange(max(a, r), dtype=torch.int64, device=device))
        grid = from_int32(grid_hash(rows, cols))
        tables = []
        for t in range(FEISTEL_ROUNDS):
            other, modulus = (r, a) if t % 2 == 0 else (a, r)
            tables.append((grid[t, :other] % modulus).to(torch.int32))
        return tables

    def _feistel(self, x: torch.Tensor, tables: list[torch.Tensor], inverse: bool = False) -> torch.Tensor:
        """One pass of the (inverse) Feistel network on int32 values in ``[0, A*R)``."""
        a, m, r = self._sides()
        left = x >> m
        right = x.bitwise_and(r - 1)
        rounds = list(enumerate(tables))
        for t, table in reversed(rounds) if inverse else rounds:
            if t % 2 == 0:
                step = torch.index_select(table, 0, right)
                if inverse:
                    left.sub_(step)
                else:
                    left.add_(step).sub_(a)
                left.add_((left >> 31).bitwise_and_(a))  # back into [0, A) without a branch
            else:
                step = torch.index_select(table, 0, left)
                (right.sub_(step) if inverse else right.add_(step)).bitwise_and_(r - 1)
        return left.bitwise_left_shift_(m).bitwise_or_(right)

    def _walk(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """The (inverse) permutation of int32 values, with cycle walking; returns int32."""
        tables = self._tables(x.device)
        x = x.to(torch.int32)
        y = torch.empty_like(x)
        # Slices small enough for the ~20 passes over each to stay in the CPU cache: about twice
        # as fast on large tensors as whole-tensor passes.
        for s0 in range(0, x.numel(), _SLICE):
            y[s0 : s0 + _SLICE] = self._feistel(x[s0 : s0 + _SLICE].clone(), tables, inverse)
        # Cycle walking: fewer than R ~ sqrt(numel) values start outside [0, numel), and each
        # step leaves with probability >= numel / (A * R); only those few values are iterated.
        idx = (y >= self.numel).nonzero().squeeze(1)
        while idx.numel():
            walked = self._feistel(y[idx], tables, inverse)
            y[idx] = walked
            idx = idx[walked >= self.numel]
        return y

    def _positions(self, positions: torch.Tensor | None, device: torch.device | str) -> torch.Tensor:
        if positions is None:
            return torch.arange(self.numel, dtype=torch.int32, device=device)
        return positions.to(device=device)

    def flat_index(
        self,
        positions: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.int64,
    ) -> torch.Tensor:
        """Flat weight index of each position (default: all positions, in block order).

        Computing a subset gives the same values as computing all and indexing: each position
        is mapped on its own. ``dtype`` int64 (default) or int32 (what index_select also takes).
        """
        return self._walk(self._positions(positions, device), inverse=False).to(dtype)

    def position_of(
        self,
        flat: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.int64,
    ) -> torch.Tensor:
        """Inverse of :meth:`flat_index`: the position of each flat weight index.

        The decoder uses it to *gather* weights into place (``out = by_position[position_of()]``),
        which is several times faster than scattering them through :meth:`flat_index`.
        """
        return self._walk(self._positions(flat, device), inverse=True).to(dtype)

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
