"""REC decoder: regenerate each block's chosen candidate and put its weights in place.

Work is proportional to the number of weights: for every block only the chosen candidate's
``size_b`` coordinates are generated (:mod:`mlcompress.codecs.rec.sampler`), turned into weights by the
one specified float32 path ``nu + rho * z``, and moved to their flat indices by the block layout
(:mod:`mlcompress.codecs.rec.layout`). Everything before the final multiply and add is integer
arithmetic or a table lookup, so the result is bit-identical on every run, thread count and
device.

One implementation, :func:`decode_flat`, over the array module ``xp`` (:mod:`.backend`): on the
CPU :func:`decode_weights` runs it in numpy, elsewhere in torch. Why numpy on the CPU: a whole file
is dominated by fixed per-op costs (a LeNet-5 posterior has eight small REC tensors, each ~150
elementwise integer ops), which torch dispatches at several microseconds apiece however small
the tensor and numpy at about one, while on cache-sized slices numpy is as fast per element.
The two backends are tested against each other bit for bit (tests/test_rec_backends.py).

Speed: weights are produced in *position* order (block 0's slots, then block 1's, ...), where
blocks come in two runs of equal size (``size + 1`` for the first ``numel % B`` blocks), so no
masking is needed; then one gather through the inverse layout puts each weight in place (a
gather is several times faster than a scatter on CPU). Both run on slices
(:meth:`.backend.Backend.slice_size`), so that on the CPU a slice's passes stay in the cache,
and the hash grid's memory stays bounded.
"""

from __future__ import annotations

from typing import Any

from mlcompress.lazy import numpy as np
from mlcompress.lazy import torch

from mlcompress.codecs.rec.backend import backend
from mlcompress.codecs.rec.counter import STREAM_CANDIDATES, col_hash, stream_key
from mlcompress.codecs.rec.hashing import Tying
from mlcompress.codecs.rec.layout import BlockLayout, Permutation
from mlcompress.codecs.rec.sampler import candidate_weights, code_grid, normal_table

__all__ = ["decode_weights", "decode_weights_torch", "decode_flat", "weights_by_position"]


def weights_by_position(
    layout: BlockLayout,
    indices: Any,
    *,
    seed: int,
    prior_mean: float,
    prior_std: float,
    xp: Any = torch,
    device: Any = "cpu",
) -> Any:
    """float32 ``[numel]`` ``xp`` array: the chosen candidates' weights in position (block) order."""
    b = backend(xp)
    table, _ = normal_table(device, xp=xp)
    key = stream_key(seed, STREAM_CANDIDATES)
    base, extra = divmod(layout.numel, layout.num_blocks)
    z = b.empty((layout.numel,), "float32", device)
    done = 0
    for first, last, size in ((0, extra, base + 1), (extra, layout.num_blocks, base)):
        if first == last:
            continue
        cols = col_hash(key, b.arange_words((size + 1) // 2, device), xp=xp)
        per_slice = max(1, b.slice_size(device) // size)
        for b0 in range(first, last, per_slice):
            b1 = min(last, b0 + per_slice)
            n = (b1 - b0) * size
            codes = code_grid(key, indices[b0:b1], cols, xp=xp)
            if codes.shape[1] != size:  # odd size: drop the last pair's unused half
                codes = codes[:, :size]
            b.take(table, codes.reshape(-1), out=z[done : done + n])
            done += n
    return candidate_weights(z, prior_mean, prior_std, xp=xp, out=z)


def decode_flat(
    layout: BlockLayout,
    indices: Any,
    *,
    seed: int,
    prior_mean: float,
    prior_std: float,
    xp: Any = torch,
    device: Any = "cpu",
) -> Any:
    """float32 ``[layout.numel]`` flat weights of the chosen candidates, an ``xp`` array on ``device``.

    ``indices[b]`` (integers, an ``xp`` array or anything it takes) is block ``b``'s candidate
    index in the stream of ``seed``. Weights of block ``b``, slot ``j`` land at
    ``layout.flat_index(start_b + j)``.
    """
    b = backend(xp)
    indices = b.as_int64(indices, device)
    if tuple(indices.shape) != (layout.num_blocks,):
        raise ValueError(f"expected {layout.num_blocks} indices, got {tuple(indices.shape)}")
    indices = b.words(indices)  # once, not per slice
    by_position = weights_by_position(layout, indices, seed=seed, prior_mean=prior_mean,
                                      prior_std=prior_std, xp=xp, device=device)
    # Gather into place slice by slice, out[f] = by_position[position_of(f)]: each slice's
    # positions are used while still in cache, and no full-size index array is built.
    permutation = Permutation(layout, xp=xp, device=device)
    out = b.empty((layout.numel,), "float32", device)
    step = b.slice_size(device)
    for s0 in range(0, layout.numel, step):
        s1 = min(layout.numel, s0 + step)
        b.take(by_position, permutation.of_range(s0, s1, inverse=True), out=out[s0:s1])
    return out


def decode_weights(
    layout: BlockLayout,
    indices: torch.Tensor,
    *,
    seed: int,
    prior_mean: float,
    prior_std: float,
    device: torch.device | str = "cpu",
    tying: Tying | None = None,
) -> torch.Tensor:
    """float32 ``[layout.numel]`` torch tensor of the chosen candidates' weights, on ``device``.

    :func:`decode_flat` in numpy on the CPU (same bits, lower fixed cost per tensor), in torch
    elsewhere. With ``tying`` (the hashing trick) the layout covers its free variables and the
    result is the ``[tying.numel]`` tensor they expand to.
    """
    device = torch.device(device)
    if device.type != "cpu":
        return decode_weights_torch(layout, indices, seed=seed, prior_mean=prior_mean, prior_std=prior_std,
                                    device=device, tying=tying)
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    flat = decode_flat(layout, indices, seed=seed, prior_mean=prior_mean, prior_std=prior_std, xp=np)
    if tying is not None:
        flat = tying.expand(flat, xp=np)
    return torch.from_numpy(flat)


def decode_weights_torch(
    layout: BlockLayout,
    indices: torch.Tensor,
    *,
    seed: int,
    prior_mean: float,
    prior_std: float,
    device: torch.device | str = "cpu",
    tying: Tying | None = None,
) -> torch.Tensor:
    """:func:`decode_weights` computed with torch ops on ``device`` (on CUDA, what it runs)."""
    device = torch.device(device)
    flat = decode_flat(layout, torch.as_tensor(indices).to(device), seed=seed, prior_mean=prior_mean,
                       prior_std=prior_std, xp=torch, device=device)
    return tying.expand(flat, xp=torch, device=device) if tying is not None else flat
