"""Ranking what pruning removes: the lowest ``round(sparsity * n)`` scores, in memory or streamed.

In memory (:func:`select_lowest`) every score is held and sorted. Streamed (:func:`find_cut`)
the same set is found without holding the scores, by a radix select over their float64 bit
patterns; :class:`CutMask` then marks a tensor's pruned entries chunk by chunk as it is read,
and :class:`Scorer` produces the criterion's scores (|w|, or the seeded uniform draws) in the
same order both ways, so the two paths prune exactly the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from mlcompress.errors import InputError
from mlcompress.options import check_sparsity

NEEDS_POSTERIOR = "KL ranking needs a posterior file (fit-posterior's output)"

def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest scores (stable: earlier positions win ties)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, stable=True).indices
        mask[order[:k]] = True
    return mask


def select_lowest(scores: Mapping[str, torch.Tensor], sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Flat boolean masks (True = pruned) of the lowest ``round(sparsity * n)`` scores: over all
    tensors together (``global``, in the mapping's order for ties) or per tensor (``layer``)."""
    check_sparsity(sparsity)
    if scope == "layer":
        return {n: _lowest(s, round(sparsity * s.numel())) for n, s in scores.items()}
    allscores = torch.cat([s.reshape(-1) for s in scores.values()])
    allmask = _lowest(allscores, round(sparsity * allscores.numel()))
    flat, pos = {}, 0
    for n, s in scores.items():
        flat[n] = allmask[pos : pos + s.numel()]
        pos += s.numel()
    return flat


