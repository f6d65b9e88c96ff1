"""The blocks of REC tensors: items to code, their score coefficients, the joint choice, payloads.

One REC encode codes the blocks of all its tensors against one shared candidate set
(:func:`mlcompress.rec.encoder.select_candidates`). This module turns posteriors into that
problem (:class:`RecItem`, :func:`coefficient_matrix`), solves it for all blocks or a subset
(:func:`choose_indices`; progressive coding codes a group at a time), and turns the indices
into ``rec`` payloads and params (:func:`item_payloads`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mlcompress.codecs.rec import compact_prior
from mlcompress.codecs.rec.layout import BlockLayout
from mlcompress.codecs.rec.limits import MAX_BLOCK_WEIGHTS
from mlcompress.codecs.rec.payload import encode_indices
from mlcompress.distributed import SINGLE, World
from mlcompress.errors import CodecError
from mlcompress.posterior.file import PosteriorTensor
from mlcompress.posterior.meankl import kl_gaussian
from mlcompress.progress import Progress, report
from mlcompress.rec.encoder import score_coefficients, select_candidates, selection_plan

__all__ = ["RecItem", "rec_params", "posterior_item", "coefficient_matrix", "choose_indices", "item_payloads",
           "encode_items", "block_share", "overlapping"]


@dataclass
class RecItem:
    """One tensor to REC-code: its posterior, its prior and its block layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    mean: torch.Tensor  # float32 [numel]
    std: torch.Tensor  # float32 [numel]
    prior_mean: float
    prior_std: float
    layout: BlockLayout  # over the coded variables: the tensor's weights, or its free variables
    kl_blocks: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # nats per block
    free: int | None = None  # hashing trick: the tensor's weights are tied to this many variables

    def block_kl(self) -> torch.Tensor:
        """KL(q || p) of each block in nats (float64), computed from the posterior if not given."""
        if self.kl_blocks.numel() == self.layout.num_blocks:
            return self.kl_blocks
        kl = kl_gaussian(
            self.mean.double(), self.std.double(),
            torch.tensor(self.prior_mean, dtype=torch.float64), torch.tensor(self.prior_std, dtype=torch.float64),
        )
        block_of = torch.repeat_interleave(torch.arange(self.layout.num_blocks), self.layout.block_sizes())
        by_position = kl[self.layout.flat_index()]
        return torch.zeros(self.layout.num_blocks, dtype=torch.float64).index_add_(0, block_of, by_position)


def rec_params(item: RecItem, *, bits: int, seed: int, selection: str, index_coding: str) -> dict[str, Any]:
    """The ``rec`` record params: all the decoder needs (the KL summary goes to the report: in
    the header it would cost more than a small file's indices)."""
    params = {
        "bits": bits,
        "blocks": item.layout.num_blocks,
        "seed": seed,
        "layout_seed": item.layout.seed,
        "prior_mean": float(np.float32(item.prior_mean)),
        "prior_std": float(np.float32(item.prior_std)),
        "selection": selection,
        "index_coding": index_coding,
    }
    if item.free is not None:
        params["free"] = item.free
    return params


