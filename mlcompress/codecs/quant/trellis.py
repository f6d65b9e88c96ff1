"""Dependent (trellis-coded) quantization on a step grid: two interleaved quantizers and a
4-state machine, as in VVC and MPEG NNC.

Why: a scalar quantizer places every weight on one grid independently. Dependent quantization
gives each weight one of two grids over the same step ``step``, Q0 = even multiples
``2k * step`` and Q1 = odd multiples and zero ``(2k - sgn(k)) * step``, and lets the parity of
the previous level choose which grid the next weight uses. The union of the two grids is as fine
as a step of ``step`` while each level only indexes a grid twice as coarse, and the encoder,
choosing the whole sequence of levels at once (Viterbi), gets a denser packing of the
reconstruction sequences than any scalar grid: lower squared error at the same coded size.

The state machine (the one of VVC): states 0 and 1 use Q0, states 2 and 3 use Q1; after level
``k`` the state becomes ``TRANS[state][k & 1]`` (``k & 1``: parity of ``k``, two's complement,
so -1 is odd), ``TRANS = [[0, 2], [2, 0], [1, 3], [3, 1]]``.

Runs: the state is 0 at the first weight of every *run*. Each row of the tensor's
:class:`~mlcompress.codecs.quant.uniform.GroupLayout` is cut into its groups, and each group into
consecutive runs of :data:`RUN` weights (the last run of a group may be shorter). Runs are
independent, so encoder and decoder loop over the positions inside a run (at most :data:`RUN`
steps) with numpy operations across many runs at once, and a block of whole runs can be decoded
alone.

Reconstruction is the step scheme's rule with the reconstruction integer ``r`` in place of the
level: ``float64(step of the group) * r``, rounded once to the tensor's dtype.
"""

from __future__ import annotations

from mlcompress.codecs.quant.rdo import level_bits
from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch

#: The format version of dependent quantization: the ``dq`` param of a ``step`` tensor.
VERSION = 1
#: Weights per run: the state machine restarts at 0 every RUN weights of a group.
RUN = 256
#: ``TRANS[state][parity of the level]``: the next state.
TRANS = ((0, 2), (2, 0), (1, 3), (3, 1))
#: Rounds of the trellis after the first (distortion-only) one, each with the level histogram
#: of the round before as its rate model; the search stops early when nothing changes.
RATE_ROUNDS = 2
#: Weights per chunk of runs the encoder and decoder work on at once (their temporaries are a
#: few arrays of this many elements).
CHUNK_ELEMENTS = 1 << 18

#: The two ways into each next state, from TRANS: ``PRED[ns]`` the states, ``PARITY[ns]`` the
#: level parities (plain tuples: numpy is imported on first use).
PRED = tuple(tuple(s for s in range(4) for p in range(2) if TRANS[s][p] == ns) for ns in range(4))
PARITY = tuple(tuple(p for s in range(4) for p in range(2) if TRANS[s][p] == ns) for ns in range(4))


