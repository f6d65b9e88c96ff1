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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from mlcompress.assembly import base_metadata, default_output, smallest_lossless
from mlcompress.atomic import check_destination
from mlcompress.checkpoint.source import TensorSource, open_source, source_of
from mlcompress.codecs.rec import compact_prior
from mlcompress.codecs.rec.counter import fmix32_int
from mlcompress.codecs.rec.layout import BlockLayout
from mlcompress.codecs.rec.limits import (DEFAULT_BITS_PER_BLOCK, blocks_for_budget,
                                          is_rec_candidate)
from mlcompress.container import Alias, EncodedTensor, file_size, open_mrc, write_encoded
from mlcompress.device import resolve_device
from mlcompress.distributed import SINGLE, World, join
from mlcompress.errors import InputError, UsageError
from mlcompress.format.dtypes import dtype_name
from mlcompress.options import Rec
from mlcompress.posterior.datafree import datafree_posterior, default_prior_std
from mlcompress.posterior.file import Posterior, is_posterior_file, load_posterior
from mlcompress.posterior.meankl import NATS_PER_BIT
from mlcompress.progress import Progress, report
from mlcompress.rec.blocks import RecItem, block_share, choose_indices, item_payloads, overlapping, posterior_item
from mlcompress.rec.progressive import progressive_indices
from mlcompress.tasks import get_task
from mlcompress.report import Report

