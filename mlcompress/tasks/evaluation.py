"""Measuring a model on a task's test set: mean loss and mean metric over all test examples."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlcompress.device import resolve_device
from mlcompress.errors import UsageError
from mlcompress.tasks.protocol import Task
from mlcompress.tasks.weights import load_task_model

EVAL_BATCH = 1000


@dataclass
class Evaluation:
    loss: float
    metric: float
    metric_name: str
    examples: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_outputs(task: Task, forward, device: torch.device) -> Evaluation:
    """Evaluate ``forward(inputs) -> outputs`` over the test set; the model-agnostic core that
    plain models and sampled posterior weights share."""
    loss_sum = metric_sum = 0.0
    count = 0
    for inputs, targets in task.test_batches(EVAL_BATCH):
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = forward(inputs)
        n = len(targets)
        loss_sum += float(task.loss(outputs, targets)) * n
        metric_sum += float(task.metric(outputs, targets)) * n
        count += n
    return Evaluation(loss_sum / count, metric_sum / count, task.metric_name, count)


def evaluate_model(
    task: Task, model: nn.Module, *, device: str | torch.device = "auto"
) -> Evaluation:
    """Test-set loss and metric of ``model`` (moved to ``device`` and put in eval mode)."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    return evaluate_outputs(task, model, dev)


def evaluate_file(
    task: Task,
    path: str | Path,
    *,
    samples: int = 0,
    seed: int = 0,
    device: str | torch.device = "auto",
    unsafe_pickle: bool = False,
) -> dict[str, Any]:
    """Evaluate the weights in ``path`` on ``task``'s test set; a summary dict for reports.

    ``path`` is any checkpoint :func:`mlcompress.checkpoint.load_checkpoint` reads (``.pt``,
    safetensors, ``.mrc``...) or a posterior file. A posterior is evaluated at its mean, or with
    ``samples > 0`` at that many weight draws (each one a model REC decoding could produce),
    reporting their mean and spread.
    """
    from mlcompress.checkpoint import load_checkpoint
    from mlcompress.posterior.file import is_posterior_file, load_posterior

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
                state[name] = q.mean + q.std * noise
            draws.append(evaluate_model(task, load_task_model(task, state, dev), device=dev))
        result = _mean_of(draws)
        if samples > 1:
            summary[f"{result.metric_name}_std"] = statistics.stdev(d.metric for d in draws)
            summary["loss_std"] = statistics.stdev(d.loss for d in draws)
    else:
        if samples:
            raise UsageError("--samples applies to posterior files only")
        state = load_checkpoint(source, unsafe_pickle=unsafe_pickle)
        summary["kind"] = "checkpoint"
        result = evaluate_model(task, load_task_model(task, state, dev), device=dev)
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
