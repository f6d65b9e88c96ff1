"""A differentiable counter: soft histogram of integer levels and the entropy-coded size it implies.

Why: the range coder pays ``-log2 p(n)`` bits per level ``n`` with ``p`` the tensor's histogram,
but a histogram of ``round(c)`` has zero gradient. L² (Shi et al., 2023) relaxes the step inside
the cumulative count with a kernel of half-width ``delta``:

    F(q) = sum_j K(q - c_j),   p(q) = (F(q + 1/2) - F(q - 1/2)) / N

where ``K`` rises from 0 at ``-delta`` to 1 at ``+delta`` (``linear``; ``triangle``, the CDF of a
triangular density; ``cos``, ``0.5 - 0.5 cos(pi (x + delta) / (2 delta))``, the default). As
``delta -> 0`` the soft counts become the hard histogram of ``round(c)`` and the estimate
``R = -sum_q n_q log2(n_q / N)`` (soft counts ``n_q``) becomes exactly ``N * H(histogram)``, the size a static-table
coder approaches.

Cost: each ``c_j`` only touches the bins within ``delta + 1/2`` of it, so the counts are a
scatter-add over ``ceil(2 delta) + 2`` neighbouring bins -- O(N) rather than O(N x bins). Large
tensors are still subsampled during training (:func:`subsample`, as the public recipe does): a
fresh random 16,384 of them estimate the histogram well and cut a LeNet-5 step ~10x.
"""

from __future__ import annotations

import math

import torch

from mlcompress.errors import UsageError

KERNELS = ("cos", "linear", "triangle")
DEFAULT_RESOLUTION = 64


def soft_step(x: torch.Tensor, delta: float, kernel: str = "cos") -> torch.Tensor:
    """K(x): 0 for ``x <= -delta``, 1 for ``x >= delta``, a smooth ramp in between."""
    if kernel not in KERNELS:
        raise UsageError(f"unknown kernel {kernel!r}", hint=f"use one of: {', '.join(KERNELS)}")
    if delta <= 0:
        return (x >= 0).to(x.dtype)
    t = torch.clamp((x + delta) / (2 * delta), 0.0, 1.0)  # 0..1 across the window
    if kernel == "linear":
        return t
    if kernel == "cos":
        return 0.5 - 0.5 * torch.cos(math.pi * t)
    # triangle: CDF of the triangular density on [-delta, delta]
    return torch.where(t <= 0.5, 2 * t * t, 1 - 2 * (1 - t) * (1 - t))


#: Tensors above this many elements are subsampled to this many for the training-time rate.
SUBSAMPLE = 16384


def subsample(c: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """``(sample, scale)``: up to :data:`SUBSAMPLE` random elements of ``c`` and ``numel / len``
    to scale a rate estimated on the sample back to the whole tensor."""
    flat = c.reshape(-1)
    if flat.numel() <= SUBSAMPLE:
        return flat, 1.0
    idx = torch.randint(flat.numel(), (SUBSAMPLE,), generator=generator).to(flat.device)
    return flat[idx], flat.numel() / SUBSAMPLE


#: Largest default half-width: half a bin. Wider windows (the paper's rule gives ~4 bins at an
#: 8-bit-like start) only blur the histogram and multiply the work.
MAX_DELTA = 0.5


def default_delta(c: torch.Tensor, resolution: int = DEFAULT_RESOLUTION) -> float:
    """The paper's window ``(max c - min c) / resolution``, kept within ``[1e-3, MAX_DELTA]``."""
    if c.numel() == 0:
        return 1e-3
    span = float(c.detach().max() - c.detach().min())
    return min(max(span / resolution, 1e-3), MAX_DELTA)


def soft_counts(
    c: torch.Tensor, delta: float, kernel: str = "cos"
) -> tuple[torch.Tensor, int]:
    """Soft counts ``N p(q)`` for every integer ``q`` in range, and the level of index 0.

    Returns ``(counts, offset)`` with ``counts[k]`` the soft count of level ``k + offset``.
    ``counts.sum() == N`` exactly up to float error because the relaxed step of every element
    telescopes across the bins.
    """
    flat = c.reshape(-1)
    if flat.numel() == 0:
        return flat.new_zeros(1), 0
    reach = int(math.ceil(delta)) + 1
    lo = int(math.floor(float(flat.detach().min()))) - reach
    hi = int(math.ceil(float(flat.detach().max()))) + reach
    base = torch.round(flat.detach()).to(torch.int64)
    counts = flat.new_zeros(hi - lo + 1)
    # K at the boundaries base + i - 1/2 (i = -reach .. reach + 1), each evaluated once: the mass
    # of element j in bin base + k is K(upper boundary - c_j) - K(lower boundary - c_j).
    steps = [
        soft_step((base + i).to(flat.dtype) - 0.5 - flat, delta, kernel) for i in range(-reach, reach + 2)
    ]
    for k in range(-reach, reach + 1):
        mass = steps[k + reach + 1] - steps[k + reach]
        counts = counts.index_add(0, base + k - lo, mass)
    return counts, lo


def rate_bits(
    c: torch.Tensor,
    *,
    kernel: str = "cos",
    delta: float | None = None,
    resolution: int = DEFAULT_RESOLUTION,
) -> torch.Tensor:
    """Differentiable estimate of the bits needed to code ``round(c)`` with its own static table.

    ``R = -sum_q n_q log2(n_q / N)`` with ``n_q`` the soft counts of :func:`soft_counts`: the soft
    histogram's entropy times N. Why the soft counts on both sides: with the hard counts in front
    (``-sum_j log2 p(round(c_j))``) the gradient of a cross-entropy at its own distribution is zero
    along the simplex, so moving mass between bins would get no signal; the soft entropy's
    gradient is ``log2(p_from / p_to)`` per unit of mass moved, i.e. weights are pulled towards
    populous levels, which is what makes the range coder's output shrink.
    """
    flat = c.reshape(-1)
    if flat.numel() == 0:
        return flat.new_zeros(())
    d = default_delta(flat, resolution) if delta is None else float(delta)
    counts, _ = soft_counts(flat, d, kernel)
    counts = counts.clamp_min(0.0)
    p = counts / flat.numel()
    # 0 log 0 = 0; the where keeps the gradient finite at empty bins
    logp = torch.log2(torch.where(counts > 0, p, torch.ones_like(p)))
    return -(counts * logp).sum()


def hard_entropy_bits(levels: torch.Tensor) -> float:
    """``N * H`` of the empirical histogram of integer ``levels`` (the ideal static-table size)."""
    flat = torch.as_tensor(levels).reshape(-1)
    if flat.numel() == 0:
        return 0.0
    _, counts = torch.unique(flat, return_counts=True)
    p = counts.to(torch.float64) / flat.numel()
    return float(-(counts.to(torch.float64) * torch.log2(p)).sum())
