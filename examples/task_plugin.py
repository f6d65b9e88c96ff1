"""An example task plug-in: copy this file, change the model and the data, and pass
``--task task_plugin:make_task`` to any mlcompress command that takes a task.

    PYTHONPATH=examples mlcompress train --task task_plugin:make_task -o wine.pt
    PYTHONPATH=examples mlcompress fit-posterior --task task_plugin:make_task --init wine.pt \
        --bits-per-block 12 --bits-per-weight 1 --min-rec-numel 256 --steps 500 -o wine.q.safetensors
    PYTHONPATH=examples mlcompress eval --task task_plugin:make_task wine.q.safetensors

A factory returns any object with the members of ``mlcompress.tasks.Task``; the easiest is a
``TensorTask`` over in-memory tensors, as here. mlcompress calls the factory with ``data=DIR``
when the user passes ``--data DIR`` and with no arguments otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlcompress.errors import InputError
from mlcompress.tasks import TensorTask


class WineNet(nn.Module):
    """13 chemical measurements -> 3 cultivars."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(13, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def make_task(data: Path | None = None) -> TensorTask:
    """The wine data set bundled with scikit-learn (no download), standardised, fixed split."""
    if data is not None:
        raise InputError("task_plugin:make_task has its own data; drop --data")
    from sklearn.datasets import load_wine

    bunch = load_wine()
    x = np.asarray(bunch.data, dtype=np.float32)
    x = (x - x.mean(0)) / x.std(0)  # the features span five orders of magnitude
    inputs = torch.from_numpy(x)
    targets = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(inputs)))
    train, test = order[:140], order[140:]
    return TensorTask(
        name="wine-mlp",
        model_factory=WineNet,
        train_inputs=inputs[train],
        train_targets=targets[train],
        test_inputs=inputs[test],
        test_targets=targets[test],
        batch_size=32,
        lr=1e-2,
        epochs=30,
    )
