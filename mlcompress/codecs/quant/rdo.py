"""Rate-distortion optimised rounding onto a uniform grid, under the tensor's own coded model.

Nearest rounding minimises each weight's error but ignores what its level costs. The ``quant``
codec codes a tensor's levels with that tensor's static frequency table, so a level of frequency
``p`` costs ``-log2 p`` bits. For a weight at ``t = w / step`` (in steps) the two nearest levels
``floor(t)`` and ``floor(t) + 1`` are compared by

    (t - n)**2 + lam * bits(n)

and the cheaper one wins; the histogram is then recomputed and the choice repeated a few times
(the rate term depends on the choice). Farther levels never win at sensible ``lam``: moving one
more step costs at least 2 more units of distortion, worth ``2/lam`` (about 17) bits.

``HIGH_RATE_LAMBDA = ln 2 / 6`` (in units of step**2 per bit) is the slope of a uniform
quantizer's high-rate rate-distortion curve, ``D = step**2/12`` with ``dD/dR = -2 ln 2 D``:
trading a bit for distortion at the rate the step already implies; at equal coded size it
lowers the squared weight error by 8-18%. With ``lam = 0`` this is nearest rounding.

The default is ``lam = 0``, nearest rounding, on measurements of what reaches the model's
output (docs/quantize.md, docs/results.md): at equal file size RDO's lower weight error came
with a *higher* KL to the original model on all six models tried (two LeNet-5s, two
mlp-digits, two GPT-2s: 2-5x at 20-30x on LeNet-5, 2.3x at 2 bits per parameter on the
GPT-2s). RDO buys its rate by moving weights just past a level boundary down to the smaller
level, most of all to zero; that error is correlated with the weights themselves (it removes a
share of the small weights' joint contribution) instead of averaging out like rounding noise.
"""

from __future__ import annotations

import math

from mlcompress.codecs import entropy
from mlcompress.lazy import numpy as np

HIGH_RATE_LAMBDA = math.log(2.0) / 6.0
DEFAULT_LAMBDA = 0.0
DEFAULT_ITERATIONS = 3
#: Extra cost, in bits, of a level no weight uses yet: its entry in the frequency table
#: (an int32 symbol and a u64 count).
NEW_LEVEL_BITS = 96.0


def level_bits(levels: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """``(table, lo, bits)``: ``bits[n - lo]`` is the cost of level ``n`` under the histogram of
    ``levels`` (unused levels cost ``log2(count) + NEW_LEVEL_BITS``); ``table`` is the histogram."""
    lo = int(levels.min()) - 1
    counts = entropy.range_counts(levels, lo, int(levels.max()) - lo + 2).astype(np.float64)
    total = float(levels.size)
    with np.errstate(divide="ignore"):
        bits = np.where(counts > 0, np.log2(total / np.maximum(counts, 1.0)), math.log2(total) + NEW_LEVEL_BITS)
    return counts, lo, bits


def rdo_round(t: np.ndarray, lam: float = DEFAULT_LAMBDA, iterations: int = DEFAULT_ITERATIONS) -> np.ndarray:
    """Levels (int64) for values ``t`` given in steps; ``lam`` in step**2 per bit (0: nearest)."""
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    return rdo_levels(lambda: [(slice(0, t.size), t)], t.size, lam, iterations=iterations, dtype=np.int64)


def rdo_levels(blocks, size: int, lam: float = DEFAULT_LAMBDA, *, iterations: int = DEFAULT_ITERATIONS,
               limit: float | None = None, too_large=None, dtype=None) -> np.ndarray:
    """:func:`rdo_round` of ``size`` values that ``blocks()`` yields as ``(slice, float64 values)``
    pairs, afresh (and identically) for each pass, so only the levels are held whole.

    Why passes over blocks give the same levels as one whole-array pass: a level depends on its
    own value and the histogram of the previous pass, nothing else. ``limit``: raise
    ``too_large()`` if some ``|t|`` exceeds it (before any level is chosen by cost). ``dtype``
    of the levels: int32 unless given.
    """
    n = np.empty(size, dtype=np.int32 if dtype is None else dtype)
    for sl, t in blocks():
        if limit is not None and t.size and float(np.abs(t).max()) > limit:
            raise too_large()
        n[sl] = np.rint(t).astype(np.int64)
    if lam <= 0 or size == 0:
        return n
    for _ in range(iterations):
        _, lo, bits = level_bits(n)
        changed = False
        for sl, t in blocks():
            low = np.floor(t).astype(np.int64)
            d_low = (t - low) ** 2
            d_high = (low + 1 - t) ** 2
            # Levels outside the current histogram's span cost as much as an unused one.
            span_low = np.clip(low - lo, 0, bits.size - 1)
            span_high = np.clip(low + 1 - lo, 0, bits.size - 1)
            c_low = d_low + lam * bits[span_low]
            c_high = d_high + lam * bits[span_high]
            chosen = np.where(c_high < c_low, low + 1, low)
            changed = changed or not np.array_equal(chosen, n[sl])
            n[sl] = chosen
        if not changed:
            break
    return n
