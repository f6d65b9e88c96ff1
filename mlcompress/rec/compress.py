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

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from mlcompress.errors import CodecError, InputError, UsageError
from mlcompress.posterior.file import MAX_BITS_PER_BLOCK, MIN_BITS_PER_BLOCK, Posterior
from mlcompress.posterior.meankl import NATS_PER_BIT, kl_gaussian
from mlcompress.rec.encoder import SELECTIONS, score_coefficients, select_candidates
from mlcompress.rec.layout import BlockLayout
from mlcompress.rec.payload import encode_indices

__all__ = [
    "RecOptions",
    "RecItem",
    "MAX_BLOCK_WEIGHTS",
    "DEFAULT_BITS_PER_BLOCK",
    "DEFAULT_BITS_PER_WEIGHT",
    "DEFAULT_MIN_REC_NUMEL",
    "rec_params",
    "coefficient_matrix",
    "encode_items",
    "blocks_for_budget",
    "encode_rec",
    "parse_size",
]

#: Cap on weights per block: bounds the encoder's work per candidate and the decoder's per block.
MAX_BLOCK_WEIGHTS = 1 << 16
DEFAULT_BITS_PER_BLOCK = 16
DEFAULT_BITS_PER_WEIGHT = 2.0
DEFAULT_MIN_REC_NUMEL = 1024
INDEX_CODINGS = ("auto", "fixed", "entropy")

Progress = Callable[[float, int], None]


