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
are candidates (fixed ones are stored as they are).

Storage: pruned weights must cost almost nothing, so the ``.mrc`` output entropy-codes the pruned
tensors -- bit-exactly with ``lossless`` (its planes are mostly one repeated symbol), or quantized
with ``quant`` when ``bits`` is given (0 is always an exact level there). Safetensors/.pt outputs
are plain dense checkpoints, except that a posterior pruned into ``.safetensors`` stays a
posterior file.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from mlcompress.assembly import base_metadata, default_output
from mlcompress.atomic import check_destination
from mlcompress.checkpoint import load_checkpoint, save_checkpoint
from mlcompress.container import open_mrc, shared_storage_aliases
from mlcompress.device import resolve_device
from mlcompress.errors import InputError, UsageError
from mlcompress.options import Prune, check_sparsity
from mlcompress.posterior.file import Posterior, PosteriorTensor, is_posterior_file, load_posterior, save_posterior
from mlcompress.posterior.meankl import NATS_PER_BIT, kl_gaussian
from mlcompress.progress import Progress, report
from mlcompress.quant.plan import is_quantizable, uniform_plan, write_plan
from mlcompress.quant.quantize import dequantize_uniform
from mlcompress.report import Report
from mlcompress.tasks import check_state_dict_fits, evaluate_model, get_task, load_task_model

CRITERIA = Prune.CRITERIA
SCOPES = Prune.SCOPES
#: Output suffix that keeps a pruned posterior a posterior file (any other writes dense weights).
POSTERIOR_SUFFIX = ".safetensors"

_NEEDS_POSTERIOR = "KL ranking needs a posterior file (fit-posterior's output)"


def _check_choice(sparsity: float, criterion: str, scope: str) -> None:
    """The library entry points check what the CLI checks, with the same messages."""
    Prune(sparsity=sparsity, criterion=criterion, scope=scope).validate()


# --- ranking ------------------------------------------------------------------------------------


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest scores (stable: earlier positions win ties)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, stable=True).indices
        mask[order[:k]] = True
    return mask


