"""REC over a whole model: posteriors in, ``rec`` payloads and a ``.mrc`` file out.

This is the library behind ``mlcompress encode --bits-per-block``. It

1. takes a posterior file (``fit-posterior``'s output) or builds a data-free posterior for a plain
   checkpoint (:mod:`mlcompress.posterior.datafree`), choosing which tensors are worth REC
   (floating point, at least 2-D, at least ``min_rec_numel`` weights; the rest -- biases, norms,
   tiny tensors -- are stored ``lossless`` or ``raw``, whichever is smaller);
2. sets the number of blocks per tensor from the budget (``--bits-per-weight``, ``--kl-budget``
   or ``--target-size``);
3. encodes the blocks of *all* REC tensors jointly (one shared candidate matrix,
   :func:`mlcompress.rec.encoder.select_candidates`), and
4. writes one ``rec`` record per tensor (:mod:`mlcompress.codecs.rec` decodes it) through the
   container's :func:`~mlcompress.container.write_encoded`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mlcompress.assembly import base_metadata, default_output, smallest_lossless
from mlcompress.atomic import check_destination
from mlcompress.checkpoint import load_checkpoint
from mlcompress.codecs.rec.counter import fmix32_int
from mlcompress.codecs.rec.layout import BlockLayout
from mlcompress.codecs.rec.limits import (DEFAULT_BITS_PER_BLOCK, MAX_BLOCK_WEIGHTS, blocks_for_budget,
                                          is_rec_candidate)
from mlcompress.codecs.rec.payload import encode_indices
from mlcompress.container import Alias, EncodedTensor, file_size, open_mrc, shared_storage_aliases, write_encoded
from mlcompress.device import resolve_device
from mlcompress.errors import CodecError, InputError, UsageError
from mlcompress.format.dtypes import dtype_name
from mlcompress.options import Rec
from mlcompress.posterior.datafree import datafree_posterior
from mlcompress.posterior.file import Posterior, is_posterior_file, load_posterior
from mlcompress.posterior.meankl import NATS_PER_BIT, kl_gaussian
from mlcompress.progress import Progress, report
from mlcompress.rec.encoder import score_coefficients, select_candidates
from mlcompress.report import Report

__all__ = ["RecItem", "rec_params", "coefficient_matrix", "encode_items", "encode_rec"]

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
    layout: BlockLayout
    kl_blocks: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # nats per block

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
    """The ``rec`` record params: all the decoder needs, plus a KL summary for ``inspect``."""
    kl_bits = item.block_kl() / NATS_PER_BIT
    return {
        "bits": bits,
        "blocks": item.layout.num_blocks,
        "seed": seed,
        "layout_seed": item.layout.seed,
        "prior_mean": float(np.float32(item.prior_mean)),
        "prior_std": float(np.float32(item.prior_std)),
        "selection": selection,
        "index_coding": index_coding,
        "kl_bits_mean": round(float(kl_bits.mean()), 4),
        "kl_bits_max": round(float(kl_bits.max()), 4),
    }


def coefficient_matrix(items: list[RecItem], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` float32 ``[total blocks, width]``: score coefficients of every block of every
    item, in item order, slot ``j`` of a block in column ``j``, short blocks padded with zeros."""
    total = sum(it.layout.num_blocks for it in items)
    a_all = torch.zeros(total, width, dtype=torch.float32)
    b_all = torch.zeros(total, width, dtype=torch.float32)
    row = 0
    for it in items:
        a, b = score_coefficients(it.mean, it.std, torch.tensor(it.prior_mean), torch.tensor(it.prior_std))
        slots = it.layout.block_index_matrix()
        valid = slots >= 0
        rows = slice(row, row + it.layout.num_blocks)
        a_all[rows, : slots.shape[1]][valid] = a[slots[valid]]
        b_all[rows, : slots.shape[1]][valid] = b[slots[valid]]
        row += it.layout.num_blocks
    return a_all, b_all


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
    """``(payload, params)`` of each item, choosing all blocks of all items jointly."""
    for it in items:
        if it.layout.max_block_size > MAX_BLOCK_WEIGHTS:
            raise CodecError(
                f"{it.name}: blocks of {it.layout.max_block_size} weights exceed the limit of {MAX_BLOCK_WEIGHTS}",
                hint="raise the bits per weight or lower --bits-per-block",
            )
    width = max(it.layout.max_block_size for it in items)
    a, b = coefficient_matrix(items, width)
    indices = select_candidates(a, b, bits=bits, seed=seed, selection=selection, device=device,
                                progress=lambda done, total: report(progress, "REC blocks", done, total, "blocks"))
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


