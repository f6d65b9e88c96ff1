"""The ``step`` quant scheme: integer levels on a uniform grid ``w = step * n``, steps from a code.

Why a second uniform scheme: the ``uniform`` scheme fixes a bit width and fits a grid to each
group's min/max, then entropy-codes the levels. An entropy-coded quantizer wants the opposite
order: choose the step for the rate (any integer level is allowed, so nothing is clipped), and
let the entropy coder make the unused levels free. That is the quantizer of MPEG's NNC standard
and of entropy-constrained scalar quantization in general. A grid centred on zero needs no
zero-point: pruned weights stay exactly 0, the commonest and cheapest level.

Steps are stored as small integers ``q`` and rebuilt exactly, without ``pow`` or tables, so every
decoder gets the same bits: ``step(q) = (64 + (q mod 64)) * 2**(floor(q / 64) - 6)``, a binary
number with a 7-bit mantissa. Consecutive codes are 0.8-1.6% apart: a rate control that moves
by one code changes the file by well under 1% at the rates people use. The reconstruction is ``float64(step) * n``
(exact: a 24-bit mantissa times a level below 2**24 fits float64's 53 bits) rounded once to the
tensor's dtype.

The quantizer (``quantize --step`` and ``--target-ratio``, data-free): each group's step is the
nearest code to the one asked for, levels are chosen by :func:`mlcompress.codecs.quant.rdo.rdo_round`,
and nothing is clipped. :func:`step_quantize` is deterministic, so the codec re-runs it from its
options at write time and stores exactly the levels that were evaluated.

Granularity: one step per tensor by default. With ``per_channel`` or ``group_size`` each group's
step is the tensor step scaled by the group's RMS over the tensor's RMS, so groups of small
weights get proportionally finer steps (equal relative error per group) and the tensor's mean
step stays the one asked for. For an entropy-coded grid that is the only reason to use groups:
unlike a fixed-width grid, a per-tensor step has no range to fit.

A caller may give the groups' steps relative to the tensor step instead (``group_factors``:
``--allocation hessian`` derives them from each group's Fisher diagonal, in
:mod:`mlcompress.quant.rate`). Whatever chose them, the file holds one step code per group, so
the decoder is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlcompress.codecs import entropy
from mlcompress.codecs.quant import trellis
from mlcompress.codecs.quant.rdo import DEFAULT_LAMBDA, rdo_levels
from mlcompress.codecs.quant.uniform import GroupLayout, all_finite, blockwise, flat_view
from mlcompress.errors import InputError, UsageError
from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch

#: Codes per octave of the step grid.
CODES_PER_OCTAVE = 64
#: Codes a file may use: steps from 2**-128 to below 2**64, far beyond any weight's range.
MIN_CODE, MAX_CODE = -128 * CODES_PER_OCTAVE, 64 * CODES_PER_OCTAVE - 1
#: Largest level magnitude: reconstruction stays exact and levels fit the entropy coder's int32.
MAX_LEVEL = (1 << 24) - 1


def steps_of(codes: np.ndarray) -> np.ndarray:
    """Exact float64 steps of integer codes (vectorised; the rule in the module docstring)."""
    q = np.asarray(codes, dtype=np.int64)
    return np.ldexp((CODES_PER_OCTAVE + (q & (CODES_PER_OCTAVE - 1))).astype(np.float64), (q >> 6) - 6)


def code_for(step: np.ndarray | float) -> np.ndarray:
    """The code whose step is nearest ``step`` (> 0), clamped to the valid range."""
    s = np.atleast_1d(np.asarray(step, dtype=np.float64))
    mantissa, exponent = np.frexp(s)  # s = mantissa * 2**exponent, mantissa in [0.5, 1)
    q = (exponent.astype(np.int64) - 1) * CODES_PER_OCTAVE + np.rint((2 * mantissa - 1) * CODES_PER_OCTAVE).astype(np.int64)
    return np.clip(q, MIN_CODE, MAX_CODE)


def dequantize(levels: torch.Tensor | np.ndarray, codes: np.ndarray, layout: GroupLayout,
               dtype: torch.dtype, dq: int = 0) -> torch.Tensor:
    """``float64(step of the element's group) * level``, rounded once to ``dtype``; with ``dq``
    (dependent quantization, :mod:`mlcompress.codecs.quant.trellis`) the level's reconstruction
    integer stands for the level.

    The one reconstruction rule: the quantizer evaluates these weights and the codec decodes
    exactly them.
    """
    if dq:
        return dequantize_dq(trellis_slices(layout, np.asarray(levels).reshape(-1)), codes, layout, dtype,
                             tuple(np.shape(levels)))
    flat = flat_view(torch.as_tensor(np.asarray(levels)))
    steps = torch.from_numpy(steps_of(codes))
    pieces = ((b, dequantize_block(flat[b.start : b.stop], steps, layout, b, dtype)) for b in layout.blocks())
    return blockwise(layout, pieces, dtype, tuple(np.shape(levels)))


def dequantize_block(levels, steps: torch.Tensor, layout: GroupLayout, block, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize` of one block's levels, ``steps`` being :func:`steps_of` the codes."""
    s = layout.block_expand(steps, block)
    return (s * torch.as_tensor(levels).to(torch.float64).reshape(block.shape)).to(dtype)


def trellis_slices(layout: GroupLayout, levels: np.ndarray):
    """``levels`` (flat, the whole tensor) in :func:`trellis.chunks` order: the chunks
    :func:`dequantize_dq` takes."""
    return (levels[sl] for sl, _, _ in trellis.chunks(layout.rows, layout.cols, layout.group))


def dequantize_dq(level_chunks, codes: np.ndarray, layout: GroupLayout, dtype: torch.dtype, shape) -> torch.Tensor:
    """The tensor that dependent-quantization levels rebuild, given as one flat array per chunk
    of :func:`trellis.chunks` (so the codec decodes a chunk of levels at a time)."""
    steps = steps_of(codes)
    out = torch.empty(layout.rows * layout.cols, dtype=dtype)
    for (sl, starts, lengths), levels in zip(trellis.chunks(layout.rows, layout.cols, layout.group), level_chunks):
        r = trellis.reconstruct_chunk(levels, starts, lengths, sl.start)
        out[sl] = trellis.dequantize_chunk(r, steps, sl, layout.cols, layout.group, dtype)
    return out.reshape(shape)


@dataclass
class StepQuantized:
    """Levels of one tensor on a step grid, with the step codes of its groups."""

    levels: np.ndarray  # int32 (|level| <= MAX_LEVEL), flat, row-major over the layout
    codes: np.ndarray  # int64, one per group
    layout: GroupLayout
    shape: tuple[int, ...]
    dtype: torch.dtype
    dq: int = 0  # dependent quantization's version (trellis.VERSION), 0: levels are the integers

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.levels.reshape(self.shape), self.codes, self.layout, self.dtype, self.dq)


