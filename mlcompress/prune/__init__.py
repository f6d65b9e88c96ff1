"""Pruning: remove a chosen fraction of the conv/linear weights, optionally fine-tune, and store it.

Inputs: a checkpoint (anything :func:`mlcompress.checkpoint.load_checkpoint` reads, ``.mrc``
included) or a posterior file (``fit-posterior``'s output). docs/pruning.md has the criteria.

Criteria (the lowest-ranked go first):

* ``random`` -- a seeded uniform choice, the baseline that tells whether ranking matters;
* ``magnitude`` -- |w| for a checkpoint, |mean - prior mean| for a posterior;
* ``kl`` -- each coded variable's KL(posterior || prior): the information (and the file bits) it
  carries. Only a posterior has one, so a checkpoint is refused.

A pruned checkpoint weight becomes exactly zero. A pruned posterior variable becomes its prior: a
posterior-file output replaces its N(mean, std^2) by N(prior mean, prior std^2) (zero KL, no
information left); a dense output sets its weights to the prior mean (a Dirac delta there). For
a hashed tensor the ranked units are the free variables, so pruning one prunes all its tied
weights.

Scope: ``global`` ranks all prunable units together (layers with many unimportant weights lose
more, usually the better trade), ``layer`` prunes every tensor by the same fraction. Exactly
``round(sparsity * n)`` units go; ties are broken by position so the result is deterministic.

Which tensors: the same rule as quantization (:func:`mlcompress.quant.plan.is_quantizable`):
conv/linear weights; biases and small tensors are left alone. In a posterior only coded tensors
are candidates (fixed ones are stored as they are). ``--include``/``--exclude``
(:class:`mlcompress.selection.Selection`) narrow that by name; a tensor left out is neither
ranked nor changed. Tied tensors are one tensor: ranked, pruned and stored once.

Storage: pruned weights must cost almost nothing, so the ``.mrc`` output entropy-codes the pruned
tensors -- bit-exactly with ``lossless`` (its planes are mostly one repeated symbol), or quantized
with ``quant`` when ``bits`` is given (0 is always an exact level there). Safetensors/.pt outputs
are plain dense checkpoints, except that a posterior pruned into ``.safetensors`` stays a
posterior file.

Memory: without a task, a checkpoint pruned into ``.mrc`` or ``.safetensors`` streams
(:func:`_prune_checkpoint_streaming`): one tensor at a time, the global cut found by a radix
select over the scores' bits in a few read-only passes, so nothing holds the model or its
scores. The files are those of the whole-model path (:func:`_prune_checkpoint_file`), byte for
byte; docs/pruning.md gives the bound.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from mlcompress.assembly import base_metadata, default_output
from mlcompress.atomic import atomic_output, check_destination
from mlcompress.checkpoint import WEIGHTS_METADATA, checkpoint_format, load_checkpoint, save_checkpoint
from mlcompress.checkpoint.hf import find_weights
from mlcompress.checkpoint.safetensors_file import header_metadata
from mlcompress.checkpoint.safetensors_stream import TensorEntry, stream_safetensors
from mlcompress.checkpoint.source import TensorInfo, TensorSource, open_source
from mlcompress.container import open_mrc, shared_storage_aliases, write_stream
from mlcompress.device import resolve_device
from mlcompress.errors import InputError, UsageError
from mlcompress.options import Prune
from mlcompress.posterior.file import Posterior, PosteriorTensor, is_posterior_file, load_posterior, save_posterior
from mlcompress.posterior.meankl import NATS_PER_BIT, kl_gaussian
from mlcompress.progress import Progress, report
from mlcompress.prune.ranking import NEEDS_POSTERIOR, CutMask, find_cut, pruned, random_scores, refuse_kl, Scorer, select_lowest, zero_count
from mlcompress.quant.plan import Plan, is_quantizable, measure_file, plan_encoder, uniform_plan, write_plan
from mlcompress.quant.quantize import dequantize_uniform
from mlcompress.report import Report
from mlcompress.selection import Selection
from mlcompress.tasks import check_state_dict_fits, evaluate_model, get_task, load_task_model

CRITERIA = Prune.CRITERIA
SCOPES = Prune.SCOPES
#: Output suffix that keeps a pruned posterior a posterior file (any other writes dense weights).
POSTERIOR_SUFFIX = ".safetensors"



def _check_choice(sparsity: float, criterion: str, scope: str) -> None:
    """The library entry points check what the CLI checks, with the same messages."""
    Prune(sparsity=sparsity, criterion=criterion, scope=scope).validate()


# --- checkpoints --------------------------------------------------------------------------------


def _checkpoint_scores(tensors: Mapping[str, torch.Tensor], criterion: str, seed: int) -> dict[str, torch.Tensor]:
    refuse_kl(criterion)
    if criterion == "magnitude":
        return {n: t.detach().abs().reshape(-1).to(torch.float64) for n, t in tensors.items()}
    return random_scores({n: t.numel() for n, t in tensors.items()}, torch.Generator().manual_seed(seed))


def prunable_tensors(tensors: Mapping[str, Any], aliases: Mapping[str, str], select: Selection) -> list[str]:
    """The names pruning ranks, in order: conv/linear weights (``is_quantizable``, judged from
    dtype and shape, so header entries answer too) that ``select`` keeps, each tie once (by its
    stored name; its aliases follow it). A glob matching no name is an error."""
    chosen = select.resolve(tensors, aliases)
    names = [n for n, t in tensors.items() if n not in aliases and is_quantizable(t) and chosen(n)]
    if not names:
        narrowed = " among the tensors --include/--exclude select" if select.narrows else ""
        raise InputError(f"the checkpoint has no conv/linear weights to prune (need >= 2-D float tensors){narrowed}")
    return names


def prune_masks(
    tensors: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    criterion: str = "magnitude",
    scope: str = "global",
    seed: int = 0,
    select: Selection = Selection(),
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = pruned) for every prunable tensor of a checkpoint's ``tensors``
    that ``select`` (``--include``/``--exclude``) keeps. Tied tensors are ranked once; every
    name of a tie gets the same mask."""
    _check_choice(sparsity, criterion, scope)
    aliases = shared_storage_aliases(tensors)
    prunable = {n: tensors[n] for n in prunable_tensors(tensors, aliases, select)}
    flat = select_lowest(_checkpoint_scores(prunable, criterion, seed), sparsity, scope)
    masks = {n: flat[n].reshape(prunable[n].shape) for n in prunable}
    masks.update({a: masks[c] for a, c in aliases.items() if c in masks})
    return masks


