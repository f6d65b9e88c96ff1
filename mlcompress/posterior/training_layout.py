"""The REC block layout seen from training: one block id per coded weight, and each block's budget.

The encoder splits every coded tensor into blocks with :class:`mlcompress.codecs.rec.layout.BlockLayout`
(a keyed bijection from block slots to weights, reproducible from ``numel``, ``num_blocks`` and
``seed``). Training must control the KL of exactly those blocks, so this module evaluates the
same layouts and flattens them into the ``block_of`` vector the variational model reduces over.

Block count per tensor: the encoder's own rule
(:func:`mlcompress.rec.compress.blocks_for_budget`: ``round(numel * bits_per_weight /
bits_per_block)``, at least one), so the file spends about ``bits_per_weight`` bits on each coded
weight; budgets that would put less than one weight, or more than the encoder's cap, in a block
are refused with its messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mlcompress.errors import InputError
from mlcompress.posterior.meankl import NATS_PER_BIT
from mlcompress.codecs.rec.limits import blocks_for_budget, check_bits_per_block
from mlcompress.codecs.rec.layout import BlockLayout


@dataclass
class TrainingLayout:
    """Blocks of all coded tensors, numbered consecutively in tensor order."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    layouts: list[BlockLayout]
    bits_per_block: int
    seed: int
    block_of: torch.Tensor  # int64 [total coded weights]: global block id of each weight
    budget_nats: torch.Tensor  # float64 [num_blocks]

    @property
    def num_blocks(self) -> int:
        return len(self.budget_nats)

    def blocks_per_tensor(self) -> dict[str, int]:
        return {name: layout.num_blocks for name, layout in zip(self.names, self.layouts)}


def training_layout(
    shapes: dict[str, tuple[int, ...]],
    *,
    bits_per_block: int,
    bits_per_weight: float,
    seed: int,
    kl_margin: float = 0.0,
    blocks: dict[str, int] | None = None,
) -> TrainingLayout:
    """The block layout of the coded tensors ``shapes`` (name -> shape of the coded variables,
    in coding order; a hashed tensor's is ``(free,)``).

    Block counts come from ``bits_per_weight`` (the encoder's rule), or are given (``blocks``,
    e.g. from a target file size: :func:`mlcompress.posterior.budget.target_blocks`).

    Every block's KL budget is ``bits_per_block - kl_margin`` bits, coded with ``2^bits_per_block``
    candidates: a margin gives importance sampling ``2^margin`` times more candidates than
    ``exp(KL)``, which makes the coded sample a closer draw from the posterior (docs/posterior.md).
    """
    check_bits_per_block(bits_per_block)
    if not (0 <= kl_margin < bits_per_block):
        raise InputError(
            f"--kl-margin must be at least 0 and below --bits-per-block ({bits_per_block}), got {kl_margin:g}",
            hint="a margin of 1-2 bits is typical",
        )
    if not (bits_per_weight > 0 and math.isfinite(bits_per_weight)):
        raise InputError(f"--bits-per-weight must be a positive number, got {bits_per_weight}")
    layout_seed = seed % (1 << 64)
    names, layouts, pieces = [], [], []
    offset = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        count = blocks[name] if blocks is not None else blocks_for_budget(numel, bits_per_weight, bits_per_block, name)
        layout = BlockLayout(numel=numel, num_blocks=count, seed=layout_seed)
        block_of_slot = torch.repeat_interleave(torch.arange(count), layout.block_sizes())
        block_of = torch.empty(numel, dtype=torch.int64)
        block_of[layout.flat_index()] = block_of_slot + offset
        names.append(name)
        layouts.append(layout)
        pieces.append(block_of)
        offset += count
    budget = torch.full((offset,), (bits_per_block - kl_margin) * NATS_PER_BIT, dtype=torch.float64)
    return TrainingLayout(
        names=names,
        shapes=[tuple(s) for s in shapes.values()],
        layouts=layouts,
        bits_per_block=bits_per_block,
        seed=layout_seed,
        block_of=torch.cat(pieces),
        budget_nats=budget,
    )
