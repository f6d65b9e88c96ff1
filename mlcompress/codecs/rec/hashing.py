"""The hashing trick: a tensor's weights tied to fewer free variables, each with a random sign.

MIRACLE's LeNet-5 ties fc1 50:1 and conv2 2:1 (431,080 weights -> 26,580 free variables): the
posterior, its KL and REC all live on the ``F`` free variables, and weight ``f`` of the tensor
is ``sign(f) * v[tie(f)]``. Nothing is stored but ``F``; the map is a pure function of
``(numel, F, layout_seed)`` and costs a few integer operations per weight, so decoding stays
proportional to the number of weights:

* ``tie(f) = perm_T(f) mod F`` where ``perm_T`` is the block layout's Feistel permutation of
  ``[0, numel)`` keyed on stream 4 instead of 1 (:class:`~.layout.Permutation`). Because it is a
  bijection, every free variable carries ``floor(numel / F)`` or ``ceil(numel / F)`` weights:
  none is wasted on no weight, as a plain ``hash mod F`` would (a Poisson share of them).
* ``sign(f) = -1`` when bit 31 of ``hash(key(layout_seed, 5), 0, f)`` is set, else ``+1``
  (docs/format.md, "Integer hash"): random signs keep tied weights from sharing a sign, which
  would bias every sum they enter.

The spec with a test vector is docs/format.md ("Hashing trick"); numpy and torch run the same
code (:mod:`.backend`), like the rest of the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlcompress.lazy import torch

from mlcompress.codecs.rec.backend import backend
from mlcompress.codecs.rec.counter import STREAM_SIGNS, STREAM_TYING, col_hash, grid_hash, row_hash, stream_key
from mlcompress.codecs.rec.layout import BlockLayout, Permutation

__all__ = ["Tying"]


@dataclass(frozen=True)
class Tying:
    """``numel`` weights tied to ``free`` variables under ``seed`` (a tensor's layout seed)."""

    numel: int
    free: int
    seed: int

    def __post_init__(self) -> None:
        if not 1 <= self.free <= self.numel:
            raise ValueError(f"Tying: free must be in [1, numel={self.numel}], got {self.free}")
        BlockLayout(self.numel, 1, self.seed)  # the same domain checks as a layout

    def _permutation(self, xp: Any, device: Any) -> Permutation:
        return Permutation(BlockLayout(self.numel, 1, self.seed), xp=xp, device=device, stream=STREAM_TYING)

    def _signs_key(self) -> int:
        return stream_key(self.seed, STREAM_SIGNS)

    def slice(self, start: int, stop: int, *, xp: Any = torch, device: Any = "cpu",
              permutation: Permutation | None = None) -> tuple[Any, Any]:
        """``(free variable index int32, negative sign bool)`` of weights ``start .. stop - 1``."""
        b = backend(xp)
        perm = permutation or self._permutation(xp, device)
        index = b.umod_int32(perm.of_range(start, stop), self.free)
        key = self._signs_key()
        words = grid_hash(row_hash(key, b.arange_words(1, device), xp=xp),
                          col_hash(key, b.arange_int32(start, stop, device), xp=xp), xp=xp)[0]
        return index, b.high_bit(words)

    def expand(self, values: Any, *, xp: Any = torch, device: Any = "cpu") -> Any:
        """float32 ``[numel]`` weights ``sign(f) * values[tie(f)]`` of the ``[free]`` variables."""
        b = backend(xp)
        perm = self._permutation(xp, device)
        out = b.empty((self.numel,), "float32", device)
        step = b.slice_size(device)
        for s0 in range(0, self.numel, step):
            s1 = min(self.numel, s0 + step)
            index, negative = self.slice(s0, s1, xp=xp, device=device, permutation=perm)
            piece = out[s0:s1]
            b.take(values, index, out=piece)
            b.negate_where(piece, negative)
        return out

    def index_and_sign(self, device: Any = "cpu") -> tuple[Any, Any]:
        """torch ``(int64 [numel] free variable of each weight, float32 [numel] its sign)``: what
        training gathers through (``w = sign * v[index]``, differentiable in ``v``)."""
        index, negative = self.slice(0, self.numel, xp=torch, device=device)
        sign = 1.0 - 2.0 * negative.to(torch.float32)
        return index.to(torch.int64), sign