def random_scores(sizes: Mapping[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {n: torch.rand(k, generator=generator, dtype=torch.float64) for n, k in sizes.items()}


def refuse_kl(criterion: str) -> None:
    if criterion == "kl":
        raise InputError(f"{NEEDS_POSTERIOR}; a checkpoint has no posterior to rank by",
                         hint="use --criterion magnitude or random for a checkpoint")


# --- streaming ranking ---------------------------------------------------------------------------
#
# The global cut without holding the scores: a radix select over their float64 bit patterns.
# Scores are non-negative (|w|, uniform draws) or NaN, and non-negative doubles order exactly as
# their bit patterns do as int64, so the k-th smallest score is found 16 bits at a time: one
# histogram pass over all scores per 16 bits, each narrowing to the bin that holds the k-th,
# until the scores left in that bin are few enough to collect and sort. The pruned set is then
# every score below the cut plus the first ``k - below`` equal to it in position order: exactly
# the first ``k`` of a stable sort, which is what :func:`select_lowest` keeps.

#: Scores computed at a time (128 kB of float64, under glibc's first mmap threshold: larger
#: temporaries fragment the heap): what bounds the ranking's own memory.
CHUNK = 1 << 14
#: Collect and sort the scores of the bin that holds the cut once it has at most this many.
CANDIDATE_LIMIT = 1 << 18
_BIN_BITS = 16
_BINS = 1 << _BIN_BITS
_KEY_BITS = 64
#: torch.sort puts NaN after everything and keeps NaNs in position order: one key for them all,
#: above +inf (0x7FF0...).
_NAN_KEY = 0x7FF8000000000000

#: A fresh pass over the scores, in position order, as int64 keys, chunk by chunk.
KeyPasses = Callable[[], Iterator[torch.Tensor]]


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys that order as ``torch.sort`` orders the non-negative float64 ``scores``."""
    scores = scores.to(torch.float64).contiguous()
    return scores.view(torch.int64).masked_fill(torch.isnan(scores), _NAN_KEY)


@dataclass(frozen=True)
class Cut:
    """The ``k`` lowest scores: every key below ``key``, then the first ``ties`` equal to it."""

    key: int
    ties: int


def find_cut(passes: KeyPasses, n: int, k: int, on_pass: Callable[[int], None] | None = None) -> Cut | None:
    """The :class:`Cut` of the ``k`` lowest of ``n`` keys (None when ``k`` is 0), reading them
    through ``passes`` a few times and holding at most :data:`CANDIDATE_LIMIT` of them.
    ``on_pass(i)`` is called before pass ``i`` (1, 2, ...)."""
    if k <= 0:
        return None
    prefix, shift, below, count = 0, _KEY_BITS, 0, n  # candidates: the keys k with k >> shift == prefix
    number = 0

    def candidates(keys: torch.Tensor) -> torch.Tensor:
        return keys if shift == _KEY_BITS else keys[(keys >> shift) == prefix]

    while shift > 0:
        number += 1
        if on_pass is not None:
            on_pass(number)
        if count <= CANDIDATE_LIMIT:
            # One buffer of the known count: many small pieces kept between the tensors' reads
            # would fragment the heap and grow the process by a tensor per tensor read.
            held, filled = torch.empty(count, dtype=torch.int64), 0
            for keys in passes():
                found = candidates(keys)
                held[filled : filled + found.numel()] = found
                filled += found.numel()
            key = int(torch.sort(held).values[k - below - 1])
            return Cut(key, k - below - int((held < key).sum()))
        low = shift - _BIN_BITS
        hist = torch.zeros(_BINS, dtype=torch.int64)
        for keys in passes():
            hist += torch.bincount((candidates(keys) >> low) & (_BINS - 1), minlength=_BINS)
        cumulative = torch.cumsum(hist, 0)
        b = int(torch.searchsorted(cumulative, k - below))
        below += int(cumulative[b - 1]) if b else 0
        prefix, shift, count = (prefix << _BIN_BITS) | b, low, int(hist[b])
    return Cut(prefix, k - below)


class CutMask:
    """Masks of a :class:`Cut` over keys handed over in position order (a chunk at a time,
    across tensors for a global cut): the ties are taken by the first equal keys seen."""

    def __init__(self, cut: Cut | None) -> None:
        self._cut = cut
        self._ties = cut.ties if cut is not None else 0

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        if self._cut is None:
            return torch.zeros(keys.shape, dtype=torch.bool)
        mask = keys < self._cut.key
        if self._ties:
            equal = torch.nonzero(keys == self._cut.key).reshape(-1)[: self._ties]
            mask[equal] = True
            self._ties -= equal.numel()
        return mask


class Scorer:
    """The criterion's scores of one tensor at a time, chunk by chunk, as keys. Random scores
    are the in-memory path's draws (``torch.rand(numel)`` per tensor in order from one
    generator seeded with ``seed``; drawing them in chunks gives the same numbers), so a pass
    that starts over re-seeds, or rewinds to a tensor's first draw."""

    def __init__(self, criterion: str, seed: int) -> None:
        refuse_kl(criterion)
        self.random = criterion == "random"
        self._seed = seed
        self._generator = torch.Generator()
        self.restart()

    def restart(self) -> None:
        self._generator.manual_seed(self._seed)

    def mark(self) -> torch.Tensor:
        return self._generator.get_state()

    def rewind(self, mark: torch.Tensor) -> None:
        self._generator.set_state(mark)

    def keys(self, flat: torch.Tensor | None, numel: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, keys)`` of each chunk of a tensor of ``numel`` elements (``flat``, its
        values; not needed, and not read, for random scores)."""
        for start in range(0, numel, CHUNK):
            end = min(start + CHUNK, numel)
            if self.random:
                scores = torch.rand(end - start, generator=self._generator, dtype=torch.float64)
            else:
                scores = flat[start:end].abs().to(torch.float64)
            yield start, score_keys(scores)


def zero_count(tensor: torch.Tensor) -> int:
    """Exact zeros in ``tensor`` (``(t == 0).sum()`` would cost eight bytes per element: the
    booleans are summed as int64)."""
    return tensor.numel() - int(torch.count_nonzero(tensor))


def pruned(tensor: torch.Tensor, scorer: Scorer, mask_of: CutMask, *, owned: bool) -> torch.Tensor:
    """``tensor`` with the entries ``mask_of`` picks set to zero, chunk by chunk: in place when
    the tensor is ``owned`` (a fresh read from a file, which nothing else sees), else into a new
    buffer (a loaded state dict's tensor, which other names may view)."""
    source = tensor.detach()
    out = source if owned and source.is_contiguous() else torch.empty(source.shape, dtype=source.dtype)
    flat, out_flat = source.reshape(-1), out.view(-1)
    for start, keys in scorer.keys(flat, flat.numel()):
        end = start + keys.numel()
        if out is source:
            out_flat[start:end].masked_fill_(mask_of(keys), 0)
        else:
            out_flat[start:end] = flat[start:end].masked_fill(mask_of(keys), 0)
    return out
