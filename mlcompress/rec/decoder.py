"""REC decoder: regenerate each block's chosen candidate and put its weights in place.

Work is proportional to the number of weights: for every block only the chosen candidate's
``size_b`` coordinates are generated (:mod:`mlcompress.rec.sampler`), turned into weights by the
one specified float32 path ``nu + rho * z``, and moved to their flat indices by the block layout
(:mod:`mlcompress.rec.layout`). Everything before the final multiply and add is integer
arithmetic or a table lookup, so the result is bit-identical on every run, thread count and
device.

On the CPU the same computation runs in numpy (:mod:`mlcompress.rec.cpu_decoder`), which
dispatches small ops several times faster; the torch code below is the CUDA path and the
reference the numpy one is tested against.

Speed: weights are produced in *position* order (block 0's slots, then block 1's, ...), where
blocks come in two runs of equal size (``size + 1`` for the first ``numel % B`` blocks), so no
masking is needed; then one gather through the inverse layout puts each weight in place (a
gather is several times faster than a scatter on CPU).
"""

from __future__ import annotations

import torch

from mlcompress.rec.cpu_decoder import decode_weights_cpu
from mlcompress.rec.layout import BlockLayout
from mlcompress.rec.sampler import candidate_weights, candidates

__all__ = ["decode_weights", "decode_weights_torch", "weights_by_position"]

# Weights generated per slice: small enough that a slice's passes stay in the CPU cache (and
# the int32 hash grid's memory stays bounded).
_SLICE_WEIGHTS = 1 << 16


def weights_by_position(
    layout: BlockLayout,
    indices: torch.Tensor,
    *,
    seed: int,
    prior_mean: float,
    prior_std: float,
) -> torch.Tensor:
    """float32 ``[numel]``: the chosen candidates' weights in position (block) order."""
    base, extra = divmod(layout.numel, layout.num_blocks)
    parts = []
    for first, last, size in ((0, extra, base + 1), (extra, layout.num_blocks, base)):
        per_slice = max(1, _SLICE_WEIGHTS // size)
        for b0 in range(first, last, per_slice):
            b1 = min(last, b0 + per_slice)
            parts.append(candidates(seed, indices[b0:b1], size).view(-1))
    z = parts[0] if len(parts) == 1 else torch.cat(parts)
    return candidate_weights(z, prior_mean, prior_std)


def decode_weights(
    layout: BlockLayout,
    indices: torch.Tensor,
    *,
    seed: int,
    prior_mean: float,
    prior_std: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """float32 ``[layout.numel]`` flat weights of the chosen candidates, on ``device``.

    ``indices[b]`` is block ``b``'s candidate index in the stream of ``seed``. Weights of block
    ``b``, slot ``j`` land at ``layout.flat_index(start_b + j)``. On the CPU this runs the numpy
    implementation (same bits, lower fixed cost per tensor); elsewhere :func:`decode_weights_torch`.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return decode_weights_cpu(layout, indices, seed=seed, prior_mean=prior_mean, prior_std=prior_std)
    return decode_weights_torch(layout, indices, seed=seed, prior_mean=prior_mean, prior_std=prior_std,
                                device=device)


def decode_weights_torch(
    layout: BlockLayout,
    indices: torch.Tensor,
    *,
    seed: int,
    prior_mean: float,
    prior_std: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """:func:`decode_weights` computed with torch ops on ``device`` (the CUDA path; on the CPU,
    the reference the numpy path is tested against)."""
    device = torch.device(device)
    indices = indices.to(device=device, dtype=torch.int64)
    if indices.shape != (layout.num_blocks,):
        raise ValueError(f"expected {layout.num_blocks} indices, got {tuple(indices.shape)}")
    by_position = weights_by_position(
        layout, indices, seed=seed, prior_mean=prior_mean, prior_std=prior_std
    )
    return torch.index_select(by_position, 0, layout.position_of(device=device, dtype=torch.int32))
