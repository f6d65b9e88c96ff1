"""Per-block reductions over a flat vector of weights, with blocks given as an index per weight.

The REC block layout assigns every coded weight to a block by a seeded permutation, so a block's
weights are scattered through the model. Training needs three things per block -- the KL sum, a
softmax over the block's weights (Mean-KL), and a broadcast of per-block values back to weights --
and scatter/gather with an index vector does each in one pass whatever the layout, with no
padding to equal block sizes.
"""

from __future__ import annotations

import torch


def segment_sum(values: torch.Tensor, block_of: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``out[b] = sum of values[i] with block_of[i] == b``."""
    return torch.zeros(num_blocks, dtype=values.dtype, device=values.device).index_add_(0, block_of, values)


def segment_softmax(logits: torch.Tensor, block_of: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Softmax of ``logits`` within each block: the result sums to 1 over every block."""
    peak = torch.full((num_blocks,), -torch.inf, dtype=logits.dtype, device=logits.device)
    peak = peak.scatter_reduce(0, block_of, logits.detach(), reduce="amax", include_self=True)
    weights = torch.exp(logits - peak[block_of])
    return weights / segment_sum(weights, block_of, num_blocks)[block_of]


def block_sizes(block_of: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Number of weights in each block."""
    return torch.bincount(block_of, minlength=num_blocks)