def check_step(step: object) -> None:
    if not (isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) and step > 0):
        raise UsageError(f"--step must be a positive number, got {step!r}")


def group_sizes(layout: GroupLayout) -> np.ndarray:
    """Elements per group (float64, flat group order): each row's last group may be shorter."""
    sizes = np.full(layout.groups_per_row, layout.group, dtype=np.float64)
    sizes[-1] -= layout.pad
    return np.tile(sizes, layout.rows)


def _group_sums(x: torch.Tensor, layout: GroupLayout, square: bool) -> np.ndarray:
    sums = np.empty(layout.n_groups, dtype=np.float64)
    flat = flat_view(x)
    for block in layout.blocks(whole_groups=True):
        first, last = layout.group_span(block)
        groups = layout.block_groups(flat, block)
        sums[first:last] = (groups ** 2 if square else groups).sum(dim=2).reshape(-1).numpy()
    return sums


def _group_rms(x: torch.Tensor, layout: GroupLayout) -> np.ndarray:
    return np.sqrt(_group_sums(x, layout, square=True) / group_sizes(layout))


def group_means(values: torch.Tensor, layout: GroupLayout) -> np.ndarray:
    """The mean of ``values`` (a tensor's shape, e.g. its Fisher diagonal) over each group of
    ``layout``, float64, flat group order."""
    return _group_sums(values.to(torch.float64), layout, square=False) / group_sizes(layout)


def _mean_square(x: torch.Tensor, layout: GroupLayout) -> float:
    """``np.mean(m * m)`` of ``x`` in float64 as a ``rows x cols`` array. The squares are made a
    block at a time, but summed in one call: numpy's pairwise sum depends on the whole array."""
    flat = flat_view(x)
    squares = np.empty(flat.numel(), dtype=np.float64)
    for block in layout.blocks():
        m = flat[block.start : block.stop].to(torch.float64).numpy()
        np.multiply(m, m, out=squares[block.start : block.stop])
    return float(np.mean(squares.reshape(layout.rows, layout.cols)))


