"""Data-free integer quantization: the lecture's Q(x) = clip(round(x/s) + b) and Q~(n) = s(n - b).

Why one module for all granularities: per-tensor, per-channel and per-group quantization differ
only in which elements share a scale ``s`` and zero-point ``b``. Here a tensor is viewed as a
``rows x cols`` matrix (``rows`` = output channels for per-channel/per-group, 1 for per-tensor)
and every row is cut into groups of ``group`` consecutive columns (the last group may be
shorter); each group has its own ``(s, b)``. Per-channel is ``group = cols``, per-tensor is one
row and one group. The same layout is what the ``quant`` codec stores, so the decoder rebuilds
exactly the partition the quantizer used.

Exactness: :func:`dequantize` is *the* specified reconstruction, used both when the quantizer
evaluates the model and when the codec decodes a file: ``float64(s) * (n - b)`` computed in
float64 on the CPU, then rounded once to the tensor's dtype. Scales are rounded to float32 at
fit time (that is what the file stores), so the quantizer never uses a scale the file cannot
hold.

Memory: every pass over a tensor (range fitting, refinement, rounding, reconstruction) works
through it in :class:`Block` s of about :data:`BLOCK_ELEMENTS` elements, so its float64
temporaries are a few blocks, whatever the tensor's size, and levels are kept in the narrowest
integer type that holds them. Each element and each group gets exactly the arithmetic it gets in
one whole-tensor pass (elementwise operations, and reductions inside one group), so the blocks
change no bit of the result.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcompress.lazy import torch

from mlcompress.errors import InputError, UsageError

MIN_BITS = 1
MAX_BITS = 16
#: Elements per block of a pass over a tensor (see the module docstring): each float64
#: temporary of a block is 2 MB.
BLOCK_ELEMENTS = 1 << 18


def check_bits(bits: int) -> None:
    """Reject bit widths outside 1..16 (levels must fit the entropy coder's int32 alphabet)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise UsageError(f"--bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def level_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer levels ``[lo, hi]`` available at ``bits``.

    Asymmetric uses all ``2**bits`` codes, ``[-2**(bits-1), 2**(bits-1) - 1]``. Symmetric uses
    the lecture's ``[-M, M]`` with ``M = 2**(bits-1) - 1`` so that ``+x`` and ``-x`` quantize to
    mirrored levels; it therefore needs at least 2 bits.
    """
    check_bits(bits)
    half = 1 << (bits - 1)
    if symmetric:
        if bits < 2:
            raise UsageError("--symmetric needs at least 2 bits (1 bit has no level pair ±M)")
        return -(half - 1), half - 1
    return -half, half - 1


def quantize(x: torch.Tensor, scale, zero_point, lo, hi) -> torch.Tensor:
    """Q(x) = clip(round(x / s) + b, lo, hi) as int64; ``scale``/``zero_point``/bounds broadcast.

    With ``lo = -M, hi = M`` this is exactly the lecture's eq. (2). Division happens in float64
    so that e.g. ``1.20 / 0.01`` rounds as the worked example does.
    """
    x64 = torch.as_tensor(x).to(torch.float64)
    s = torch.as_tensor(scale, dtype=torch.float64)
    b = torch.as_tensor(zero_point, dtype=torch.float64)
    n = torch.round(x64 / s) + b
    n = torch.minimum(torch.maximum(n, torch.as_tensor(lo, dtype=torch.float64)), torch.as_tensor(hi, dtype=torch.float64))
    return n.to(torch.int64)


def dequantize(levels: torch.Tensor, scale, zero_point, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Q~(n) = s (n - b): float64 arithmetic on the CPU, rounded once to ``dtype``.

    This is the single reconstruction rule shared by the quantizer's evaluation and the codec's
    decoder, which is what makes "decode reproduces what was evaluated" exact.
    """
    n = torch.as_tensor(levels).to("cpu", torch.float64)
    s = torch.as_tensor(scale, dtype=torch.float64).cpu()
    b = torch.as_tensor(zero_point, dtype=torch.float64).cpu()
    return (s * (n - b)).to(torch.float32 if dtype is None else dtype)


@dataclass(frozen=True)
class Block:
    """Rows ``row0:row1`` and columns ``col0:col1`` of a layout's matrix view, which is the
    contiguous run ``start:stop`` of the flattened tensor (whole rows, or part of one row)."""

    row0: int
    row1: int
    col0: int
    col1: int
    start: int
    stop: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.row1 - self.row0, self.col1 - self.col0


@dataclass(frozen=True)
class GroupLayout:
    """How a tensor is cut into groups that share one (scale, zero-point).

    ``rows x cols`` is the matrix view of the tensor (row-major); each row holds
    ``ceil(cols / group)`` groups of ``group`` consecutive columns.
    """

    rows: int
    cols: int
    group: int

    @property
    def groups_per_row(self) -> int:
        return -(-self.cols // self.group) if self.cols else 0

    @property
    def n_groups(self) -> int:
        return self.rows * self.groups_per_row

    @staticmethod
    def for_shape(shape: tuple[int, ...], *, per_channel: bool = False, group_size: int | None = None) -> "GroupLayout":
        """The layout for a tensor of ``shape``: per-tensor by default, per output channel (dim 0)
        with ``per_channel``, or groups of ``group_size`` inside each output channel."""
        numel = 1
        for d in shape:
            numel *= int(d)
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise UsageError(f"--group-size must be a positive integer, got {group_size!r}")
        by_row = (per_channel or group_size is not None) and len(shape) >= 2 and numel > 0
        rows = int(shape[0]) if by_row else 1
        cols = numel // rows if rows else 0
        group = min(group_size, cols) if group_size is not None else cols
        return GroupLayout(rows, cols, max(group, 1))

    def expand(self, per_group: torch.Tensor) -> torch.Tensor:
        """Broadcast a ``(rows, groups_per_row)`` parameter to the ``(rows, cols)`` matrix view."""
        return per_group.reshape(self.rows, self.groups_per_row).repeat_interleave(self.group, dim=1)[:, : self.cols]

    @property
    def pad(self) -> int:
        """Zeros that complete each row's last group (it may be shorter than ``group``)."""
        return self.groups_per_row * self.group - self.cols

    def _block(self, row0: int, row1: int, col0: int, col1: int) -> Block:
        return Block(row0, row1, col0, col1, row0 * self.cols + col0, (row1 - 1) * self.cols + col1)

    def blocks(self, max_elements: int | None = None, *, whole_groups: bool = False) -> list[Block]:
        """The matrix view cut into blocks of about ``max_elements`` (default
        :data:`BLOCK_ELEMENTS`), in order, covering every element once.

        A block holds whole rows when a row fits, else a run of whole groups of one row; a group
        larger than ``max_elements`` is cut into pieces unless ``whole_groups`` (which per-group
        sums need). With ``whole_groups`` a block also holds at least two groups when the layout
        has two: torch sums the elements of a lone output differently from those of several
        outputs (split across threads), so every block must reduce like the whole tensor does.
        """
        limit = max(int(max_elements or BLOCK_ELEMENTS), 1)
        if self.rows == 0 or self.cols == 0:
            return []
        least = 2 if whole_groups and self.n_groups >= 2 else 1
        if self.cols <= limit or (whole_groups and self.groups_per_row == 1):
            step = max(limit // self.cols, -(-least // self.groups_per_row))
            starts = list(range(0, self.rows, step))
            if len(starts) > 1 and (self.rows - starts[-1]) * self.groups_per_row < least:
                starts.pop()  # the last block alone would hold one group: join it to the one before
            ends = starts[1:] + [self.rows]
            return [self._block(a, b, 0, self.cols) for a, b in zip(starts, ends)]
        if self.group <= limit or whole_groups:
            step = max(limit // self.group, least) * self.group
            starts = list(range(0, self.cols, step))
            if len(starts) > 1 and -(-(self.cols - starts[-1]) // self.group) < least:
                starts.pop()
            spans = list(zip(starts, starts[1:] + [self.cols]))
        else:  # groups longer than a block: pieces of one group each
            spans = []
            for g0 in range(0, self.cols, self.group):
                g1 = min(g0 + self.group, self.cols)
                spans += [(c, min(c + limit, g1)) for c in range(g0, g1, limit)]
        return [self._block(r, r + 1, a, b) for r in range(self.rows) for a, b in spans]

    def group_span(self, block: Block) -> tuple[int, int]:
        """Flat indices ``first:last`` of the groups that ``block``'s elements belong to."""
        first = block.row0 * self.groups_per_row + block.col0 // self.group
        return first, (block.row1 - 1) * self.groups_per_row + -(-block.col1 // self.group)

    def block_expand(self, per_group: torch.Tensor, block: Block) -> torch.Tensor:
        """A per-group parameter (flat, ``n_groups``) broadcast to ``block``'s shape, like
        :meth:`expand` restricted to the block."""
        rows = per_group.reshape(self.rows, self.groups_per_row)[block.row0 : block.row1]
        return rows.index_select(1, torch.arange(block.col0, block.col1) // self.group)

    def block_groups(self, flat: torch.Tensor, block: Block) -> torch.Tensor:
        """``block``'s elements of the flattened tensor in float64 as ``(rows, groups, group)``,
        zero-padded to whole groups (as :meth:`groups` pads each row's last group); a piece of
        one group (see :meth:`blocks`) comes as ``(1, 1, its length)``."""
        m = flat[block.start : block.stop].to(torch.float64).reshape(block.shape)
        if block.col0 % self.group or (block.col1 % self.group and block.col1 < self.cols):
            return m.reshape(1, 1, -1)
        if block.col1 % self.group:
            m = torch.nn.functional.pad(m, (0, -block.col1 % self.group))
        return m.reshape(m.shape[0], -1, self.group)

    def groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in float64 as ``(rows, groups_per_row, group)``, the last group of each row padded
        with zeros (callers account for the padding: a zero is in every group's range anyway)."""
        m = torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(self.rows, self.cols)
        if self.pad:
            m = torch.nn.functional.pad(m, (0, self.pad))
        return m.reshape(self.rows, self.groups_per_row, self.group)


@dataclass
class UniformQuantized:
    """Integer levels of one tensor plus what is needed to reconstruct it."""

    levels: torch.Tensor  # int8 or int16 (:func:`level_dtype`), original shape
    scale: torch.Tensor  # float32, (n_groups,)
    zero_point: torch.Tensor  # int64, (n_groups,)
    layout: GroupLayout
    bits: int
    symmetric: bool
    dtype: torch.dtype
    half_scales: bool = False  # the file stores the scales as float16

    def dequantize(self) -> torch.Tensor:
        """The reconstructed tensor, by the one rule in :func:`dequantize`."""
        return dequantize_grouped(self.levels, self.scale, self.zero_point, self.layout, self.dtype)


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the CPU as a flat tensor (a view when it is contiguous): what blocks index."""
    return torch.as_tensor(x).detach().cpu().reshape(-1)


def element_slices(numel: int) -> list[slice]:
    """Consecutive runs of :data:`BLOCK_ELEMENTS` elements: the blocks of elementwise passes."""
    return [slice(a, min(a + BLOCK_ELEMENTS, numel)) for a in range(0, numel, BLOCK_ELEMENTS)]


def all_finite(x: torch.Tensor) -> bool:
    """Whether no element is NaN or infinite (checked a block at a time)."""
    flat = flat_view(x)
    return all(bool(torch.isfinite(flat[sl]).all()) for sl in element_slices(flat.numel()))


def blockwise(layout: GroupLayout, pieces, dtype: torch.dtype, shape) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` filled from ``(block, values)`` pairs covering it."""
    out = torch.empty(layout.rows * layout.cols, dtype=dtype)
    for block, values in pieces:
        out[block.start : block.stop] = values.reshape(-1)
    return out.reshape(shape)


def dequantize_block(levels, scale, zero_point, layout: GroupLayout, block: Block, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize` of one block's levels (``block.numel`` of them) with its groups' parameters."""
    s = layout.block_expand(torch.as_tensor(scale, dtype=torch.float32).to(torch.float64), block)
    b = layout.block_expand(torch.as_tensor(zero_point, dtype=torch.int64), block)
    return dequantize(torch.as_tensor(levels).reshape(block.shape), s, b, dtype)


def dequantize_grouped(levels, scale, zero_point, layout: GroupLayout, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize ``levels`` whose groups follow ``layout`` (used by the quantizer and the codec)."""
    flat = flat_view(levels)
    pieces = ((b, dequantize_block(flat[b.start : b.stop], scale, zero_point, layout, b, dtype)) for b in layout.blocks())
    return blockwise(layout, pieces, dtype, tuple(levels.shape))


def _group_extremes(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's ``min(0, min x)`` and ``max(0, max x)`` in float64, shaped ``(rows, groups_per_row)``.

    A group cut into pieces (longer than a block) combines its pieces' extremes; zero padding is
    harmless because 0 is in every group's range anyway.
    """
    gmin = torch.zeros(layout.rows, layout.groups_per_row, dtype=torch.float64)
    gmax = torch.zeros_like(gmin)
    flat = flat_view(x)
    for block in layout.blocks():
        g = layout.block_groups(flat, block)
        low, high = torch.clamp(g.amin(dim=2), max=0.0), torch.clamp(g.amax(dim=2), min=0.0)
        rows, cols = slice(block.row0, block.row1), slice(block.col0 // layout.group, -(-block.col1 // layout.group))
        if g.shape[2] != layout.group:  # a piece of a group: combine with its other pieces
            low, high = torch.minimum(gmin[rows, cols], low), torch.maximum(gmax[rows, cols], high)
        gmin[rows, cols], gmax[rows, cols] = low, high
    return gmin, gmax


def fit_params(x: torch.Tensor, layout: GroupLayout, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero-point per group (data-free: only the weights themselves are used).

    The range always includes 0, so 0 is exactly representable (pruned weights stay exactly 0
    and cost one cheap symbol). Symmetric: ``s = max|x| / M``, ``b = 0``. Asymmetric:
    ``s = (max - min) / (hi - lo)``, ``b = lo - round(min / s)``. A group of zeros gets ``s = 1``.
    Scales are rounded to float32 here because that is what the file stores.
    """
    return _minmax_params(*_group_extremes(x, layout), bits, symmetric)


def _minmax_params(gmin: torch.Tensor, gmax: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = level_range(bits, symmetric)
    if symmetric:
        scale = torch.maximum(gmax, -gmin) / hi
        zero = torch.zeros_like(scale)
    else:
        scale = (gmax - gmin) / (hi - lo)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(torch.float32)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    if not symmetric:
        zero = lo - torch.round(gmin / scale.to(torch.float64))
        zero = torch.clamp(zero, lo, hi)
    return scale.reshape(-1), zero.to(torch.int64).reshape(-1)


#: Rounds of the least-squares refinement of group scales and zero-points.
REFINE_ROUNDS = 6
#: float16's normal range: scales inside it are stored as float16 (relative rounding 2**-11).
_FP16_MIN, _FP16_MAX = 2.0 ** -14, 65504.0


def _levels(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], lo, hi)


def _group_sse(g, scale, zero, lo, hi) -> torch.Tensor:
    n = _levels(g, scale, zero, lo, hi)
    return ((g - scale[..., None] * (n - zero[..., None])) ** 2).sum(dim=-1)


def refine_params(x: torch.Tensor, layout: GroupLayout, bits: int, symmetric: bool, scale: torch.Tensor,
                  zero: torch.Tensor, *, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares refinement of each group's (scale, zero-point), starting from min/max.

    Why: min/max spends the grid on the group's two extreme weights; most of the error is in the
    many weights between. HQQ optimises zero-points and scales against the weights' error
    instead; this is the squared-error version of that idea, by alternation: round with the
    current (s, z), then fit ``x ~ s * (n - z)`` by least squares per group (z rounded to an
    integer in range, s refitted for it), rounding ``s`` to what the file stores. A group keeps
    whichever of its min/max and refined parameters has the smaller error, so refinement never
    hurts any group. Data-free: only the weights are used.
    """
    lo, hi = level_range(bits, symmetric)
    best_s, best_z = torch.empty(layout.n_groups, dtype=torch.float32), torch.empty(layout.n_groups, dtype=torch.int64)
    flat = flat_view(x)
    for block in layout.blocks(whole_groups=True):  # groups are independent: a block at a time
        first, last = layout.group_span(block)
        g = layout.block_groups(flat, block)
        valid = torch.ones_like(g, dtype=torch.bool)
        if block.col1 == layout.cols and layout.pad:
            valid[:, -1, layout.group - layout.pad:] = False
        best_s[first:last], best_z[first:last] = _refine_groups(
            g.reshape(-1, layout.group), valid.reshape(-1, layout.group), scale[first:last], zero[first:last],
            lo, hi, symmetric, half)
    return best_s, best_z


def _refine_groups(g, valid, scale, zero, lo: int, hi: int, symmetric: bool, half: bool):
    """:func:`refine_params` for the groups that are the rows of ``g`` (zero-padded, ``valid``
    marks the real elements)."""
    best_s, best_z = scale.to(torch.float64).clone(), zero.to(torch.float64).clone()
    best_e = _group_sse(g, best_s, best_z, lo, hi)
    s, z = best_s.clone(), best_z.clone()
    count = valid.sum(dim=1).to(torch.float64)
    # g is zero where not valid (the padding), so it is its own torch.where(valid, g, 0.0).
    for _ in range(REFINE_ROUNDS):
        n = torch.where(valid, _levels(g, s, z, lo, hi), 0.0)
        if symmetric:
            z = torch.zeros_like(s)
        else:
            # x ~ a n + b per group; z = -b / a rounded into range.
            sn, sx = n.sum(1), g.sum(1)
            snn, snx = (n * n).sum(1), (n * g).sum(1)
            det = count * snn - sn * sn
            a = torch.where(det > 0, (count * snx - sn * sx) / torch.where(det > 0, det, 1.0), s)
            b = torch.where(det > 0, (sx - a * sn) / count.clamp(min=1), -s * z)
            a = torch.where(a > 0, a, s)
            z = torch.clamp(torch.round(-b / a), lo, hi)
        d = torch.where(valid, n - z[:, None], 0.0)
        dd = (d * d).sum(1)
        s_new = torch.where(dd > 0, (d * g).sum(1) / torch.where(dd > 0, dd, 1.0), s)
        s = _stored_scale(torch.where(s_new > 0, s_new, s), half)
        e = _group_sse(g, s, z, lo, hi)
        better = e < best_e
        best_s, best_z, best_e = torch.where(better, s, best_s), torch.where(better, z, best_z), torch.minimum(e, best_e)
    return best_s.to(torch.float32), best_z.to(torch.int64)


def _stored_scale(scale: torch.Tensor, half: bool) -> torch.Tensor:
    """Scales as the file stores them: float16 values when ``half``, else float32 (as float64)."""
    return scale.to(torch.float16 if half else torch.float32).to(torch.float64)


def half_scales_fit(scale: torch.Tensor) -> bool:
    """Whether every scale lies in float16's normal range (then float16 storage costs ~nothing)."""
    return bool(((scale >= _FP16_MIN) & (scale <= _FP16_MAX)).all()) if scale.numel() else False


def quantize_tensor(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = False,
    per_channel: bool = False,
    group_size: int | None = None,
    refine: bool | None = None,
) -> UniformQuantized:
    """Quantize one tensor data-free at ``bits`` with the chosen granularity.

    Per-channel and group-wise modes (several groups) store their scales as float16 when they
    fit its normal range (they are a visible share of small groups' bytes: 32 bits per group
    against 16) and refine them by least squares (:func:`refine_params`; ``refine=False`` keeps
    min/max). Per tensor, min/max and a float32 scale are kept: the seed's worked examples.
    """
    if not torch.is_floating_point(x):
        raise InputError(f"only floating-point tensors can be quantized, got {x.dtype}")
    if not all_finite(x):
        raise InputError("tensor holds NaN or infinite values and cannot be quantized")
    layout = GroupLayout.for_shape(tuple(x.shape), per_channel=per_channel, group_size=group_size)
    lo, hi = level_range(bits, symmetric)
    gmin, gmax = _group_extremes(x, layout)
    scale, zero = _minmax_params(gmin, gmax, bits, symmetric)
    half = False
    if layout.n_groups > 1:
        half = half_scales_fit(scale.to(torch.float16).to(torch.float32))
        if half:
            scale = scale.to(torch.float16).to(torch.float32)
            if not symmetric:  # the zero-point that goes with the stored scale
                gmin = gmin.reshape(-1)
                zero = torch.clamp(lo - torch.round(gmin / scale.to(torch.float64)), lo, hi).to(torch.int64)
        if refine if refine is not None else True:
            scale, zero = refine_params(x, layout, bits, symmetric, scale, zero, half=half)
    s = scale.to(torch.float64)
    flat = flat_view(x)
    levels = torch.empty(flat.numel(), dtype=level_dtype(bits))
    for block in layout.blocks():
        x_block = flat[block.start : block.stop].reshape(block.shape)
        n = quantize(x_block, layout.block_expand(s, block), layout.block_expand(zero, block), lo, hi)
        levels[block.start : block.stop] = n.reshape(-1)
    return UniformQuantized(levels.reshape(x.shape), scale, zero, layout, bits, symmetric, x.dtype, half)


def level_dtype(bits: int) -> torch.dtype:
    """The narrowest integer type that holds every ``bits``-bit level."""
    return torch.int8 if bits <= 8 else torch.int16
