"""Pruning: zero a chosen fraction of the conv/linear weights, optionally fine-tune, and store it.

Criteria: ``magnitude`` (the smallest |w| go) or ``random`` (a seeded uniform choice -- the
baseline that tells whether magnitude matters). Scope: ``global`` ranks all prunable weights
together (layers with many small weights lose more, usually the better trade), ``layer`` prunes
every tensor by the same fraction. Exactly ``round(sparsity * n)`` weights are zeroed; ties in
magnitude are broken by position so the result is deterministic.

Which tensors: the same rule as quantization (:func:`mlcompress.quant.plan.is_quantizable`):
conv/linear weights; biases and small tensors are left alone.

Storage: zeros must cost almost nothing, so the ``.mrc`` output entropy-codes the pruned tensors
-- bit-exactly with ``lossless`` (its planes are mostly one repeated symbol), or quantized with
``quant`` when ``bits`` is given (0 is always an exact level there). Safetensors/.pt outputs are
plain dense checkpoints for tools that need them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from mlcompress.assembly import base_metadata, default_output
from mlcompress.atomic import check_destination
from mlcompress.checkpoint import load_checkpoint, save_checkpoint
from mlcompress.container import open_mrc, shared_storage_aliases
from mlcompress.device import resolve_device
from mlcompress.errors import UsageError
from mlcompress.options import Prune, check_sparsity
from mlcompress.progress import Progress, report
from mlcompress.quant.plan import is_quantizable, uniform_plan, write_plan
from mlcompress.quant.quantize import dequantize_uniform
from mlcompress.report import Report
from mlcompress.tasks import check_state_dict_fits, evaluate_model, get_task, load_task_model

METHODS = ("magnitude", "random")
SCOPES = ("global", "layer")


def _scores(tensors: Mapping[str, torch.Tensor], method: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    if method == "magnitude":
        return {n: t.detach().abs().reshape(-1).to(torch.float64) for n, t in tensors.items()}
    if method == "random":
        return {n: torch.rand(t.numel(), generator=generator, dtype=torch.float64) for n, t in tensors.items()}
    raise UsageError(f"unknown pruning method {method!r}", hint=f"use one of: {', '.join(METHODS)}")


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest scores (stable: earlier positions win ties)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, stable=True).indices
        mask[order[:k]] = True
    return mask


def prune_masks(
    tensors: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    method: str = "magnitude",
    scope: str = "global",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Boolean masks (True = pruned) for every prunable tensor in ``tensors``."""
    check_sparsity(sparsity)
    if scope not in SCOPES:
        raise UsageError(f"unknown pruning scope {scope!r}", hint=f"use one of: {', '.join(SCOPES)}")
    prunable = {n: t for n, t in tensors.items() if is_quantizable(t)}
    if not prunable:
        raise UsageError("the checkpoint has no conv/linear weights to prune (need >= 2-D float tensors)")
    scores = _scores(prunable, method, torch.Generator().manual_seed(seed))
    if scope == "layer":
        flat = {n: _lowest(s, round(sparsity * s.numel())) for n, s in scores.items()}
    else:
        allscores = torch.cat(list(scores.values()))
        allmask = _lowest(allscores, round(sparsity * allscores.numel()))
        flat, pos = {}, 0
        for n, s in scores.items():
            flat[n] = allmask[pos : pos + s.numel()]
            pos += s.numel()
    return {n: flat[n].reshape(prunable[n].shape) for n in prunable}


def apply_masks(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``tensors`` with masked entries set to exactly zero."""
    return {n: (t.masked_fill(masks[n].to(t.device), 0) if n in masks else t) for n, t in tensors.items()}


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


def prune_checkpoint(
    src: str | os.PathLike,
    *,
    sparsity: float,
    method: str = "magnitude",
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
    """Prune the checkpoint at ``src`` and write ``output`` (``.mrc``, ``.safetensors`` or ``.pt``)."""
    start = time.perf_counter()
    Prune(sparsity=sparsity, method=method, scope=scope, task=task, finetune_steps=finetune_steps, bits=bits).validate()
    if method not in METHODS:
        raise UsageError(f"unknown pruning method {method!r}", hint=f"use one of: {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise UsageError(f"unknown pruning scope {scope!r}", hint=f"use one of: {', '.join(SCOPES)}")
    dev = resolve_device(device)
    src = Path(src)
    dst = Path(output) if output is not None else default_output(src)
    if bits is not None and dst.suffix.lower() != ".mrc":
        raise UsageError("--bits quantizes into the .mrc container", hint="use an -o ending in .mrc")
    check_destination(dst, force=force)
    tensors = load_checkpoint(src, unsafe_pickle=unsafe_pickle)
    task_obj = None
    if task is not None:
        task_obj = get_task(task, data)
        check_state_dict_fits(task_obj, tensors)

    masks = prune_masks(tensors, sparsity, method=method, scope=scope, seed=seed)
    pruned = apply_masks(tensors, masks)
    if finetune_steps:
        pruned = finetune_masked(task_obj, pruned, masks, finetune_steps, seed=seed, device=dev, progress=progress)
        pruned = apply_masks(pruned, masks)  # exact zeros, whatever the optimiser did
    options = {"method": method, "scope": scope, "sparsity": sparsity, "finetune_steps": finetune_steps, "bits": bits}
    summary: dict[str, Any] = {"input": str(src), **options}
    stored = pruned
    if bits is not None:
        plan = uniform_plan(pruned, bits)
        stored_eval = dequantize_uniform(pruned, plan)
    else:
        plan = {n: ("lossless", {}) for n in pruned}
        stored_eval = pruned
    total = sum(m.numel() for m in masks.values())
    summary["achieved_sparsity"] = sum(int((stored_eval[n] == 0).sum()) for n in masks) / total
    if task_obj is not None:
        summary["metric"] = task_obj.metric_name
        summary["metric_before"] = evaluate_model(task_obj, load_task_model(task_obj, tensors, dev), device=dev).metric
        summary["metric_after"] = evaluate_model(task_obj, load_task_model(task_obj, stored_eval, dev), device=dev).metric
    if dst.suffix.lower() == ".mrc":
        metadata = base_metadata(src, {"method": "prune", **options})
        size = write_plan(dst, stored, plan, metadata, force=force)
        summary.update(size.as_dict())
        return Report.of(open_mrc(dst), method, time.perf_counter() - start, summary)
    save_checkpoint(stored, dst, force=force)
    tied = shared_storage_aliases(tensors)
    once = [t for n, t in stored.items() if n not in tied]
    numel = sum(t.numel() for t in once)
    return Report(dst, method, len(stored), numel, sum(t.numel() * t.element_size() for t in once), 4 * numel,
                  dst.stat().st_size, time.perf_counter() - start, summary)
