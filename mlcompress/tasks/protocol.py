"""What a task is: a model architecture bundled with its data, loss and metric.

Compression methods that look at data (variational training, L2 calibration, fine-tuning after
pruning, evaluation) all need the same four things -- a way to build the model a checkpoint
belongs to, training and test examples, the loss the model was trained with, and the metric users
care about. A task bundles them so every command can take ``--task NAME`` and nothing else.

:class:`Task` is the protocol (structural: any object with these members works, no subclassing
needed). :class:`TensorTask` implements it over in-memory tensors, which covers the built-ins and
most user plug-ins: a plug-in factory usually just returns ``TensorTask(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from mlcompress.errors import InputError

Batch = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Task(Protocol):
    """A model architecture plus data, loss and metric.

    Members (all required):

    * ``name`` -- short identifier, shown in reports and stored in file metadata.
    * ``input_shape`` -- shape of one model input, without the batch dimension.
    * ``metric_name`` -- what :meth:`metric` measures (``"accuracy"`` for the built-ins).
    * ``batch_size``, ``lr``, ``epochs`` -- sensible training defaults for ``mlcompress train``.
    * ``make_model()`` -- a freshly initialised model (uses torch's global RNG, so seeding
      ``torch.manual_seed`` first makes it reproducible).
    * ``train_batches(batch_size, generator)`` -- one epoch of shuffled ``(inputs, targets)``
      batches, ready to feed to the model; shuffling draws only from ``generator``.
    * ``test_batches(batch_size)`` -- the held-out set, in a fixed order.
    * ``loss(outputs, targets)`` -- mean loss over the batch (a differentiable scalar).
    * ``metric(outputs, targets)`` -- mean metric over the batch (a scalar); evaluation weights
      batches by their size, so the metric must be an average of per-example values.
    * ``calibration(n)`` -- ``n`` model inputs from the training set, the same ones every call,
      for post-training methods that need a small unlabelled sample.

    Optional members (read through :func:`higher_is_better` and :func:`summarized_metric`, which
    supply the defaults, so tasks written before them keep working):

    * ``higher_is_better`` -- the metric's direction (default True, as for accuracy; False for
      perplexity).
    * ``summarize_metric(mean)`` -- the reported metric from the test-set mean of :meth:`metric`
      (default: the mean itself). Perplexity needs it: it is ``exp`` of the mean per-token
      cross-entropy, not a mean of per-batch perplexities, so the ``lm`` task's ``metric`` is
      the cross-entropy and ``summarize_metric`` is ``exp``.
    """

    name: str
    input_shape: tuple[int, ...]
    metric_name: str
    batch_size: int
    lr: float
    epochs: int

    def make_model(self) -> nn.Module: ...

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]: ...

    def test_batches(self, batch_size: int) -> Iterator[Batch]: ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def calibration(self, n: int) -> torch.Tensor: ...


def higher_is_better(task: Task) -> bool:
    """Whether a larger metric of ``task`` is better (tasks without the member: yes)."""
    return bool(getattr(task, "higher_is_better", True))


def summarized_metric(task: Task, mean: float) -> float:
    """``task``'s reported metric for the test-set mean ``mean`` of its :meth:`~Task.metric`."""
    summarize = getattr(task, "summarize_metric", None)
    return float(mean) if summarize is None else float(summarize(mean))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max class equals the target."""
    return (outputs.argmax(dim=-1) == targets).float().mean()


def _identity(inputs: torch.Tensor) -> torch.Tensor:
    return inputs


def _same(mean: float) -> float:
    return mean


@dataclass
class TensorTask:
    """A :class:`Task` over tensors held in memory: classification with cross-entropy by default.

    ``prepare`` maps stored inputs to model inputs one batch at a time; it lets big data sets stay
    compact in memory (Fashion-MNIST as uint8 is 47 MB, as float32 it would be 188 MB).
    """

    name: str
    model_factory: Callable[[], nn.Module]
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    prepare: Callable[[torch.Tensor], torch.Tensor] = _identity
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    metric_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = accuracy
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    metric_summary: Callable[[float], float] = _same
    batch_size: int = 128
    lr: float = 1e-3
    epochs: int = 3
    input_shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        for split, inputs, targets in (
            ("training", self.train_inputs, self.train_targets),
            ("test", self.test_inputs, self.test_targets),
        ):
            if len(inputs) == 0:
                raise InputError(f"task {self.name!r} has an empty {split} set")
            if len(inputs) != len(targets):
                raise InputError(
                    f"task {self.name!r}: {len(inputs)} {split} inputs but {len(targets)} targets"
                )
        if self.train_inputs.shape[1:] != self.test_inputs.shape[1:]:
            raise InputError(
                f"task {self.name!r}: training inputs have shape {tuple(self.train_inputs.shape[1:])}"
                f" but test inputs {tuple(self.test_inputs.shape[1:])}"
            )
        self.input_shape = tuple(self.prepare(self.train_inputs[:1]).shape[1:])

    def make_model(self) -> nn.Module:
        return self.model_factory()

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        order = torch.randperm(len(self.train_inputs), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield self.prepare(self.train_inputs[index]), self.train_targets[index]

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self.test_inputs), batch_size):
            stop = start + batch_size
            yield self.prepare(self.test_inputs[start:stop]), self.test_targets[start:stop]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(outputs, targets)

    def metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.metric_fn(outputs, targets)

    def summarize_metric(self, mean: float) -> float:
        return self.metric_summary(mean)

    def calibration(self, n: int) -> torch.Tensor:
        """The first ``n`` training inputs of a fixed (seed 0) shuffle: a class-balanced-ish
        sample that is identical on every call and machine."""
        if n <= 0:
            raise InputError(f"calibration set size must be positive, got {n}")
        if n > len(self.train_inputs):
            raise InputError(
                f"task {self.name!r} has {len(self.train_inputs)} training examples;"
                f" cannot take {n} for calibration"
            )
        order = torch.randperm(len(self.train_inputs), generator=torch.Generator().manual_seed(0))
        return self.prepare(self.train_inputs[order[:n]])