def coefficient_matrix(items: list[RecItem], width: int, rows: range | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` float32 ``[total blocks, width]``: score coefficients of every block of every
    item, in item order, slot ``j`` of a block in column ``j``, short blocks padded with zeros.
    ``rows`` (a range of block numbers) builds only those rows: a process of a sharded encode
    holds its share, not the whole model's matrix."""
    total = sum(it.layout.num_blocks for it in items)
    rows = range(total) if rows is None else rows
    a_all = torch.zeros(len(rows), width, dtype=torch.float32)
    b_all = torch.zeros(len(rows), width, dtype=torch.float32)
    row = 0
    for it in items:
        lo, hi = max(rows.start, row), min(rows.stop, row + it.layout.num_blocks)
        if lo < hi:
            a, b = score_coefficients(it.mean, it.std, torch.tensor(it.prior_mean), torch.tensor(it.prior_std))
            slots = it.layout.block_index_matrix()[lo - row : hi - row]
            valid = slots >= 0
            out = slice(lo - rows.start, hi - rows.start)
            a_all[out, : slots.shape[1]][valid] = a[slots[valid]]
            b_all[out, : slots.shape[1]][valid] = b[slots[valid]]
        row += it.layout.num_blocks
    return a_all, b_all


def choose_indices(
    items: list[RecItem],
    *,
    bits: int,
    seed: int,
    selection: str = "is",
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    rows: torch.Tensor | None = None,
    world: World = SINGLE,
) -> torch.Tensor | None:
    """The chosen candidate of every block of ``items`` (numbered consecutively in item order),
    or only of the blocks ``rows`` (int64), all chosen jointly against one candidate set.

    In a sharded run (``world`` of several processes) each process chooses a contiguous share
    of whole block groups (:func:`~mlcompress.rec.encoder.selection_plan`) and process 0
    receives all indices -- the same ones, bit for bit, as one process chooses; the others get
    None. Progress then counts this process's share.
    """
    for it in items:
        if it.layout.max_block_size > MAX_BLOCK_WEIGHTS:
            raise CodecError(
                f"{it.name}: blocks of {it.layout.max_block_size} weights exceed the limit of {MAX_BLOCK_WEIGHTS}",
                hint="raise the bits per weight or lower --bits-per-block",
            )
    width = max(it.layout.max_block_size for it in items)
    shown = lambda done, total: report(progress, "REC blocks", done, total, "blocks")  # noqa: E731
    if world.distributed and rows is None:
        return _sharded_indices(items, width, bits=bits, seed=seed, selection=selection, device=device,
                                progress=shown, world=world)
    a, b = coefficient_matrix(items, width)
    if rows is not None:
        a, b = a[rows], b[rows]
    return select_candidates(a, b, bits=bits, seed=seed, selection=selection, device=device, block_ids=rows,
                             progress=shown)


def block_share(layouts: list[BlockLayout], bits: int, world: World) -> range:
    """The blocks (numbered over all tensors in order) whose indices process ``world.rank``
    chooses: a contiguous run of whole groups of the size one process uses."""
    total = sum(layout.num_blocks for layout in layouts)
    group, _ = selection_plan(total, max(layout.max_block_size for layout in layouts), bits)
    return world.share(total, unit=group)


def overlapping(layouts: list[BlockLayout], blocks: range) -> list[bool]:
    """Which tensors have a block in ``blocks`` (numbered over all tensors in order)."""
    out, start = [], 0
    for layout in layouts:
        out.append(max(start, blocks.start) < min(start + layout.num_blocks, blocks.stop))
        start += layout.num_blocks
    return out


def _sharded_indices(items: list[RecItem], width: int, *, bits: int, seed: int, selection: str,
                     device: torch.device | str, progress: Callable[[float, int], None],
                     world: World) -> torch.Tensor | None:
    """This process's share of whole groups, chosen with one process's group and chunk sizes;
    all indices on process 0 (as int32 on the wire: an index has at most 24 bits)."""
    total = sum(it.layout.num_blocks for it in items)
    group, chunk = selection_plan(total, width, bits)
    share = block_share([it.layout for it in items], bits, world)
    with world.guard():
        local = torch.zeros(0, dtype=torch.int64)
        if len(share):
            a, b = coefficient_matrix(items, width, share)
            local = select_candidates(a, b, bits=bits, seed=seed, selection=selection, device=device,
                                      block_offset=share.start, group_size=group, chunk_size=chunk,
                                      progress=progress)
    indices = world.gather_cat(local.to(torch.int32))
    return None if indices is None else indices.to(torch.int64)


def item_payloads(items: list[RecItem], indices: torch.Tensor, *, bits: int, seed: int, selection: str = "is",
                  index_coding: str = "auto") -> list[tuple[bytes, dict[str, Any]]]:
    """``(payload, params)`` of each item from the chosen indices of all blocks."""
    results = []
    row = 0
    for it in items:
        chosen = indices[row : row + it.layout.num_blocks].numpy()
        row += it.layout.num_blocks
        coding = index_coding
        payload = encode_indices(chosen, bits, "fixed")
        if index_coding in ("auto", "entropy") and selection == "orc":
            coded = encode_indices(chosen, bits, "entropy")
            if index_coding == "entropy" or len(coded) < len(payload):
                payload, coding = coded, "entropy"
            else:
                coding = "fixed"
        elif index_coding == "auto":
            coding = "fixed"
        results.append((payload, rec_params(it, bits=bits, seed=seed, selection=selection, index_coding=coding)))
    return results


def encode_items(
    items: list[RecItem],
    *,
    bits: int,
    seed: int,
    selection: str = "is",
    index_coding: str = "auto",
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> list[tuple[bytes, dict[str, Any]]]:
    """``(payload, params)`` of each item, choosing all blocks of all items jointly (one shot)."""
    indices = choose_indices(items, bits=bits, seed=seed, selection=selection, device=device, progress=progress)
    return item_payloads(items, indices, bits=bits, seed=seed, selection=selection, index_coding=index_coding)


def posterior_item(name: str, pt: PosteriorTensor, layout_seed: int) -> RecItem:
    """The REC item of one posterior tensor (its free variables when it is hashed), coded
    against its prior std as the header will carry it (:func:`compact_prior`)."""
    return RecItem(name, pt.tensor_shape, "float32", pt.mean.reshape(-1), pt.std.reshape(-1), pt.prior_mean,
                   compact_prior(pt.prior_std), BlockLayout(pt.mean.numel(), pt.num_blocks, layout_seed),
                   free=pt.mean.numel() if pt.hashed else None)