def select_lowest(scores: Mapping[str, torch.Tensor], sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Flat boolean masks (True = pruned) of the lowest ``round(sparsity * n)`` scores: over all
    tensors together (``global``, in the mapping's order for ties) or per tensor (``layer``)."""
    check_sparsity(sparsity)
    if scope == "layer":
        return {n: _lowest(s, round(sparsity * s.numel())) for n, s in scores.items()}
    allscores = torch.cat([s.reshape(-1) for s in scores.values()])
    allmask = _lowest(allscores, round(sparsity * allscores.numel()))
    flat, pos = {}, 0
    for n, s in scores.items():
        flat[n] = allmask[pos : pos + s.numel()]
        pos += s.numel()
    return flat


def _random_scores(sizes: Mapping[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {n: torch.rand(k, generator=generator, dtype=torch.float64) for n, k in sizes.items()}


# --- checkpoints --------------------------------------------------------------------------------


def _checkpoint_scores(tensors: Mapping[str, torch.Tensor], criterion: str, seed: int) -> dict[str, torch.Tensor]:
    if criterion == "kl":
        raise InputError(f"{_NEEDS_POSTERIOR}; a checkpoint has no posterior to rank by",
                         hint="use --criterion magnitude or random for a checkpoint")
    if criterion == "magnitude":
        return {n: t.detach().abs().reshape(-1).to(torch.float64) for n, t in tensors.items()}
    return _random_scores({n: t.numel() for n, t in tensors.items()}, torch.Generator().manual_seed(seed))


def prune_masks(
    tensors: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    criterion: str = "magnitude",
    scope: str = "global",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = pruned) for every prunable tensor of a checkpoint's ``tensors``."""
    _check_choice(sparsity, criterion, scope)
    prunable = {n: t for n, t in tensors.items() if is_quantizable(t)}
    if not prunable:
        raise InputError("the checkpoint has no conv/linear weights to prune (need >= 2-D float tensors)")
    flat = select_lowest(_checkpoint_scores(prunable, criterion, seed), sparsity, scope)
    return {n: flat[n].reshape(prunable[n].shape) for n in prunable}


def apply_masks(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``tensors`` with masked entries set to exactly zero."""
    return {n: (t.masked_fill(masks[n].to(t.device), 0) if n in masks else t) for n, t in tensors.items()}


# --- posteriors ---------------------------------------------------------------------------------


def variable_kl(pt: PosteriorTensor) -> torch.Tensor:
    """Each variable's KL(N(mean, std^2) || N(prior_mean, prior_std^2)) in nats (float64): what
    it costs in a REC file, and so the information it carries."""
    return kl_gaussian(pt.mean.to(torch.float64), pt.std.to(torch.float64), pt.prior_mean, pt.prior_std)


def posterior_kl_bits(posterior: Posterior) -> float:
    """Total KL of all coded tensors in bits: about the size of their REC code."""
    return sum(float(variable_kl(pt).sum()) for pt in posterior.tensors.values()) / NATS_PER_BIT


def prunable_names(posterior: Posterior) -> list[str]:
    """Coded tensors that are weights by the checkpoint rule (``is_quantizable`` on the tensor's
    shape, so >= 2 dimensions), in coding order."""
    return [n for n, pt in posterior.tensors.items()
            if is_quantizable(torch.empty(pt.tensor_shape, device="meta"))]


def posterior_scores(posterior: Posterior, names: list[str], criterion: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-variable ranking scores (lowest is pruned first) of the coded tensors ``names``."""
    pts = {n: posterior.tensors[n] for n in names}
    if criterion == "kl":
        return {n: variable_kl(pt).reshape(-1) for n, pt in pts.items()}
    if criterion == "magnitude":
        return {n: (pt.mean.to(torch.float64) - pt.prior_mean).abs().reshape(-1) for n, pt in pts.items()}
    return _random_scores({n: pt.mean.numel() for n, pt in pts.items()}, torch.Generator().manual_seed(seed))


def posterior_masks(
    posterior: Posterior,
    sparsity: float,
    *,
    criterion: str = "kl",
    scope: str = "global",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = pruned) over the variables (the shape of ``.mean``: free variables
    for a hashed tensor) of every prunable coded tensor of ``posterior``."""
    _check_choice(sparsity, criterion, scope)
    names = prunable_names(posterior)
    if not names:
        raise InputError("the posterior has no coded tensors with >= 2 dimensions to prune")
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

    @property
    def options(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "scope": self.scope, "sparsity": self.sparsity,
                "finetune_steps": self.finetune_steps, "bits": self.bits}

    def summary(self, kind: str) -> dict[str, Any]:
        return {"input": str(self.src), "input_kind": kind, **self.options}


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
    progress: Progress | None = None,
) -> Report:
    """Prune the checkpoint, ``.mrc`` or posterior file at ``src`` and write ``output``.

    ``output`` ends in ``.mrc`` (entropy-coded dense weights; ``bits`` quantizes them),
    ``.safetensors`` (a posterior file for a posterior input, else a dense checkpoint) or any
    checkpoint suffix. Every check that can fail runs before anything is written.
    """
    start = time.perf_counter()
    Prune(sparsity=sparsity, criterion=criterion, scope=scope, task=task, finetune_steps=finetune_steps,
          bits=bits).validate()
    src = Path(src)
    dst = Path(output) if output is not None else default_output(src)
    if bits is not None and dst.suffix.lower() != ".mrc":
        raise UsageError("--bits quantizes into the .mrc container", hint="use an -o ending in .mrc")
    check_destination(dst, force=force)
    is_posterior = src.is_file() and is_posterior_file(src)
    if criterion == "kl" and not is_posterior:
        raise InputError(f"{_NEEDS_POSTERIOR}; {src} is not one", hint="use --criterion magnitude or random")
    if is_posterior and finetune_steps:
        raise UsageError("--finetune-steps applies to checkpoints; a posterior is trained by fit-posterior")
    task_obj = get_task(task, data, src) if task is not None else None
    job = _Job(src, dst, criterion, scope, sparsity, finetune_steps, bits, force, seed, resolve_device(device),
               task_obj, start)
    if is_posterior:
        return _prune_posterior_file(job)
    return _prune_checkpoint_file(job, unsafe_pickle, progress)


def _prune_checkpoint_file(job: _Job, unsafe_pickle: bool, progress: Progress | None) -> Report:
    tensors = load_checkpoint(job.src, unsafe_pickle=unsafe_pickle)
    if job.task is not None:
        check_state_dict_fits(job.task, tensors)
    masks = prune_masks(tensors, job.sparsity, criterion=job.criterion, scope=job.scope, seed=job.seed)
    pruned = apply_masks(tensors, masks)
    if job.finetune_steps:
        pruned = finetune_masked(job.task, pruned, masks, job.finetune_steps, seed=job.seed, device=job.device,
                                 progress=progress)
        pruned = apply_masks(pruned, masks)  # exact zeros, whatever the optimiser did
    plan, stored_eval = _dense_plan(pruned, job.bits)
    summary = job.summary("checkpoint")
    total = sum(m.numel() for m in masks.values())
    summary["achieved_sparsity"] = sum(int((stored_eval[n] == 0).sum()) for n in masks) / total
    _add_metrics(summary, job, tensors, stored_eval)
    return _write_dense(job, pruned, plan, summary, aliases_of=tensors)


def _prune_posterior_file(job: _Job) -> Report:
    posterior = load_posterior(job.src)
    dense = pruned_weights(posterior, {})
    if job.task is not None:
        check_state_dict_fits(job.task, dense)
    masks = posterior_masks(posterior, job.sparsity, criterion=job.criterion, scope=job.scope, seed=job.seed)
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
    plan, stored_eval = _dense_plan(weights, job.bits)
    _add_metrics(summary, job, dense, stored_eval)
    return _write_dense(job, weights, plan, summary, aliases_of={})


def _dense_plan(tensors: Mapping[str, torch.Tensor], bits: int | None):
    """``(plan, weights as decoded)``: lossless keeps every bit; ``bits`` quantizes uniformly,
    where 0 is an exact level so pruned zeros stay zeros."""
    if bits is None:
        return {n: ("lossless", {}) for n in tensors}, dict(tensors)
    plan = uniform_plan(tensors, bits)
    return plan, dequantize_uniform(tensors, plan)


def _add_metrics(summary: dict[str, Any], job: _Job, before: Mapping[str, torch.Tensor],
                 after: Mapping[str, torch.Tensor]) -> None:
    """The task's test metric on the input's weights and on the weights the output decodes to."""
    if job.task is None:
        return
    summary["metric"] = job.task.metric_name
    for key, state in (("metric_before", before), ("metric_after", after)):
        summary[key] = evaluate_model(job.task, load_task_model(job.task, state, job.device), device=job.device).metric


def _write_dense(job: _Job, stored: Mapping[str, torch.Tensor], plan, summary: dict[str, Any],
                 aliases_of: Mapping[str, torch.Tensor]) -> Report:
    """Write dense weights as ``.mrc`` by ``plan`` or as a checkpoint; the report of the file."""
    if job.dst.suffix.lower() == ".mrc":
        summary["output_kind"] = "mrc"
        metadata = base_metadata(job.src, {"method": "prune", **job.options})
        size = write_plan(job.dst, stored, plan, metadata, force=job.force)
        summary.update(size.as_dict())
        return Report.of(open_mrc(job.dst), job.criterion, time.perf_counter() - job.start, summary)
    summary["output_kind"] = "checkpoint"
    save_checkpoint(dict(stored), job.dst, force=job.force)
    tied = shared_storage_aliases(aliases_of) if aliases_of else {}
    once = [t for n, t in stored.items() if n not in tied]
    numel = sum(t.numel() for t in once)
    return Report(job.dst, job.criterion, len(stored), numel, sum(t.numel() * t.element_size() for t in once),
                  4 * numel, job.dst.stat().st_size, time.perf_counter() - job.start, summary)


def _posterior_report(job: _Job, posterior: Posterior, summary: dict[str, Any]) -> Report:
    """A posterior file holds no compressed model yet: sizes are the model's weights and the
    two files' bytes (the ratio is input over output file, about 1)."""
    numel = sum(math.prod(pt.tensor_shape) for pt in posterior.tensors.values())
    numel += sum(t.numel() for t in posterior.fixed.values())
    return Report(job.dst, job.criterion, len(posterior.tensors) + len(posterior.fixed), numel,
                  job.src.stat().st_size, 4 * numel, job.dst.stat().st_size, time.perf_counter() - job.start, summary)
