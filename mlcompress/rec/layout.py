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
  on the mixed-radix domain ``[0, A) x [0, R)`` (``A = ceil(sqrt(numel))``, ``R = ceil(numel /
  A)``), each round adding a keyed table lookup modulo the side's size, and cycle-walking the few
  values that land in ``[numel, A*R)``. Round tables come from :mod:`mlcompress.rec.counter`, so
  this is bit-identical everywhere. The exact recipe (with test vectors) is in docs/format.md.

Luby-Rackoff: four Feistel rounds with independent random round functions give a pseudo-random
permutation, which is all blocks need (each block a random sample of the tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mlcompress.rec.counter import STREAM_LAYOUT, col_hash, fmix32, row_hash, stream_key

__all__ = ["BlockLayout", "FEISTEL_ROUNDS"]

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
    def _sides(self) -> tuple[int, int]:
        a = math.isqrt(self.numel - 1) + 1  # ceil(sqrt(numel))
        r = -(-self.numel // a)
        return a, r

    def _tables(self, device: torch.device | str) -> list[torch.Tensor]:
        """Round tables: round t adds ``table_t[other side]`` modulo its own side's size."""
        a, r = self._sides()
        key = stream_key(self.seed, STREAM_LAYOUT)
        tables = []
        for t in range(FEISTEL_ROUNDS):
            # Even rounds update the left (size a) from the right (size r), odd rounds the reverse.
            other, modulus = (r, a) if t % 2 == 0 else (a, r)
            rows = row_hash(key, torch.tensor([t], dtype=torch.int64, device=device))
            cols = col_hash(key, torch.arange(other, dtype=torch.int64, device=device))
            tables.append(fmix32(rows ^ cols) % modulus)
        return tables

    def _feistel(self, x: torch.Tensor, tables: list[torch.Tensor]) -> torch.Tensor:
        a, r = self._sides()
        left = torch.div(x, r, rounding_mode="floor")
        right = x - left * r
        for t, table in enumerate(tables):
            if t % 2 == 0:
                left = left + table[right]
                left = torch.where(left >= a, left - a, left)
            else:
                right = right + table[left]
                right = torch.where(right >= r, right - r, right)
        return left * r + right

    def flat_index(
        self, positions: torch.Tensor | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Flat weight index of each position (default: all positions, in block order).

        int64, same shape as ``positions``. Computing a subset gives the same values as
        computing all and indexing: each position is mapped on its own.
        """
        if positions is None:
            positions = torch.arange(self.numel, dtype=torch.int64, device=device)
        else:
            positions = positions.to(device=device, dtype=torch.int64)
        tables = self._tables(positions.device)
        y = self._feistel(positions, tables)
        outside = y >= self.numel
        # Cycle walking: fewer than sqrt(numel) values start outside, and each walk step leaves
        # with probability >= numel / (A * R); the loop ends after a few steps in practice.
        while bool(outside.any()):
            idx = outside.nonzero().squeeze(1)
            walked = self._feistel(y[idx], tables)
            y[idx] = walked
            outside[idx] = walked >= self.numel
        return y

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