@dataclass
class RecOptions:
    """Everything ``encode --bits-per-block`` decides. Budgets: give at most one of
    ``bits_per_weight``, ``kl_budget_bits`` (total over REC tensors) and ``target_size`` (bytes of
    the whole file); with none, ``DEFAULT_BITS_PER_WEIGHT`` applies. Ignored for posterior files,
    whose block counts are fixed by the fit."""

    bits_per_block: int | None = None  # None: the posterior file's, else DEFAULT_BITS_PER_BLOCK
    bits_per_weight: float | None = None
    kl_budget_bits: float | None = None
    target_size: int | None = None
    selection: str = "is"
    seed: int = 0
    layout_seed: int | None = None  # default: derived from seed
    index_coding: str = "auto"  # auto: entropy-coded for orc when smaller, else fixed
    min_rec_numel: int = DEFAULT_MIN_REC_NUMEL
    device: str = "auto"

    def validate(self) -> None:
        if self.bits_per_block is not None and not (isinstance(self.bits_per_block, int) and MIN_BITS_PER_BLOCK <= self.bits_per_block <= MAX_BITS_PER_BLOCK):
            raise UsageError(
                f"--bits-per-block must be an integer in [{MIN_BITS_PER_BLOCK}, {MAX_BITS_PER_BLOCK}], got {self.bits_per_block}",
                hint="each block scores 2^bits candidates; MIRACLE uses 20",
            )
        given = [x for x in (self.bits_per_weight, self.kl_budget_bits, self.target_size) if x is not None]
        if len(given) > 1:
            raise UsageError("give at most one of --bits-per-weight, --kl-budget and --target-size")
        for value, flag in ((self.bits_per_weight, "--bits-per-weight"), (self.kl_budget_bits, "--kl-budget"), (self.target_size, "--target-size")):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UsageError(f"{flag} must be a positive number, got {value}")
        if self.selection not in SELECTIONS:
            raise UsageError(f"--selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.index_coding not in INDEX_CODINGS:
            raise UsageError(f"index coding must be one of {', '.join(INDEX_CODINGS)}")
        if self.index_coding == "entropy" and self.selection != "orc":
            raise UsageError("entropy-coded indices only pay off with --selection orc")
        if not 0 <= self.seed < 1 << 64:
            raise UsageError(f"--seed must be in [0, 2^64), got {self.seed}")
        if self.min_rec_numel < 1:
            raise UsageError(f"--min-rec-numel must be >= 1, got {self.min_rec_numel}")


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
    indices = select_candidates(a, b, bits=bits, seed=seed, selection=selection, device=device, progress=progress)
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


def blocks_for_budget(numel: int, bits_per_weight: float, bits_per_block: int, name: str, *, floor: bool = False) -> int:
    """Blocks of a tensor at ``bits_per_weight``: ``round(numel * bpw / C)`` (``floor`` for a
    size cap), at least 1; refuses budgets that would put less than one weight in a block."""
    if bits_per_weight > bits_per_block:
        raise InputError(
            f"{bits_per_weight:g} bits per weight exceeds --bits-per-block {bits_per_block}: a block would hold less than one weight",
            hint="lower the budget or raise --bits-per-block",
        )
    exact = numel * bits_per_weight / bits_per_block
    count = max(1, math.floor(exact) if floor else round(exact))
    if -(-numel // count) > MAX_BLOCK_WEIGHTS:
        raise InputError(
            f"{name}: {bits_per_weight:.4g} bits per weight puts {-(-numel // count)} weights in a block, above the limit of {MAX_BLOCK_WEIGHTS}",
            hint="raise the budget or lower --bits-per-block",
        )
    return min(count, numel)


def is_rec_candidate(tensor: torch.Tensor, min_numel: int) -> bool:
    """Worth REC: a floating-point tensor of at least 2 dimensions and ``min_numel`` weights."""
    return tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel() >= min_numel


def _layout_seed(options: RecOptions) -> int:
    if options.layout_seed is not None:
        return options.layout_seed
    from mlcompress.rec.counter import fmix32_int

    return (fmix32_int(options.seed & 0xFFFFFFFF) << 32 | fmix32_int((options.seed >> 32) ^ 0x6C617930)) % (1 << 64)


def _dtype_name(tensor: torch.Tensor) -> str:
    from mlcompress.container import dtype_name

    return dtype_name(tensor.dtype)


def _estimate_overhead(others: list, rec_shapes: list[tuple[str, tuple[int, ...], str]], metadata: dict) -> int:
    """File bytes of everything but the REC payloads: write the container with empty REC
    payloads to a scratch file and measure it (plus a margin for digits and alignment)."""
    from mlcompress.container import EncodedTensor, write_encoded

    dummy = {"bits": 24, "blocks": 2**31, "seed": 2**64 - 1, "layout_seed": 2**64 - 1, "prior_mean": -1.2345678901234567e-10,
             "prior_std": 1.2345678901234567e-10, "selection": "greedy", "index_coding": "entropy",
             "kl_bits_mean": 123456.1234, "kl_bits_max": 123456.1234}
    entries = list(others) + [EncodedTensor(n, s, d, "rec", dummy, b"") for n, s, d in rec_shapes]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_encoded(Path(tmp) / "probe.mrc", entries, metadata)
        size = path.stat().st_size
    return size + 64 * len(rec_shapes)  # each REC payload may add up to 63 bytes of alignment


def encode_rec(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    options: RecOptions | None = None,
    force: bool = False,
    unsafe_pickle: bool = False,
    progress: Progress | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Encode ``src`` (a checkpoint, or a posterior file) with REC into ``dst`` (default beside it).

    Returns a summary (output, sizes, blocks, KL, index bits, seconds). Nothing is written unless
    every tensor encodes. ``tensors`` skips loading a checkpoint.
    """
    from mlcompress.atomic import check_destination
    from mlcompress.container import Alias, shared_storage_aliases, write_encoded
    from mlcompress.device import resolve_device
    from mlcompress.encode import base_metadata, default_output, smallest_lossless
    from mlcompress.posterior.file import is_posterior_file, load_posterior

    start = time.perf_counter()
    options = options or RecOptions()
    options.validate()
    device = resolve_device(options.device)
    dst = Path(dst) if dst is not None else default_output(src)
    check_destination(dst, force=force)

    posterior: Posterior | None = None
    if tensors is None and Path(src).is_file() and is_posterior_file(src):
        posterior = load_posterior(src)
        if any(x is not None for x in (options.bits_per_weight, options.kl_budget_bits, options.target_size)):
            raise UsageError("a posterior file fixes its own block counts; drop --bits-per-weight/--kl-budget/--target-size")
        if options.bits_per_block is None:
            options.bits_per_block = posterior.bits_per_block
        if options.bits_per_block != posterior.bits_per_block:
            raise UsageError(
                f"the posterior was fitted for {posterior.bits_per_block} bits per block, not {options.bits_per_block}",
                hint=f"pass --bits-per-block {posterior.bits_per_block}",
            )
    if options.bits_per_block is None:
        options.bits_per_block = DEFAULT_BITS_PER_BLOCK
    if posterior is None and tensors is None:
        from mlcompress.checkpoint import load_checkpoint

        tensors = load_checkpoint(src, unsafe_pickle=unsafe_pickle)

    metadata = base_metadata(src, {"method": "rec", "bits_per_block": options.bits_per_block,
                                   "selection": options.selection, "seed": options.seed})
    bits = options.bits_per_block
    order: list[str]
    plain: dict[str, torch.Tensor]
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

    items: list[RecItem] = []
    if posterior is not None:
        for n, pt in posterior.tensors.items():
            layout = BlockLayout(pt.mean.numel(), pt.num_blocks, posterior.layout_seed)
            items.append(RecItem(n, tuple(pt.mean.shape), "float32", pt.mean.reshape(-1), pt.std.reshape(-1),
                                 pt.prior_mean, pt.prior_std, layout))
    else:
        from mlcompress.posterior.datafree import datafree_posterior

        numels = {n: tensors[n].numel() for n in rec_names}
        total = sum(numels.values())
        if options.target_size is not None:
            shapes = [(n, tuple(tensors[n].shape), _dtype_name(tensors[n])) for n in rec_names]
            overhead = _estimate_overhead(list(others.values()), shapes, metadata)
            room_bits = (options.target_size - overhead) * 8 - 8 * len(rec_names)
            if room_bits < bits * len(rec_names):
                raise InputError(
                    f"--target-size {options.target_size} bytes cannot be met: the header and non-REC tensors alone take {overhead} bytes",
                    hint="raise --target-size",
                )
            bpw, floor = room_bits / total, True
        elif options.kl_budget_bits is not None:
            bpw, floor = options.kl_budget_bits / total, False
        else:
            bpw, floor = options.bits_per_weight or DEFAULT_BITS_PER_WEIGHT, False
        seed = _layout_seed(options)
        for n in rec_names:
            count = blocks_for_budget(numels[n], bpw, bits, n, floor=floor)
            layout = BlockLayout(numels[n], count, seed)
            mean, std, rho, kl = datafree_posterior(tensors[n], layout, bits)
            items.append(RecItem(n, tuple(tensors[n].shape), _dtype_name(tensors[n]), mean.reshape(-1),
                                 std.reshape(-1), 0.0, rho, layout, kl))

    coded = encode_items(items, bits=bits, seed=options.seed, selection=options.selection,
                         index_coding=options.index_coding, device=device, progress=progress)
    from mlcompress.container import EncodedTensor

    rec_entries = {it.name: EncodedTensor(it.name, it.shape, it.dtype, "rec", params, payload)
                   for it, (payload, params) in zip(items, coded)}
    entries = []
    for n in order:
        if n in aliases:
            entries.append(Alias(n, aliases[n]))
        else:
            entries.append(rec_entries.get(n) or others[n])
    write_encoded(dst, entries, metadata, force=force)
    file_bytes = dst.stat().st_size
    blocks = sum(it.layout.num_blocks for it in items)
    fixed_bits = blocks * bits
    index_bytes = sum(len(p) for p, _ in coded)
    kl = torch.cat([it.block_kl() for it in items]) / NATS_PER_BIT
    original = sum(int(np.prod(e.shape)) * torch.empty(0, dtype=_torch_dtype(e.dtype)).element_size()
                   for e in entries if not isinstance(e, Alias))
    return {
        "output": str(dst),
        "method": "rec",
        "source": "posterior" if posterior is not None else "data-free",
        "tensors": len(entries),
        "rec_tensors": len(items),
        "rec_weights": sum(it.layout.numel for it in items),
        "blocks": blocks,
        "bits_per_block": bits,
        "selection": options.selection,
        "kl_bits_per_block_mean": float(kl.mean()),
        "kl_bits_per_block_max": float(kl.max()),
        "index_bits_fixed": fixed_bits,
        "index_bits_stored": 8 * index_bytes,
        "original_bytes": original,
        "file_bytes": file_bytes,
        "ratio": original / file_bytes if file_bytes else 0.0,
        "device": str(device),
        "seconds": time.perf_counter() - start,
    }


def parse_size(text: str) -> int:
    """Bytes from ``1520``, ``1.52kB``, ``3MB`` (decimal units, as ``inspect`` prints them)."""
    units = {"": 1, "b": 1, "kb": 1000, "k": 1000, "mb": 1000**2, "m": 1000**2, "gb": 1000**3, "g": 1000**3}
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("kmgb")
    try:
        value = float(number) * units[t[len(number):]]
    except (ValueError, KeyError):
        raise UsageError(f"cannot read size {text!r}", hint="use bytes or a unit: 1520, 1.52kB, 3MB") from None
    if not (math.isfinite(value) and value >= 1):
        raise UsageError(f"size must be at least 1 byte, got {text!r}")
    return int(value)


def _torch_dtype(name: str) -> torch.dtype:
    from mlcompress.container import torch_dtype

    return torch_dtype(name)
