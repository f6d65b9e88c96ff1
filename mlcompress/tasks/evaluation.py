"""Measuring a model on a task's test set: mean loss and mean metric over all test examples."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from mlcompress.device import resolve_device
from mlcompress.progress import Progress, report
from mlcompress.tasks.protocol import Task, summarized_metric

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
def evaluate_outputs(task: Task, forward, device: torch.device, progress: Progress | None = None) -> Evaluation:
    """Evaluate ``forward(inputs) -> outputs`` over the test set; the model-agnostic core that
    plain models and sampled posterior weights share. ``progress`` hears the examples done
    (phase ``eval``; a language model's test set can take minutes)."""
    loss_sum = metric_sum = 0.0
    count = 0
    for inputs, targets in task.test_batches(EVAL_BATCH):
        inputs, targets = inputs.to(device), targets.to(device)
        outputs = forward(inputs)
        n = len(targets)
        loss_sum += float(task.loss(outputs, targets)) * n
        metric_sum += float(task.metric(outputs, targets)) * n
        count += n
        report(progress, "eval", count, None, "examples")
    return Evaluation(loss_sum / count, summarized_metric(task, metric_sum / count), task.metric_name, count)


def evaluate_model(
    task: Task, model: nn.Module, *, device: str | torch.device = "auto", progress: Progress | None = None
) -> Evaluation:
    """Test-set loss and metric of ``model`` (moved to ``device`` and put in eval mode)."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    return evaluate_outputs(task, model, dev, progress)
