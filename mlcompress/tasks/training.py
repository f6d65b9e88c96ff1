"""Plain (non-variational) training of a task's model: the starting point for compression.

A user who wants to try the pipeline needs a trained model first; ``mlcompress train`` calls
:func:`train_task_model`. Given a seed it is reproducible on the CPU: weights are initialised
from ``torch.manual_seed(seed)`` and batches are shuffled from a generator seeded the same way.
"""

from __future__ import annotations

import time
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlcompress.atomic import check_destination
from mlcompress.checkpoint import save_checkpoint
from mlcompress.device import resolve_device
from mlcompress.progress import Progress, report
from mlcompress.errors import InputError, UsageError
from mlcompress.tasks.evaluation import Evaluation, evaluate_model
from mlcompress.tasks.protocol import Task



@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    train_loss: float  # mean loss over the last epoch's (or last up to 100) steps
    test: Evaluation
    seconds: float


def steps_per_epoch(task: Task, batch_size: int) -> int:
    """Number of optimiser steps in one pass over the training set."""
    return sum(1 for _ in task.train_batches(batch_size, torch.Generator().manual_seed(0)))


def train_task_model(
    task: Task,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
) -> TrainResult:
    """Train a fresh model of ``task`` with Adam and cross-entropy (the task's loss).

    Length is ``steps`` optimiser steps or ``epochs`` passes (not both); the task's default
    number of epochs otherwise.
    """
    if epochs is not None and steps is not None:
        raise UsageError("give --epochs or --steps, not both")
    if (epochs is not None and epochs <= 0) or (steps is not None and steps <= 0):
        raise UsageError("--epochs and --steps must be positive")
    lr = task.lr if lr is None else lr
    batch_size = task.batch_size if batch_size is None else batch_size
    if lr <= 0 or batch_size <= 0:
        raise UsageError("--lr and --batch-size must be positive")
    dev = resolve_device(device)
    total = steps if steps is not None else (epochs or task.epochs) * steps_per_epoch(task, batch_size)

    torch.manual_seed(seed)
    model = task.make_model().to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    recent: list[float] = []
    step = 0
    start = time.perf_counter()
    while step < total:
        for inputs, targets in task.train_batches(batch_size, generator):
            loss = task.loss(model(inputs.to(dev)), targets.to(dev))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise InputError(
                    f"training diverged: loss is {value} at step {step + 1}", hint="lower --lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            recent = (recent + [value])[-100:]
            report(progress, "train", step, total, "steps", loss=value)
            if step >= total:
                break
    seconds = time.perf_counter() - start
    model.eval()
    return TrainResult(
        model=model,
        steps=step,
        train_loss=sum(recent) / len(recent),
        test=evaluate_model(task, model, device=dev),
        seconds=seconds,
    )


def train_to_file(
    task: Task,
    output: str | Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train a model of ``task`` (``options`` as for :func:`train_task_model`) and save its
    state dict to ``output`` (``.pt`` or ``.safetensors``); returns a summary for reports.

    The destination is checked before training so a bad path fails in a second, not after it.
    """
    check_destination(output, force=force)
    result = train_task_model(task, progress=progress, **options)
    state = {name: tensor.detach().cpu() for name, tensor in result.model.state_dict().items()}
    path = save_checkpoint(state, output, force=force, metadata={"mlcompress.task": task.name})
    return {
        "output": str(path),
        "task": task.name,
        "parameters": sum(t.numel() for t in state.values()),
        "steps": result.steps,
        "seconds": result.seconds,
        "train_loss": result.train_loss,
        "test_loss": result.test.loss,
        "metric_name": result.test.metric_name,
        result.test.metric_name: result.test.metric,
        "test_examples": result.test.examples,
    }