__all__ = ["encode_rec"]

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
              "index_coding": "entropy"}
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

    Under torchrun every process reads the source and chooses the indices of its share of the
    blocks; process 0 receives them all and writes the file, byte for byte the one a single
    process writes (docs/scale.md); every process returns its report.
    """
    start = time.perf_counter()
    options = options or Rec()
    options.validate()
    world = join(options.device)
    with world.guard():  # reading and checking the source may fail on one process only
        device = resolve_device(options.device)
        job = _prepare(src, dst, options, force=force, unsafe_pickle=unsafe_pickle, tensors=tensors,
                       posterior=posterior, world=world, progress=progress)
    progressive: dict[str, Any] = {}
    state_path = job.dst.with_name(job.dst.name + ".progress")
    if options.progressive:
        assert job.posterior is not None
        indices, progressive = progressive_indices(job.items, job.posterior, get_task(options.task, options.data),
                                                   options, bits=job.bits, device=device, state_path=state_path,
                                                   progress=progress)
    else:
        indices = choose_indices(job.items, bits=job.bits, seed=options.seed, selection=options.selection,
                                 device=device, progress=progress, world=world)
        _complete_block_kl(job.items, job.bits, world)
    report: Report | None = None
    with world.guard():  # process 0 writes; the others wait to hear that it did
        if world.is_main:
            assert indices is not None
            report = _write(job, indices, options, force=force, device=device, start=start,
                            progressive=progressive)
            if progressive:
                state_path.unlink(missing_ok=True)
    return world.broadcast(report)


@dataclass
class _Job:
    """A REC encode ready for choosing indices: the items to code and everything around them."""

    dst: Path
    bits: int
    items: list[RecItem]
    entries_order: list[str]
    aliases: dict[str, str]
    others: dict[str, EncodedTensor]
    metadata: dict
    posterior: Posterior | None


def _prepare(src: str | os.PathLike, dst: str | os.PathLike | None, options: Rec, *, force: bool,
             unsafe_pickle: bool, tensors: Mapping[str, torch.Tensor] | None, posterior: Posterior | None,
             world: World, progress: Progress | None = None) -> _Job:
    """Read the source, choose the REC tensors and their block counts: everything before the
    indices. Only process 0 checks the destination (it alone writes; other machines may not
    even have its directory)."""
    dst = Path(dst) if dst is not None else default_output(src)
    if world.is_main:
        check_destination(dst, force=force)
    if posterior is None and tensors is None and Path(src).is_file() and is_posterior_file(src):
        posterior = load_posterior(src)
    if options.progressive and world.distributed:
        raise UsageError("progressive REC (--task) retrains between groups and runs in one process",
                         hint="launch it without torchrun")
    if options.progressive and posterior is None:
        raise UsageError("progressive coding (--task) needs a posterior file (fit-posterior's output)",
                         hint="fit one with mlcompress fit-posterior, or drop --task")
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
        source = open_source(src, unsafe_pickle=unsafe_pickle) if tensors is None else source_of(tensors, src)
    if posterior is not None and options.select.narrows:
        raise UsageError("a posterior file fixes the tensors REC codes; --include/--exclude belong to fit-posterior",
                         hint="refit with fit-posterior --include/--exclude, or encode the checkpoint data-free")

    # The bits, seeds and selection are in the records; a REC header keeps only the method (and a model directory's config).
    metadata = base_metadata(src, {"method": "rec"}, record_source=False)
    aliases: dict[str, str] = {}
    if posterior is not None:
        order = list(posterior.tensors) + list(posterior.fixed)
        plain = dict(posterior.fixed)
        rec_names = list(posterior.tensors)
    else:
        aliases, order = source.aliases, source.names
        chosen = options.select.resolve(order, aliases)
        rec_names = [n for n in source.stored if is_rec_candidate(source.info(n), options.min_rec_numel) and chosen(n)]
    if not rec_names:
        raise InputError(
            "no tensor is worth REC here (need floating point, >= 2 dimensions, >= --min-rec-numel weights"
            + (", among those --include/--exclude select)" if options.select.narrows else ")"),
            hint="lower --min-rec-numel or use --lossless",
        )
    if posterior is not None:
        others = {n: smallest_lossless(n, t) for n, t in plain.items()}
        items = [posterior_item(n, pt, posterior.layout_seed) for n, pt in posterior.tensors.items()]
    else:
        # One tensor read at a time: the others are coded at once; a REC tensor is read once
        # for its posterior (mean and std are what REC holds for all of them, docs/scale.md).
        others = {n: smallest_lossless(n, source.get(n)) for n in source.stored if n not in rec_names}
        items = _datafree_items(source, rec_names, bits, options, list(others.values()), metadata, world, progress)
    return _Job(dst, bits, items, order, aliases, others, metadata, posterior)


def _write(job: _Job, indices: torch.Tensor, options: Rec, *, force: bool, device: torch.device, start: float,
           progressive: dict[str, Any]) -> Report:
    """The ``rec`` records from the chosen indices, the file, and its report."""
    items, bits = job.items, job.bits
    coded = item_payloads(items, indices, bits=bits, seed=options.seed, selection=options.selection,
                          index_coding=options.index_coding)
    rec_entries = {it.name: EncodedTensor(it.name, it.shape, it.dtype, "rec", params, payload)
                   for it, (payload, params) in zip(items, coded)}
    entries = [Alias(n, job.aliases[n]) if n in job.aliases else rec_entries.get(n) or job.others[n]
               for n in job.entries_order]
    write_encoded(job.dst, entries, job.metadata, force=force)
    blocks = sum(it.layout.num_blocks for it in items)
    kl = torch.cat([it.block_kl() for it in items]) / NATS_PER_BIT
    details = {
        "source": "posterior" if job.posterior is not None else "data-free",
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
        **progressive,
    }
    return Report.of(open_mrc(job.dst), "rec", time.perf_counter() - start, details)


def _datafree_items(source: TensorSource, rec_names: list[str], bits: int, options: Rec,
                    others: list[EncodedTensor], metadata: dict, world: World = SINGLE,
                    progress: Progress | None = None) -> list[RecItem]:
    """Data-free posteriors around the weights, with block counts from the run's budget; each
    REC tensor is read from ``source`` once, for its posterior, and checked to be finite."""
    infos = {n: source.info(n) for n in rec_names}
    numels = {n: infos[n].numel for n in rec_names}
    total = sum(numels.values())
    if options.target_size is not None:
        shapes = [(n, infos[n].shape, dtype_name(infos[n].dtype)) for n in rec_names]
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
    layouts = [BlockLayout(numels[n], blocks_for_budget(numels[n], bpw, bits, n, floor=floor), seed)
               for n in rec_names]
    # Sharded: a process builds the posteriors of the tensors its blocks fall in (whole tensors,
    # so every value has the bits one process gives it); the others get only their prior.
    wanted = overlapping(layouts, block_share(layouts, bits, world))
    items = []
    done = 0
    for n, layout, own in zip(rec_names, layouts, wanted):
        report(progress, "REC setup", done / 1e6, total / 1e6, "M weights")  # posteriors: minutes on a large model
        tensor = source.get(n)
        if not torch.isfinite(tensor).all():
            raise InputError(f"{n} has NaN or Inf values; REC cannot code them", hint="clean the checkpoint or use --lossless")
        if own:
            mean, std, rho, kl = datafree_posterior(tensor, layout, bits)
        else:
            mean = std = kl = torch.zeros(0)
            rho = default_prior_std(tensor)
        del tensor
        done += numels[n]
        items.append(RecItem(n, infos[n].shape, dtype_name(infos[n].dtype), mean.reshape(-1),
                             std.reshape(-1), 0.0, compact_prior(rho), layout, kl))
    report(progress, "REC setup", done / 1e6, total / 1e6, "M weights")
    return items


def _complete_block_kl(items: list[RecItem], bits: int, world: World) -> None:
    """Process 0 of a sharded data-free encode lacks the posteriors of the tensors outside its
    share: the processes that built them send their block KL (for the report)."""
    if not world.distributed:
        return
    layouts = [it.layout for it in items]
    lacking = [not own for own in overlapping(layouts, block_share(layouts, bits, World(0, world.size)))]
    mine = {i: it.kl_blocks for i, it in enumerate(items) if lacking[i] and it.kl_blocks.numel()}
    for part in world.gather(mine) or []:
        for i, kl in part.items():
            items[i].kl_blocks = kl