def _layout_seed(options: Rec) -> int:
    if options.layout_seed is not None:
        return options.layout_seed
    return (fmix32_int(options.seed & 0xFFFFFFFF) << 32 | fmix32_int((options.seed >> 32) ^ 0x6C617930)) % (1 << 64)


def _overhead(others: list[EncodedTensor], rec_shapes: list[tuple[str, tuple[int, ...], str]], metadata: dict) -> int:
    """File bytes of everything but the REC payloads, from the writer's own layout: empty REC
    payloads with the widest params any run can produce, plus each payload's worst-case
    alignment padding."""
    widest = {"bits": 24, "blocks": 2**31, "seed": 2**64 - 1, "layout_seed": 2**64 - 1,
              "prior_mean": -1.2345678901234567e-10, "prior_std": 1.2345678901234567e-10, "selection": "greedy",
              "index_coding": "entropy", "kl_bits_mean": 123456.1234, "kl_bits_max": 123456.1234}
    entries = list(others) + [EncodedTensor(n, s, d, "rec", widest, b"") for n, s, d in rec_shapes]
    return file_size(entries, metadata) + 8 * len(rec_shapes)


def encode_rec(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    options: Rec | None = None,
    force: bool = False,
    unsafe_pickle: bool = False,
    progress: Progress | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    posterior: Posterior | None = None,
) -> Report:
    """Encode ``src`` (a checkpoint, or a posterior file) with REC into ``dst`` (default beside it).

    Nothing is written unless every tensor encodes. ``tensors`` (a state dict) or ``posterior``
    (a loaded posterior file) skip reading ``src``, which then only names the source.
    ``options`` is never modified.
    """
    start = time.perf_counter()
    options = options or Rec()
    options.validate()
    device = resolve_device(options.device)
    dst = Path(dst) if dst is not None else default_output(src)
    check_destination(dst, force=force)

    if posterior is None and tensors is None and Path(src).is_file() and is_posterior_file(src):
        posterior = load_posterior(src)
    if posterior is not None:
        if options.budget_given:
            raise UsageError("a posterior file fixes its own block counts; drop --bits-per-weight/--kl-budget/--target-size")
        if options.bits_per_block not in (None, posterior.bits_per_block):
            raise UsageError(
                f"the posterior was fitted for {posterior.bits_per_block} bits per block, not {options.bits_per_block}",
                hint=f"pass --bits-per-block {posterior.bits_per_block}",
            )
        bits = posterior.bits_per_block
    else:
        bits = options.bits_per_block if options.bits_per_block is not None else DEFAULT_BITS_PER_BLOCK
        if tensors is None:
            tensors = load_checkpoint(src, unsafe_pickle=unsafe_pickle)

    metadata = base_metadata(src, {"method": "rec", "bits_per_block": bits, "selection": options.selection,
                                   "seed": options.seed})
    aliases: dict[str, str] = {}
    if posterior is not None:
        order = list(posterior.tensors) + list(posterior.fixed)
        plain = dict(posterior.fixed)
        rec_names = list(posterior.tensors)
    else:
        assert tensors is not None
        aliases = shared_storage_aliases(tensors)
        order = list(tensors)
        rec_names = [n for n, t in tensors.items() if n not in aliases and is_rec_candidate(t, options.min_rec_numel)]
        plain = {n: t for n, t in tensors.items() if n not in aliases and n not in rec_names}
        for n in rec_names:
            if not torch.isfinite(tensors[n]).all():
                raise InputError(f"{n} has NaN or Inf values; REC cannot code them", hint="clean the checkpoint or use --lossless")
    if not rec_names:
        raise InputError(
            "no tensor is worth REC here (need floating point, >= 2 dimensions, >= --min-rec-numel weights)",
            hint="lower --min-rec-numel or use --lossless",
        )
    others = {n: smallest_lossless(n, t) for n, t in plain.items()}

    if posterior is not None:
        items = [RecItem(n, tuple(pt.mean.shape), "float32", pt.mean.reshape(-1), pt.std.reshape(-1), pt.prior_mean,
                         pt.prior_std, BlockLayout(pt.mean.numel(), pt.num_blocks, posterior.layout_seed))
                 for n, pt in posterior.tensors.items()]
    else:
        items = _datafree_items(tensors, rec_names, bits, options, list(others.values()), metadata)

    coded = encode_items(items, bits=bits, seed=options.seed, selection=options.selection,
                         index_coding=options.index_coding, device=device, progress=progress)
    rec_entries = {it.name: EncodedTensor(it.name, it.shape, it.dtype, "rec", params, payload)
                   for it, (payload, params) in zip(items, coded)}
    entries = [Alias(n, aliases[n]) if n in aliases else rec_entries.get(n) or others[n] for n in order]
    write_encoded(dst, entries, metadata, force=force)
    blocks = sum(it.layout.num_blocks for it in items)
    kl = torch.cat([it.block_kl() for it in items]) / NATS_PER_BIT
    details = {
        "source": "posterior" if posterior is not None else "data-free",
        "rec_tensors": len(items),
        "rec_weights": sum(it.layout.numel for it in items),
        "blocks": blocks,
        "bits_per_block": bits,
        "selection": options.selection,
        "kl_bits_per_block_mean": float(kl.mean()),
        "kl_bits_per_block_max": float(kl.max()),
        "index_bits_fixed": blocks * bits,
        "index_bits_stored": 8 * sum(len(p) for p, _ in coded),
        "device": str(device),
    }
    return Report.of(open_mrc(dst), "rec", time.perf_counter() - start, details)


