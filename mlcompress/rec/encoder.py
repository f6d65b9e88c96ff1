"""REC encoder: choose one candidate index per block, for many blocks at once.

For a diagonal Gaussian posterior ``q = N(mu, sigma^2)`` and prior ``p = N(nu, rho^2)``, candidate
weights are ``w = nu + rho * z`` with ``z`` standard normal, and the log importance weight of a
candidate is a quadratic form in ``z``, summed over the block's coordinates::

    log q(w)/p(w) = sum_j  a_j z_j^2 + b_j z_j + const,
    a_j = 1/2 - rho_j^2 / (2 sigma_j^2),   b_j = rho_j (mu_j - nu_j) / sigma_j^2.

All blocks score the *same* candidate vectors (common random numbers across blocks, as in
MIRACLE's public code), so scoring ``K`` candidates for ``B`` blocks of (padded) size ``D`` is one
matrix product ``[K, 2D] @ [2D, B]``. Candidates are generated chunk by chunk and each chunk's
scores update a running selection, so memory is bounded whatever ``K`` and ``B`` (blocks are also
processed in groups). Padded coordinates have ``a = b = 0`` and contribute nothing.

Selection rules (``selection``):

* ``"is"`` -- MIRACLE's importance sampling: index ``k`` with probability ``a_k / sum a``. Done
  exactly and streamed: candidates are cut into fixed segments of :data:`SEGMENT` indices; within
  a segment one uniform picks an index by inverse CDF, and segments are merged like a reservoir
  (keep the newcomer with probability ``mass_segment / mass_so_far``). This needs two uniforms per
  (segment, block) instead of a Gumbel variate (two logarithms) per (candidate, block), which
  would cost more than the scoring itself on CPU.
* ``"greedy"`` -- the candidate with the largest ``log q/p`` (MIRACLE's code notes it works better).
* ``"orc"`` -- ordered random coding: argmax of ``log a_k - log t_k``, ``t_k`` the arrival times of
  a unit Poisson process (cumulative sums of Exp(1)). The arrival times are shared by all blocks
  (like the candidates); each block's choice is still an exact sample of its posterior, and small
  indices are likely, so entropy-coding them saves bits.

All randomness comes from :mod:`mlcompress.codecs.rec.counter`, so an encode is deterministic given the
seed. The results do not depend on the chunk or group sizes (segments are fixed).
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch

from mlcompress.codecs.rec.counter import STREAM_ARRIVALS, STREAM_SELECTION
from mlcompress.codecs.rec.limits import MAX_BITS_PER_BLOCK, SELECTIONS
from mlcompress.codecs.rec.sampler import candidate_codes, normal_table, uniforms

__all__ = [
    "SELECTIONS",
    "SEGMENT",
    "score_coefficients",
    "select_candidates",
    "select_candidates_loop",
    "selection_plan",
]

#: Candidates per selection segment (importance sampling draws, ORC arrival blocks).
SEGMENT = 4096
_MEMORY_BUDGET = 192 * 1024 * 1024  # bytes of per-chunk work buffers
_DEFAULT_GROUP = 2048

Progress = Callable[[float, int], None]


def score_coefficients(
    mu: torch.Tensor, sigma: torch.Tensor, nu: torch.Tensor, rho: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` of ``log q/p = a z^2 + b z + const`` per weight, float32 (computed in float64)."""
    mu, sigma, nu, rho = (torch.as_tensor(t, dtype=torch.float64) for t in (mu, sigma, nu, rho))
    inv_var = 1.0 / (sigma * sigma)
    a = 0.5 - 0.5 * rho * rho * inv_var
    b = rho * (mu - nu) * inv_var
    return a.to(torch.float32), b.to(torch.float32)


# -- selection rules -----------------------------------------------------------------------------
class _Selector(Protocol):
    indices: torch.Tensor

    def update(self, scores: torch.Tensor, k0: int) -> None:
        """Fold in ``scores[block, k - k0]`` of candidates ``k0 .. k0 + width - 1``."""


class _Greedy:
    def __init__(self, block_ids: torch.Tensor, seed: int) -> None:
        n = block_ids.shape[0]
        self.best = torch.full((n,), -math.inf, dtype=torch.float32, device=block_ids.device)
        self.indices = torch.zeros(n, dtype=torch.int64, device=block_ids.device)

    def update(self, scores: torch.Tensor, k0: int) -> None:
        m, i = scores.max(1)
        better = m > self.best  # strict: the earliest index wins ties
        self.best = torch.where(better, m, self.best)
        self.indices = torch.where(better, i + k0, self.indices)