def run_bounds(rows: int, cols: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` of the runs of a ``rows x cols`` layout with groups of ``group``,
    as flat indices, in order (they tile the tensor)."""
    starts, lengths = [], []
    for g0 in range(0, cols, group):
        g1 = min(g0 + group, cols)
        for r0 in range(g0, g1, RUN):
            starts.append(r0)
            lengths.append(min(RUN, g1 - r0))
    row_starts = np.asarray(starts, dtype=np.int64)
    row_lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.arange(rows, dtype=np.int64) * cols
    return (offsets[:, None] + row_starts[None, :]).reshape(-1), np.tile(row_lengths, rows)


def chunks(rows: int, cols: int, group: int):
    """``(flat slice, run starts, run lengths)`` for consecutive chunks of whole runs of about
    :data:`CHUNK_ELEMENTS` weights, covering the tensor in order."""
    starts, lengths = run_bounds(rows, cols, group)
    per = max(CHUNK_ELEMENTS // RUN, 1)
    for a in range(0, starts.size, per):
        s, n = starts[a : a + per], lengths[a : a + per]
        yield slice(int(s[0]), int(s[-1] + n[-1])), s, n


def _positions(starts: np.ndarray, lengths: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (relative to ``first``) of each run's weights as a ``(runs, RUN)`` matrix, and the
    mask of the real ones (a short run is padded at its end with its first index)."""
    j = np.arange(RUN, dtype=np.int64)
    valid = j[None, :] < lengths[:, None]
    idx = np.where(valid, starts[:, None] + j[None, :], starts[:, None]) - first
    return idx, valid


def reconstruction(levels: np.ndarray) -> np.ndarray:
    """Reconstruction integers (int64) of a ``(runs, RUN)`` matrix of levels, each row one run
    from state 0: the decoder's state machine, vectorised across runs."""
    k = np.asarray(levels, dtype=np.int64)
    trans = np.array(TRANS, dtype=np.int64)
    r = np.empty_like(k)
    state = np.zeros(k.shape[0], dtype=np.int64)
    for j in range(k.shape[1]):
        kj = k[:, j]
        r[:, j] = 2 * kj - (state >> 1) * np.sign(kj)
        state = trans[state, kj & 1]
    return r


def reconstruct_chunk(levels: np.ndarray, starts: np.ndarray, lengths: np.ndarray, first: int) -> np.ndarray:
    """Reconstruction integers (int64, flat) of one chunk's ``levels`` (flat, starting at flat
    index ``first``) whose runs are ``starts``/``lengths``."""
    idx, valid = _positions(starts, lengths, first)
    r = reconstruction(np.where(valid, levels[idx], 0))
    return r[valid]


def _pair(t: np.ndarray, r: np.ndarray, k: np.ndarray, r2: np.ndarray, k2: np.ndarray, rate):
    """Costs and levels of two candidates of opposite parity, sorted by parity: ``(cost_even,
    level_even, cost_odd, level_odd)``; ``r``, ``k`` and ``r2``, ``k2`` as float64."""
    c, c2 = (t - r) ** 2, (t - r2) ** 2
    if rate is not None:
        c, c2 = c + rate(k), c2 + rate(k2)
    even = np.remainder(k, 2) == 0
    return np.where(even, c, c2), np.where(even, k, k2), np.where(even, c2, c), np.where(even, k2, k)


def _with_zero(t: np.ndarray, cost: np.ndarray, level: np.ndarray, rate) -> tuple[np.ndarray, np.ndarray]:
    """The even candidate, or level 0 (reconstruction 0) where that is cheaper."""
    zero_cost = t * t if rate is None else t * t + rate(np.zeros(1))
    better = zero_cost < cost
    return np.where(better, zero_cost, cost), np.where(better, 0.0, level)


def _candidates(t: np.ndarray, rate) -> tuple[np.ndarray, np.ndarray]:
    """``(cost, level)`` arrays shaped ``t.shape + (2, 2)``: ``[..., quantizer, parity]``, the
    best candidate of each parity among each quantizer's two nearest points and zero. Levels
    are float64 (exact integers)."""
    r0 = 2.0 * np.floor(t / 2)  # Q0: r = 2k, nearest r0 and r0 + 2 (levels of opposite parity)
    e0, le0, o0, lo0 = _pair(t, r0, r0 / 2, r0 + 2, r0 / 2 + 1, rate)
    e0, le0 = _with_zero(t, e0, le0, rate)
    o = 2.0 * np.floor((t - 1) / 2) + 1  # Q1: odd r = 2k - sgn(k), k = (r + sgn r) / 2
    k1, k2 = (o + np.sign(o)) / 2, (o + 2 + np.sign(o + 2)) / 2
    # Around zero (o = -1) both nearest points are odd levels (-1 and 1): the nearer is the odd
    # candidate and zero alone is even; elsewhere the two have opposite parity.
    e1, le1, o1, lo1 = _pair(t, o, k1, o + 2, k2, rate)
    mid = o == -1
    if mid.any():
        c_lo, c_hi = (t - o) ** 2, (t - o - 2) ** 2
        if rate is not None:
            c_lo, c_hi = c_lo + rate(k1), c_hi + rate(k2)
        hi = c_hi < c_lo
        o1 = np.where(mid, np.where(hi, c_hi, c_lo), o1)
        lo1 = np.where(mid, np.where(hi, k2, k1), lo1)
        e1 = np.where(mid, np.inf, e1)
    e1, le1 = _with_zero(t, e1, le1, rate)
    cost = np.stack([e0, o0, e1, o1], -1).reshape(t.shape + (2, 2))
    level = np.stack([le0, lo0, le1, lo1], -1).reshape(t.shape + (2, 2))
    return cost, level


def viterbi(t: np.ndarray, valid: np.ndarray, rate) -> np.ndarray:
    """Levels (int64, ``t``'s shape) minimising ``sum (t - r)**2 + rate(k)`` along each row of
    ``t`` (one run from state 0; ``t`` in steps); ``rate(levels)`` gives each level's cost in
    step**2 (``None``: distortion alone). Padding (``~valid``) keeps the state and costs nothing."""
    runs, width = t.shape
    cost, level = _candidates(t, rate)
    pred, parity = np.array(PRED), np.array(PARITY)
    # The ways into next state ns = 2a + g come from states 2g and 2g + 1 (PRED), so the
    # candidates of every next state are J as (g, c) plus the way's cost: ways[j, run, a, g, c].
    ways = np.ascontiguousarray(np.moveaxis(cost[:, :, pred >> 1, parity], 1, 0)).reshape(width, runs, 2, 2, 2)
    J = np.zeros((runs, 2, 2))
    J[:, 0, 1] = J[:, 1, 0] = J[:, 1, 1] = np.inf
    choice = np.zeros((width, runs, 4), dtype=bool)
    padded = ~valid.all(axis=0)
    for j in range(width):
        cand = J[:, None] + ways[j]
        pick = cand[..., 1] < cand[..., 0]
        new = np.minimum(cand[..., 0], cand[..., 1])
        choice[j] = pick.reshape(runs, 4)
        J = np.where(valid[:, j, None, None], new, J) if padded[j] else new
    out = np.zeros((runs, width), dtype=np.int64)
    state = np.argmin(J.reshape(runs, 4), axis=1)
    rows = np.arange(runs)
    for j in range(width - 1, -1, -1):
        c = choice[j, rows, state].astype(np.int64)
        prev = pred[state, c]
        k = level[rows, j, prev >> 1, parity[state, c]].astype(np.int64)
        if padded[j]:
            v = valid[:, j]
            out[:, j] = np.where(v, k, 0)
            state = np.where(v, prev, state)
        else:
            out[:, j] = k
            state = prev
    return out


def trellis_levels(values, rows: int, cols: int, group: int, lam: float, *, rounds: int = RATE_ROUNDS,
                   limit: float | None = None, too_large=None) -> np.ndarray:
    """Dependent-quantization levels (int32, flat) of a ``rows x cols`` layout.

    ``values(sl)`` gives the weights of the flat slice ``sl`` in steps (float64, flat). The first
    round minimises distortion alone; each further round (``rounds``, when ``lam > 0``) adds
    ``lam * bits(level)`` under the histogram of the round before, as
    :func:`mlcompress.codecs.quant.rdo.rdo_levels` does, stopping early when no level changes.
    ``limit``: raise ``too_large()`` if some ``|t|`` exceeds it.
    """
    n = np.empty(rows * cols, dtype=np.int32)
    parts = list(chunks(rows, cols, group))

    def one_round(rate) -> bool:
        changed = False
        for sl, starts, lengths in parts:
            t_flat = values(sl)
            if limit is not None and t_flat.size and float(np.abs(t_flat).max()) > limit:
                raise too_large()
            idx, valid = _positions(starts, lengths, sl.start)
            levels = viterbi(np.where(valid, t_flat[idx], 0.0), valid, rate)[valid]
            changed = changed or not np.array_equal(levels, n[sl])
            n[sl] = levels
        return changed

    one_round(None)
    if lam <= 0 or n.size == 0:
        return n
    for _ in range(rounds):
        _, lo, bits = level_bits(n)
        if not one_round(lambda k: lam * bits[np.clip(k - lo, 0, bits.size - 1).astype(np.int64)]):
            break
    return n


def element_steps(steps: np.ndarray, sl: slice, cols: int, group: int) -> np.ndarray:
    """The float64 step of each element of the flat slice ``sl`` (``steps``: one per group)."""
    idx = np.arange(sl.start, sl.stop, dtype=np.int64)
    gid = (idx // cols) * -(-cols // group) + (idx % cols) // group
    return steps[gid]


def dequantize_chunk(r: np.ndarray, steps: np.ndarray, sl: slice, cols: int, group: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """``float64(step of each element's group) * r`` for the flat slice ``sl``, rounded once to
    ``dtype``: the step scheme's reconstruction with reconstruction integers for levels."""
    return torch.from_numpy(element_steps(steps, sl, cols, group) * r.astype(np.float64)).to(dtype)