def apply_masks(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``tensors`` with masked entries set to exactly zero; tied tensors stay tied."""
    aliases = shared_storage_aliases(tensors)
    pruned = {n: t.masked_fill(masks[n].to(t.device), 0) for n, t in tensors.items() if n in masks and n not in aliases}
    return {n: pruned.get(aliases.get(n, n), t) for n, t in tensors.items()}


@dataclass
class _StreamedPrune:
    """A :class:`TensorSource` whose prunable tensors come out pruned, read one at a time in
    the source's order, so that ``write_stream`` (``.mrc``) or the safetensors stream writes
    them as they come. The global cut is found first (:meth:`rank`); a layer cut is found per
    tensor when it is read."""

    source: TensorSource
    prunable: list[str]
    sparsity: float
    scope: str
    scorer: Scorer
    owned: bool  # each read is a fresh buffer (safetensors, .mrc): pruned in place
    progress: Progress | None = None
    _global: CutMask | None = field(default=None, init=False)

    @property
    def names(self) -> list[str]:
        return self.source.names

    @property
    def aliases(self) -> dict[str, str]:
        return self.source.aliases

    def info(self, name: str) -> TensorInfo:
        return self.source.info(name)

    @property
    def prunable_bytes(self) -> int:
        return sum(self.source.info(n).nbytes for n in self.prunable)

    def rank(self) -> None:
        """The global cut, from a few passes over every prunable tensor (random scores need
        only their sizes)."""
        n = sum(self.source.info(name).numel for name in self.prunable)
        phase = "prune: ranking"

        def passes() -> Iterator[torch.Tensor]:
            self.scorer.restart()
            done = 0
            for name in self.prunable:
                numel = self.source.info(name).numel
                flat = None if self.scorer.random else self.source.get(name).detach().reshape(-1)
                for _, keys in self.scorer.keys(flat, numel):
                    yield keys
                del flat
                done += self.source.info(name).nbytes
                report(self.progress, phase, done / 1e6, self.prunable_bytes / 1e6, "MB")

        def on_pass(number: int) -> None:
            nonlocal phase
            phase = f"prune: ranking, pass {number}"
            report(self.progress, phase, 0, self.prunable_bytes / 1e6, "MB")

        self._global = CutMask(find_cut(passes, n, round(self.sparsity * n), on_pass))
        self.scorer.restart()  # the writing pass draws the random scores again, in the same order

    def get(self, name: str) -> torch.Tensor:
        tensor = self.source.get(name)
        if name not in self.prunable:
            return tensor
        if self.scope == "global":
            return pruned(tensor, self.scorer, self._global, owned=self.owned)
        flat, numel = tensor.detach().reshape(-1), tensor.numel()
        start = self.scorer.mark()

        def passes() -> Iterator[torch.Tensor]:
            self.scorer.rewind(start)
            return (keys for _, keys in self.scorer.keys(flat, numel))

        mask_of = CutMask(find_cut(passes, numel, round(self.sparsity * numel)))
        self.scorer.rewind(start)
        return pruned(tensor, self.scorer, mask_of, owned=self.owned)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.source.stored:
            yield name, self.get(name)


# --- posteriors ---------------------------------------------------------------------------------


def variable_kl(pt: PosteriorTensor) -> torch.Tensor:
    """Each variable's KL(N(mean, std^2) || N(prior_mean, prior_std^2)) in nats (float64): what
    it costs in a REC file, and so the information it carries."""
    return kl_gaussian(pt.mean.to(torch.float64), pt.std.to(torch.float64), pt.prior_mean, pt.prior_std)


def posterior_kl_bits(posterior: Posterior) -> float:
    """Total KL of all coded tensors in bits: about the size of their REC code."""
    return sum(float(variable_kl(pt).sum()) for pt in posterior.tensors.values()) / NATS_PER_BIT


def prunable_names(posterior: Posterior, select: Selection = Selection()) -> list[str]:
    """Coded tensors that are weights by the checkpoint rule (``is_quantizable`` on the tensor's
    shape, so >= 2 dimensions) and that ``select`` keeps, in coding order. Globs are matched
    against every name of the model, fixed tensors included."""
    chosen = select.resolve([*posterior.tensors, *posterior.fixed])
    return [n for n, pt in posterior.tensors.items()
            if is_quantizable(torch.empty(pt.tensor_shape, device="meta")) and chosen(n)]


def posterior_scores(posterior: Posterior, names: list[str], criterion: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-variable ranking scores (lowest is pruned first) of the coded tensors ``names``."""
    pts = {n: posterior.tensors[n] for n in names}
    if criterion == "kl":
        return {n: variable_kl(pt).reshape(-1) for n, pt in pts.items()}
    if criterion == "magnitude":
        return {n: (pt.mean.to(torch.float64) - pt.prior_mean).abs().reshape(-1) for n, pt in pts.items()}
    return random_scores({n: pt.mean.numel() for n, pt in pts.items()}, torch.Generator().manual_seed(seed))


def posterior_masks(
    posterior: Posterior,
    sparsity: float,
    *,
    criterion: str = "kl",
    scope: str = "global",
    seed: int = 0,
    select: Selection = Selection(),
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = pruned) over the variables (the shape of ``.mean``: free variables
    for a hashed tensor) of every prunable coded tensor of ``posterior`` that ``select`` keeps."""
    _check_choice(sparsity, criterion, scope)
    names = prunable_names(posterior, select)
    if not names:
        raise InputError("the posterior has no coded tensors with >= 2 dimensions to prune"
                         + (" among those --include/--exclude select" if select.narrows else ""))
    flat = select_lowest(posterior_scores(posterior, names, criterion, seed), sparsity, scope)
    return {n: flat[n].reshape(posterior.tensors[n].mean.shape) for n in names}


def prune_to_prior(posterior: Posterior, masks: Mapping[str, torch.Tensor]) -> Posterior:
    """A copy of ``posterior`` whose masked variables are their prior: mean = prior mean and
    std = prior std, so their KL is exactly zero (they carry no information and cost no bits)."""
    tensors = {}
    for name, pt in posterior.tensors.items():
        mask = masks.get(name)
        if mask is None:
            tensors[name] = pt
            continue
        tensors[name] = PosteriorTensor(
            mean=pt.mean.masked_fill(mask, pt.prior_mean), std=pt.std.masked_fill(mask, pt.prior_std),
            prior_mean=pt.prior_mean, prior_std=pt.prior_std, num_blocks=pt.num_blocks, shape=pt.shape)
    return Posterior(tensors=tensors, bits_per_block=posterior.bits_per_block, layout_seed=posterior.layout_seed,
                     fixed=dict(posterior.fixed), parameterization=posterior.parameterization,
                     extra=dict(posterior.extra))


def pruned_weights(
    posterior: Posterior,
    masks: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The dense state dict (coded tensors in coding order, then fixed ones) at per-variable
    ``values`` (default the means; e.g. a posterior sample), the masked variables at their prior
    mean -- a Dirac delta there, which is what a pruned weight means in a model."""
    state: dict[str, torch.Tensor] = {}
    for name, pt in posterior.tensors.items():
        v = pt.mean if values is None else values[name]
        if name in masks:
            v = v.masked_fill(masks[name], pt.prior_mean)
        state[name] = posterior.weights(name, v)
    state.update(posterior.fixed)
    return state


# --- fine-tuning --------------------------------------------------------------------------------


def finetune_masked(
    task,
    tensors: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    steps: int,
    *,
    lr: float | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Train the task's model for ``steps`` Adam steps with pruned weights held at zero.

    The gradient of pruned entries is zeroed and the mask re-applied after every step (Adam's
    momentum could otherwise revive them), so the sparsity pattern is exactly preserved.
    """
    model = load_task_model(task, tensors, device).train()
    params = dict(model.named_parameters())
    dev_masks = {n: m.to(device) for n, m in masks.items() if n in params}
    for n, m in dev_masks.items():
        params[n].register_hook(lambda g, m=m: g.masked_fill(m, 0))
    opt = torch.optim.Adam(model.parameters(), lr=lr if lr is not None else task.lr * 0.1)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while step < steps:
        for inputs, targets in task.train_batches(task.batch_size, generator):
            loss = task.loss(model(inputs.to(device)), targets.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for n, m in dev_masks.items():
                    params[n].masked_fill_(m, 0)
            step += 1
            report(progress, "fine-tune", step, steps, "steps", loss=float(loss.detach()))
            if step >= steps:
                break
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# --- files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One prune call's validated choices, handed to the half that reads its kind of input."""

    src: Path
    dst: Path
    criterion: str
    scope: str
    sparsity: float
    finetune_steps: int
    bits: int | None
    force: bool
    seed: int
    device: torch.device
    task: Any  # a Task, or None
    start: float  # perf_counter at the call, for the report's seconds
    select: Selection = Selection()

    @property
    def options(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "scope": self.scope, "sparsity": self.sparsity,
                "finetune_steps": self.finetune_steps, "bits": self.bits, **self.select.as_dict()}

    @property
    def metadata(self) -> dict[str, Any]:
        """The ``.mrc`` header's model-level metadata."""
        return base_metadata(self.src, {"method": "prune", **self.options})

    def summary(self, kind: str) -> dict[str, Any]:
        return {"input": str(self.src), "input_kind": kind, **self.options}

    @property
    def streams(self) -> bool:
        """Whether a checkpoint input is pruned one tensor at a time: everything but a task
        (which evaluates or fine-tunes the whole model) and ``torch.save`` outputs (one pickle)."""
        return self.task is None and not self.finetune_steps and self.dst.suffix.lower() in (".mrc", POSTERIOR_SUFFIX)


def prune_file(
    src: str | os.PathLike,
    *,
    sparsity: float,
    criterion: str = "magnitude",
    scope: str = "global",
    task: str | None = None,
    data: str | os.PathLike | None = None,
    finetune_steps: int = 0,
    bits: int | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
    unsafe_pickle: bool = False,
    seed: int = 0,
    device: str | torch.device = "auto",
    select: Selection = Selection(),
    progress: Progress | None = None,
) -> Report:
    """Prune the checkpoint, ``.mrc`` or posterior file at ``src`` and write ``output``.

    ``output`` ends in ``.mrc`` (entropy-coded dense weights; ``bits`` quantizes them),
    ``.safetensors`` (a posterior file for a posterior input, else a dense checkpoint) or any
    checkpoint suffix. ``select`` (``--include``/``--exclude``) narrows which tensors are
    pruned; the others are stored unchanged (losslessly in a ``.mrc``). Every check that can
    fail runs before anything is written. Without a task, a checkpoint written as ``.mrc`` or
    ``.safetensors`` is pruned one tensor at a time (memory: a few copies of the largest tensor).
    """
    start = time.perf_counter()
    Prune(sparsity=sparsity, criterion=criterion, scope=scope, task=task, finetune_steps=finetune_steps,
          bits=bits, select=select).validate()
    src = Path(src)
    dst = Path(output) if output is not None else default_output(src)
    if bits is not None and dst.suffix.lower() != ".mrc":
        raise UsageError("--bits quantizes into the .mrc container", hint="use an -o ending in .mrc")
    check_destination(dst, force=force)
    is_posterior = src.is_file() and is_posterior_file(src)
    if criterion == "kl" and not is_posterior:
        raise InputError(f"{NEEDS_POSTERIOR}; {src} is not one", hint="use --criterion magnitude or random")
    if is_posterior and finetune_steps:
        raise UsageError("--finetune-steps applies to checkpoints; a posterior is trained by fit-posterior")
    task_obj = get_task(task, data, src) if task is not None else None
    job = _Job(src, dst, criterion, scope, sparsity, finetune_steps, bits, force, seed, resolve_device(device),
               task_obj, start, select)
    if is_posterior:
        return _prune_posterior_file(job)
    if job.streams:
        return _prune_checkpoint_streaming(job, unsafe_pickle, progress)
    return _prune_checkpoint_file(job, unsafe_pickle, progress)


def _prune_checkpoint_file(job: _Job, unsafe_pickle: bool, progress: Progress | None) -> Report:
    """The whole checkpoint in memory: what a task (evaluation, fine-tuning) or a ``.pt``
    output needs, and the reference the streaming path is tested against."""
    tensors = load_checkpoint(job.src, unsafe_pickle=unsafe_pickle)
    if job.task is not None:
        check_state_dict_fits(job.task, tensors)
    masks = prune_masks(tensors, job.sparsity, criterion=job.criterion, scope=job.scope, seed=job.seed,
                        select=job.select)
    aliases = shared_storage_aliases(tensors)
    ranked = [n for n in masks if n not in aliases]
    pruned = apply_masks(tensors, masks)
    if job.finetune_steps:
        pruned = finetune_masked(job.task, pruned, masks, job.finetune_steps, seed=job.seed, device=job.device,
                                 progress=progress)
        pruned = apply_masks(pruned, masks)  # exact zeros, whatever the optimiser did
    plan, stored_eval = _dense_plan(pruned, job.bits, lambda n: n in masks)
    summary = job.summary("checkpoint")
    total = sum(masks[n].numel() for n in ranked)
    summary["achieved_sparsity"] = sum(zero_count(stored_eval[n]) for n in ranked) / total
    _add_metrics(summary, job, tensors, stored_eval)
    return _write_dense(job, pruned, plan, summary)


def _prune_checkpoint_streaming(job: _Job, unsafe_pickle: bool, progress: Progress | None) -> Report:
    """The checkpoint one tensor at a time (:class:`_StreamedPrune`): a global cut costs a few
    read-only passes first; the writing pass then prunes each tensor as it is read and writes
    it at once. Masks and bytes are those of :func:`_prune_checkpoint_file`."""
    source = open_source(job.src, unsafe_pickle=unsafe_pickle)
    infos = source.infos()
    names = prunable_tensors(infos, source.aliases, job.select)
    pruner = _StreamedPrune(source, names, job.sparsity, job.scope, Scorer(job.criterion, job.seed),
                            _reads_fresh(job.src), progress)
    if job.scope == "global":
        pruner.rank()
    plan = _plan(infos, job.bits, set(names).__contains__)
    encode = plan_encoder(plan)
    zeros = 0

    def count_zeros(name: str, tensor: torch.Tensor) -> None:
        nonlocal zeros
        if name in pruner.prunable:  # of what a decoder rebuilds
            stored = dequantize_uniform({name: tensor}, {name: plan[name]})[name] if job.bits is not None else tensor
            zeros += zero_count(stored)

    def written(done: int, total: int) -> None:
        report(progress, "prune: writing", done / 1e6, total / 1e6, "MB")

    summary = job.summary("checkpoint")
    if job.dst.suffix.lower() == ".mrc":
        def encode_one(name: str, tensor: torch.Tensor):
            count_zeros(name, tensor)
            return encode(name, tensor)

        write_stream(job.dst, pruner, encode_one, job.metadata, force=job.force, progress=written)
        summary["achieved_sparsity"] = zeros / sum(infos[n].numel for n in names)
        return _mrc_report(job, summary)
    entries = [TensorEntry(n, infos[n].shape, infos[n].dtype) for n in source.stored]
    total, done = sum(e.nbytes for e in entries), 0

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal done
        for name, tensor in pruner.items():
            count_zeros(name, tensor)
            yield name, tensor
            del tensor  # not held while the next one is read and pruned
            done += infos[name].nbytes
            written(done, total)

    _stream_checkpoint(job, entries, source.aliases, tensors())
    summary["achieved_sparsity"] = zeros / sum(infos[n].numel for n in names)
    return _checkpoint_report(job, [infos[n] for n in source.stored], len(source.names), summary)


def _reads_fresh(src: Path) -> bool:
    """Whether :func:`open_source` reads ``src`` tensor by tensor into new buffers (safetensors
    files and directories, ``.mrc``) rather than holding a loaded state dict (pickles)."""
    kind = checkpoint_format(src)
    return kind in ("safetensors", "mrc") or (kind == "hf-dir" and find_weights(src)[1] == "safetensors")


def _prune_posterior_file(job: _Job) -> Report:
    posterior = load_posterior(job.src)
    dense = pruned_weights(posterior, {})
    if job.task is not None:
        check_state_dict_fits(job.task, dense)
    masks = posterior_masks(posterior, job.sparsity, criterion=job.criterion, scope=job.scope, seed=job.seed,
                            select=job.select)
    pruned = prune_to_prior(posterior, masks)
    summary = job.summary("posterior")
    total = sum(m.numel() for m in masks.values())
    summary.update(variables=total, pruned_variables=sum(int(m.sum()) for m in masks.values()),
                   kl_bits_before=posterior_kl_bits(posterior), kl_bits_after=posterior_kl_bits(pruned))
    summary["achieved_sparsity"] = summary["pruned_variables"] / total
    if job.dst.suffix.lower() == POSTERIOR_SUFFIX:
        _add_metrics(summary, job, dense, pruned_weights(pruned, {}))
        summary["output_kind"] = "posterior"
        save_posterior(pruned, job.dst, force=job.force)
        return _posterior_report(job, posterior, summary)
    weights = pruned_weights(posterior, masks)
    plan, stored_eval = _dense_plan(weights, job.bits, job.select.resolve(weights))
    _add_metrics(summary, job, dense, stored_eval)
    return _write_dense(job, weights, plan, summary)


def _plan(tensors: Mapping[str, Any], bits: int | None, select: Callable[[str], bool]) -> Plan:
    """Lossless keeps every bit; ``bits`` quantizes the selected conv/linear weights uniformly
    (0 is an exact level, so pruned zeros stay zeros) and stores the rest losslessly."""
    if bits is None:
        return {n: ("lossless", {}) for n in tensors}
    return uniform_plan(tensors, bits, select=select)


def _dense_plan(tensors: Mapping[str, torch.Tensor], bits: int | None, select: Callable[[str], bool]):
    """``(plan, weights as decoded)`` of :func:`_plan`."""
    plan = _plan(tensors, bits, select)
    return plan, (dequantize_uniform(dict(tensors), plan) if bits is not None else dict(tensors))


def _add_metrics(summary: dict[str, Any], job: _Job, before: Mapping[str, torch.Tensor],
                 after: Mapping[str, torch.Tensor]) -> None:
    """The task's test metric on the input's weights and on the weights the output decodes to."""
    if job.task is None:
        return
    summary["metric"] = job.task.metric_name
    for key, state in (("metric_before", before), ("metric_after", after)):
        summary[key] = evaluate_model(job.task, load_task_model(job.task, state, job.device), device=job.device).metric


def _write_dense(job: _Job, stored: Mapping[str, torch.Tensor], plan: Plan, summary: dict[str, Any]) -> Report:
    """Write dense weights as ``.mrc`` by ``plan`` or as a checkpoint; the report of the file."""
    if job.dst.suffix.lower() == ".mrc":
        write_plan(job.dst, stored, plan, job.metadata, force=job.force)
        return _mrc_report(job, summary)
    tied = shared_storage_aliases(stored)
    once = {n: t for n, t in stored.items() if n not in tied}
    infos = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in once.items()]
    if job.dst.suffix.lower() == POSTERIOR_SUFFIX:
        _stream_checkpoint(job, [TensorEntry(i.name, i.shape, i.dtype) for i in infos], tied, iter(once.items()))
    else:
        save_checkpoint(dict(stored), job.dst, force=job.force)
    return _checkpoint_report(job, infos, len(stored), summary)


def _stream_checkpoint(job: _Job, entries: Sequence[TensorEntry], aliases: Mapping[str, str],
                       tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """A ``.safetensors`` output, each tensor written as it comes (ties stored once, in the
    alias table; ``{"format": "pt"}`` for transformers), atomically."""
    with atomic_output(job.dst, force=job.force) as tmp:
        with stream_safetensors(tmp, entries, header_metadata(WEIGHTS_METADATA, aliases)) as stream:
            stream.write_from(tensors)


def _mrc_report(job: _Job, summary: dict[str, Any]) -> Report:
    summary["output_kind"] = "mrc"
    summary.update(measure_file(job.dst).as_dict())
    return Report.of(open_mrc(job.dst), job.criterion, time.perf_counter() - job.start, summary)


def _checkpoint_report(job: _Job, stored: Sequence[TensorInfo], names: int, summary: dict[str, Any]) -> Report:
    """A dense checkpoint's report: its stored tensors (ties once) against the file's bytes."""
    summary["output_kind"] = "checkpoint"
    numel = sum(i.numel for i in stored)
    return Report(job.dst, job.criterion, names, numel, sum(i.nbytes for i in stored), 4 * numel,
                  job.dst.stat().st_size, time.perf_counter() - job.start, summary)


def _posterior_report(job: _Job, posterior: Posterior, summary: dict[str, Any]) -> Report:
    """A posterior file holds no compressed model yet: sizes are the model's weights and the
    two files' bytes (the ratio is input over output file, about 1)."""
    numel = sum(math.prod(pt.tensor_shape) for pt in posterior.tensors.values())
    numel += sum(t.numel() for t in posterior.fixed.values())
    return Report(job.dst, job.criterion, len(posterior.tensors) + len(posterior.fixed), numel,
                  job.src.stat().st_size, 4 * numel, job.dst.stat().st_size, time.perf_counter() - job.start, summary)
