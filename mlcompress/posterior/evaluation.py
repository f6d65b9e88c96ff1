"""Evaluating a file on a task: a checkpoint as it is, a posterior at its mean or at samples.

This sits with the posterior because a posterior file is the one input that is not a single set
of weights; every other format is read by :func:`mlcompress.checkpoint.load_checkpoint`.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from mlcompress.checkpoint import load_checkpoint
from mlcompress.device import resolve_device
from mlcompress.errors import UsageError
from mlcompress.posterior.file import is_posterior_file, load_posterior
from mlcompress.progress import Progress, report
from mlcompress.tasks import Evaluation, Task, evaluate_model, load_task_model


def evaluate_file(
    task: Task,
    path: str | Path,
    *,
    samples: int = 0,
    seed: int = 0,
    device: str | torch.device = "auto",
    unsafe_pickle: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate the weights in ``path`` on ``task``'s test set; a summary dict for reports.

    ``path`` is any checkpoint :func:`mlcompress.checkpoint.load_checkpoint` reads (``.pt``,
    safetensors, ``.mrc``...) or a posterior file. A posterior is evaluated at its mean, or with
    ``samples > 0`` at that many weight draws (each one a model REC decoding could produce),
    reporting their mean and spread.
    """
    if samples < 0:
        raise UsageError("--samples must be >= 0")
    dev = resolve_device(device)
    source = Path(path)
    summary: dict[str, Any] = {"file": str(source), "task": task.name}
    if is_posterior_file(source):
        posterior = load_posterior(source)
        summary.update(kind="posterior", parameterization=posterior.parameterization, samples=samples)
        generator = torch.Generator().manual_seed(seed)
        draws = []
        for _ in range(max(samples, 1)):
            state = dict(posterior.fixed)
            for name, q in posterior.tensors.items():
                noise = torch.randn(q.mean.shape, generator=generator) if samples else 0.0
                state[name] = posterior.weights(name, q.mean + q.std * noise)
            draws.append(evaluate_model(task, load_task_model(task, state, dev), device=dev, progress=progress))
            report(progress, "eval draws", len(draws), max(samples, 1), "draws")
        result = _mean_of(draws)
        if samples > 1:
            summary[f"{result.metric_name}_std"] = statistics.stdev(d.metric for d in draws)
            summary["loss_std"] = statistics.stdev(d.loss for d in draws)
    else:
        if samples:
            raise UsageError("--samples applies to posterior files only")
        state = load_checkpoint(source, unsafe_pickle=unsafe_pickle)
        summary["kind"] = "checkpoint"
        result = evaluate_model(task, load_task_model(task, state, dev), device=dev, progress=progress)
    summary.update(
        loss=result.loss, metric_name=result.metric_name, examples=result.examples,
        device=str(dev),
    )
    summary[result.metric_name] = result.metric
    return summary


def _mean_of(results: list[Evaluation]) -> Evaluation:
    return Evaluation(
        loss=sum(r.loss for r in results) / len(results),
        metric=sum(r.metric for r in results) / len(results),
        metric_name=results[0].metric_name,
        examples=results[0].examples,
    )