class _Importance:
    def __init__(self, block_ids: torch.Tensor, seed: int) -> None:
        n = block_ids.shape[0]
        self.block_ids = block_ids
        self.seed = seed
        self.log_mass = torch.full((n,), -math.inf, dtype=torch.float64, device=block_ids.device)
        self.indices = torch.zeros(n, dtype=torch.int64, device=block_ids.device)

    def update(self, scores: torch.Tensor, k0: int) -> None:
        nblocks, count = scores.shape
        seg = min(SEGMENT, count)
        nseg = count // seg
        s = scores.reshape(nblocks, nseg, seg)
        peak = s.amax(2, keepdim=True)
        # Unnormalised probabilities relative to the segment's best, cumulated along contiguous
        # rows (float32: the sampling probabilities are off by ~1e-6 relative at most). Clamping
        # at e^-80 changes probabilities below 1e-30 and keeps exp off its (30x slower)
        # underflow path.
        cdf = s.sub_(peak).clamp_(min=-80.0).exp_().cumsum_(2)  # in place: scores are consumed
        total = cdf[:, :, -1]
        first = k0 // seg
        rows = torch.arange(2 * first, 2 * (first + nseg), dtype=torch.int64, device=scores.device)
        u = uniforms(self.seed, STREAM_SELECTION, rows, self.block_ids).view(nseg, 2, nblocks)
        target = (u[:, 0, :].T * total.to(torch.float64)).to(torch.float32)
        pick = torch.searchsorted(cdf, target.unsqueeze(2).contiguous()).squeeze(2).clamp_(max=seg - 1)
        seg_log_mass = peak[:, :, 0].to(torch.float64) + torch.log(total.to(torch.float64))
        for t in range(nseg):
            merged = torch.logaddexp(self.log_mass, seg_log_mass[:, t])
            keep_new = u[t, 1, :] < torch.exp(seg_log_mass[:, t] - merged)
            self.indices = torch.where(keep_new, pick[:, t] + (k0 + t * seg), self.indices)
            self.log_mass = merged


class _Ordered:
    def __init__(self, block_ids: torch.Tensor, seed: int) -> None:
        n = block_ids.shape[0]
        self.seed = seed
        self.best = torch.full((n,), -math.inf, dtype=torch.float32, device=block_ids.device)
        self.indices = torch.zeros(n, dtype=torch.int64, device=block_ids.device)
        self.t_end = 0.0  # arrival time at the end of the previous segment
        self.next_k = 0

    def _log_arrivals(self, k0: int, count: int, device: torch.device) -> torch.Tensor:
        if k0 != self.next_k:
            raise RuntimeError("ORC arrivals must be generated in candidate order")
        seg = min(SEGMENT, count)
        out = []
        for s0 in range(k0, k0 + count, seg):
            k = torch.arange(s0, s0 + seg, dtype=torch.int64, device=device)
            u = uniforms(self.seed, STREAM_ARRIVALS, torch.zeros(1, dtype=torch.int64, device=device), k)[0]
            t = torch.cumsum(-torch.log(u), 0) + self.t_end
            self.t_end = float(t[-1])
            out.append(torch.log(t))
        self.next_k = k0 + count
        return torch.cat(out)

    def update(self, scores: torch.Tensor, k0: int) -> None:
        log_t = self._log_arrivals(k0, scores.shape[1], scores.device)
        m, i = (scores - log_t.to(torch.float32)[None, :]).max(1)
        better = m > self.best
        self.best = torch.where(better, m, self.best)
        self.indices = torch.where(better, i + k0, self.indices)


_SELECTORS = {"is": _Importance, "greedy": _Greedy, "orc": _Ordered}


def _check_args(a: torch.Tensor, b: torch.Tensor, bits: int, selection: str) -> None:
    if selection not in _SELECTORS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must be [blocks, dim] of one shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    if not 1 <= bits <= MAX_BITS_PER_BLOCK:
        raise ValueError(f"bits must be in [1, {MAX_BITS_PER_BLOCK}], got {bits}")


