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
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcompress.lazy import torch

from mlcompress.errors import InputError, UsageError

MIN_BITS = 1
MAX_BITS = 16


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

    levels: torch.Tensor  # int64, original shape
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


def dequantize_grouped(levels, scale, zero_point, layout: GroupLayout, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize ``levels`` whose groups follow ``layout`` (used by the quantizer and the codec)."""
    shape = tuple(levels.shape)
    n = levels.reshape(layout.rows, layout.cols)
    s = layout.expand(torch.as_tensor(scale, dtype=torch.float32).to(torch.float64))
    b = layout.expand(torch.as_tensor(zero_point, dtype=torch.int64))
    return dequantize(n, s, b, dtype).reshape(shape)


def fit_params(x: torch.Tensor, layout: GroupLayout, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero-point per group (data-free: only the weights themselves are used).

    The range always includes 0, so 0 is exactly representable (pruned weights stay exactly 0
    and cost one cheap symbol). Symmetric: ``s = max|x| / M``, ``b = 0``. Asymmetric:
    ``s = (max - min) / (hi - lo)``, ``b = lo - round(min / s)``. A group of zeros gets ``s = 1``.
    Scales are rounded to float32 here because that is what the file stores.
    """
    lo, hi = level_range(bits, symmetric)
    g = layout.groups(x)  # zero padding is harmless: every group's range includes 0 anyway
    gmin = torch.clamp(g.amin(dim=2), max=0.0)
    gmax = torch.clamp(g.amax(dim=2), min=0.0)
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
    g = layout.groups(x).reshape(-1, layout.group)
    valid = torch.ones_like(g, dtype=torch.bool)
    if layout.pad:
        valid = valid.reshape(layout.rows, layout.groups_per_row, layout.group)
        valid[:, -1, layout.group - layout.pad:] = False
        valid = valid.reshape(-1, layout.group)
    best_s, best_z = scale.to(torch.float64).clone(), zero.to(torch.float64).clone()
    best_e = _group_sse(g, best_s, best_z, lo, hi)
    s, z = best_s.clone(), best_z.clone()
    count = valid.sum(dim=1).to(torch.float64)
    for _ in range(REFINE_ROUNDS):
        n = torch.where(valid, _levels(g, s, z, lo, hi), 0.0)
        if symmetric:
            z = torch.zeros_like(s)
        else:
            # x ~ a n + b per group; z = -b / a rounded into range.
            sn, sx = n.sum(1), torch.where(valid, g, 0.0).sum(1)
            snn, snx = (n * n).sum(1), (n * torch.where(valid, g, 0.0)).sum(1)
            det = count * snn - sn * sn
            a = torch.where(det > 0, (count * snx - sn * sx) / torch.where(det > 0, det, 1.0), s)
            b = torch.where(det > 0, (sx - a * sn) / count.clamp(min=1), -s * z)
            a = torch.where(a > 0, a, s)
            z = torch.clamp(torch.round(-b / a), lo, hi)
        d = torch.where(valid, n - z[:, None], 0.0)
        dd = (d * d).sum(1)
        s_new = torch.where(dd > 0, (d * torch.where(valid, g, 0.0)).sum(1) / torch.where(dd > 0, dd, 1.0), s)
        s = _stored_scale(torch.where(s_new > 0, s_new, s), half)
        e = _group_sse(torch.where(valid, g, 0.0), s, z, lo, hi)
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
    if not torch.isfinite(x).all():
        raise InputError("tensor holds NaN or infinite values and cannot be quantized")
    layout = GroupLayout.for_shape(tuple(x.shape), per_channel=per_channel, group_size=group_size)
    lo, hi = level_range(bits, symmetric)
    scale, zero = fit_params(x, layout, bits, symmetric)
    half = False
    if layout.n_groups > 1:
        half = half_scales_fit(scale.to(torch.float16).to(torch.float32))
        if half:
            scale = scale.to(torch.float16).to(torch.float32)
            if not symmetric:  # the zero-point that goes with the stored scale
                gmin = _group_min(x, layout)
                zero = torch.clamp(lo - torch.round(gmin / scale.to(torch.float64)), lo, hi).to(torch.int64)
        if refine if refine is not None else True:
            scale, zero = refine_params(x, layout, bits, symmetric, scale, zero, half=half)
    s = layout.expand(scale.to(torch.float64))
    b = layout.expand(zero)
    levels = quantize(x.detach().cpu().reshape(layout.rows, layout.cols), s, b, lo, hi).reshape(x.shape)
    return UniformQuantized(levels, scale, zero, layout, bits, symmetric, x.dtype, half)


def _group_min(x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    return torch.clamp(layout.groups(x).amin(dim=2), max=0.0).reshape(-1)