def rms_factors(x: torch.Tensor, layout: GroupLayout) -> np.ndarray:
    """Each group's RMS over the tensor's (1 for an all-zero group or tensor): the default
    relative group steps, equal relative error in every group."""
    rms = _group_rms(x, layout)
    whole = float(np.sqrt(_mean_square(x, layout)))
    return np.where(rms > 0, rms / whole, 1.0) if whole > 0 else np.ones_like(rms)


def check_group_factors(factors: object, layout: GroupLayout) -> np.ndarray:
    """``group_factors`` as float64, or a one-line error when they do not fit ``layout``."""
    values = np.asarray(factors, dtype=np.float64).reshape(-1)
    if values.size != layout.n_groups or not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise UsageError(f"group step factors must be {layout.n_groups} positive finite numbers (one per group of "
                         f"a {layout.rows}x{layout.cols} tensor in groups of {layout.group}), got {values.size}",
                         hint="compute them for the same --per-channel/--group-size layout")
    return values


def group_codes(x: torch.Tensor, layout: GroupLayout, step: float, factors: np.ndarray | None = None) -> np.ndarray:
    """Step codes per group: ``step`` for one group, else ``step`` times each group's factor
    (default :func:`rms_factors`)."""
    if layout.n_groups <= 1:
        return code_for(np.array([step]))[: layout.n_groups]
    rel = rms_factors(x, layout) if factors is None else check_group_factors(factors, layout)
    return code_for(step * rel)


def step_quantize(x: torch.Tensor, step: float, *, per_channel: bool = False, group_size: int | None = None,
                  lam: float = DEFAULT_LAMBDA, dq: bool = False,
                  group_factors: np.ndarray | None = None) -> StepQuantized:
    """Quantize ``x`` with mean step ``step`` (nearest grid code per group) and RDO rounding, or
    with ``dq`` dependent quantization (the trellis, ``lam`` its rate weight in step**2 per bit).
    ``group_factors`` (one per group of the layout, e.g. from ``--allocation hessian``) are the
    groups' steps relative to ``step`` instead of :func:`rms_factors`."""
    check_step(step)
    if not torch.is_floating_point(x):
        raise InputError(f"only floating-point tensors can be quantized, got {x.dtype}")
    if not all_finite(x):
        raise InputError("tensor holds NaN or infinite values and cannot be quantized")
    layout = GroupLayout.for_shape(tuple(x.shape), per_channel=per_channel, group_size=group_size)
    codes = group_codes(x, layout, step, group_factors)
    steps = torch.from_numpy(steps_of(codes))
    flat = flat_view(x)
    blocks = layout.blocks()

    def scaled():  # the weights in steps, a block at a time (recomputed: identical every pass)
        for block in blocks:
            m = flat[block.start : block.stop].to(torch.float64).reshape(block.shape).numpy()
            yield slice(block.start, block.stop), (m / layout.block_expand(steps, block).numpy()).reshape(-1)

    def too_small() -> InputError:
        return InputError(f"step {step:g} is too small for this tensor: levels would exceed {MAX_LEVEL}",
                          hint="use a larger --step or a smaller --target-ratio")

    if dq:
        steps64 = steps.numpy()

        def in_steps(sl: slice) -> np.ndarray:
            m = flat[sl].to(torch.float64).numpy()
            return m / trellis.element_steps(steps64, sl, layout.cols, layout.group)

        levels = trellis.trellis_levels(in_steps, layout.rows, layout.cols, layout.group, lam, limit=MAX_LEVEL,
                                        too_large=too_small)
        return StepQuantized(levels, codes, layout, tuple(x.shape), x.dtype, trellis.VERSION)
    levels = rdo_levels(scaled, flat.numel(), lam, limit=MAX_LEVEL, too_large=too_small)
    return StepQuantized(levels, codes, layout, tuple(x.shape), x.dtype)


def estimated_payload_bytes(q: StepQuantized) -> float:
    """The ``quant`` payload size of ``q`` from its histograms (within a few bytes of the real
    ANS stream; used to search a step without running the coder at every trial)."""
    def stream(values: np.ndarray) -> float:
        if values.size == 0:
            return 16.0
        _, counts = entropy.symbol_counts(values)
        info = float(np.sum(counts * np.log2(values.size / counts))) if counts.size > 1 else 0.0
        return 16.0 + 12.0 * counts.size + 4.0 * math.ceil(info / 32.0)

    return stream(q.codes) + 1.0 + stream(q.levels)