def _chunk_size(num_candidates: int, dim: int, group: int) -> int:
    """Candidates per chunk: a power of two (so every chunk of ``2^bits`` is full), at least one
    segment, within the memory budget (features, scores and the selection's work buffers)."""
    seg = min(SEGMENT, num_candidates)
    per_row = 4 * 4 * dim + 4 * 3 * group
    rows = max(seg, _MEMORY_BUDGET // per_row)
    return min(1 << (rows.bit_length() - 1), num_candidates)


def selection_plan(num_blocks: int, dim: int, bits: int, group_size: int = _DEFAULT_GROUP) -> tuple[int, int]:
    """``(group, chunk)``: blocks per group and candidates per chunk that
    :func:`select_candidates` uses for ``num_blocks`` blocks of width ``dim``. A sharded encode
    gives each process whole groups of this size and this chunk, so every group is computed
    exactly as in one process (same shapes, same products: the same bits)."""
    group = max(1, min(group_size, num_blocks))
    return group, _chunk_size(1 << bits, dim, group)


def _features(seed: int, k0: int, k1: int, dim: int, device: torch.device) -> torch.Tensor:
    """float32 ``[k1 - k0, 2 * dim]``: ``[z^2, z]`` of candidates ``k0 .. k1 - 1``."""
    codes = candidate_codes(seed, torch.arange(k0, k1, dtype=torch.int64, device=device), dim)
    flat = codes.contiguous().view(-1)
    table, table_sq = normal_table(device)
    feats = torch.empty((k1 - k0, 2, dim), dtype=torch.float32, device=device)
    feats[:, 0] = torch.index_select(table_sq, 0, flat).view(codes.shape)
    feats[:, 1] = torch.index_select(table, 0, flat).view(codes.shape)
    return feats.view(k1 - k0, 2 * dim)


def select_candidates(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    bits: int,
    seed: int,
    selection: str = "is",
    device: torch.device | str = "cpu",
    block_offset: int = 0,
    block_ids: torch.Tensor | None = None,
    group_size: int = _DEFAULT_GROUP,
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Index (int64 ``[B]``, CPU) of the chosen candidate of each block, batched.

    ``a``, ``b``: float32 ``[B, D]`` score coefficients (:func:`score_coefficients`; zeros pad
    short blocks). Candidates ``0 .. 2^bits - 1`` of stream ``seed`` are scored against every
    block in chunks of ``chunk_size`` candidates (a power of two, at least one :data:`SEGMENT`;
    default: what fits a fixed memory budget) and groups of ``group_size`` blocks.
    ``block_offset`` numbers the blocks for the selection randomness (``"is"``): block ``i`` here
    is block ``block_offset + i`` of the encode, unless ``block_ids`` (int64 ``[B]``) numbers them
    one by one (progressive coding selects scattered blocks of the encode).
    ``progress(blocks_done, blocks_total)`` is called after every chunk.
    """
    _check_args(a, b, bits, selection)
    device = torch.device(device)
    num_blocks, dim = a.shape
    K = 1 << bits
    group, default_chunk = selection_plan(num_blocks, dim, bits, group_size)
    chunk = chunk_size or default_chunk
    seg = min(SEGMENT, K)
    if chunk & (chunk - 1) or chunk < seg or chunk > K:
        raise ValueError(f"chunk_size must be a power of two in [{seg}, {K}], got {chunk}")
    out = torch.empty(num_blocks, dtype=torch.int64)
    for g0 in range(0, num_blocks, group):
        g1 = min(num_blocks, g0 + group)
        # [a, b] per block against [z^2, z] per candidate: one product, inner size 2D
        coef = torch.cat([a[g0:g1], b[g0:g1]], 1).to(device=device, dtype=torch.float32)
        if block_ids is not None:
            ids = block_ids[g0:g1].to(device=device, dtype=torch.int64)
        else:
            ids = torch.arange(block_offset + g0, block_offset + g1, dtype=torch.int64, device=device)
        selector: _Selector = _SELECTORS[selection](ids, seed)
        # scores[block, candidate] (rows contiguous per block for the selection passes), in one
        # buffer reused by every chunk: no fresh pages to fault in each time
        scores = torch.empty((g1 - g0, chunk), dtype=torch.float32, device=device)
        for k0 in range(0, K, chunk):
            k1 = k0 + chunk
            torch.matmul(coef, _features(seed, k0, k1, dim, device).T, out=scores)
            selector.update(scores, k0)
            if progress is not None:
                progress(g0 + (g1 - g0) * (k1 / K), num_blocks)
        out[g0:g1] = selector.indices.cpu()
    return out


def select_candidates_loop(
    a: torch.Tensor,
    b: torch.Tensor,
    sizes: torch.Tensor,
    *,
    bits: int,
    seed: int,
    selection: str = "is",
    block_offset: int = 0,
    chunk_size: int = SEGMENT,
    progress: Progress | None = None,
) -> torch.Tensor:
    """The straightforward baseline: each block alone, its own candidates, a matrix-vector score.

    Same candidates and selection randomness as :func:`select_candidates`, so it chooses the same
    indices (up to float rounding in near ties); kept for the benchmark and as a test oracle.
    """
    _check_args(a, b, bits, selection)
    K = 1 << bits
    chunk = min(chunk_size, K)
    out = torch.empty(a.shape[0], dtype=torch.int64)
    for i in range(a.shape[0]):
        d = int(sizes[i])
        selector: _Selector = _SELECTORS[selection](torch.tensor([block_offset + i]), seed)
        coef = torch.cat([a[i, :d], b[i, :d]])
        for k0 in range(0, K, chunk):
            feats = _features(seed, k0, min(K, k0 + chunk), d, torch.device("cpu"))
            selector.update((feats @ coef)[None, :], k0)
        out[i] = selector.indices[0]
        if progress is not None:
            progress(i + 1, a.shape[0])
    return out