def _datafree_items(tensors: Mapping[str, torch.Tensor], rec_names: list[str], bits: int, options: Rec,
                    others: list[EncodedTensor], metadata: dict) -> list[RecItem]:
    """Data-free posteriors around the weights, with block counts from the run's budget."""
    numels = {n: tensors[n].numel() for n in rec_names}
    total = sum(numels.values())
    if options.target_size is not None:
        shapes = [(n, tuple(tensors[n].shape), dtype_name(tensors[n].dtype)) for n in rec_names]
        overhead = _overhead(others, shapes, metadata)
        room_bits = (options.target_size - overhead) * 8
        if room_bits < bits * len(rec_names):
            raise InputError(
                f"--target-size {options.target_size} bytes cannot be met: the header and non-REC tensors alone take {overhead} bytes",
                hint="raise --target-size",
            )
        bpw, floor = room_bits / total, True
    elif options.kl_budget_bits is not None:
        bpw, floor = options.kl_budget_bits / total, False
    else:
        bpw, floor = options.budget_bits_per_weight, False
    seed = _layout_seed(options)
    items = []
    for n in rec_names:
        layout = BlockLayout(numels[n], blocks_for_budget(numels[n], bpw, bits, n, floor=floor), seed)
        mean, std, rho, kl = datafree_posterior(tensors[n], layout, bits)
        items.append(RecItem(n, tuple(tensors[n].shape), dtype_name(tensors[n].dtype), mean.reshape(-1),
                             std.reshape(-1), 0.0, rho, layout, kl))
    return items
