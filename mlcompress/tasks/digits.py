"""Built-in task ``mlp-digits``: a small MLP on scikit-learn's bundled 8x8 digits.

It needs nothing outside pip (the 1,797 images ship inside scikit-learn), trains in seconds on
a CPU, and is small enough (4,810 parameters) for end-to-end tests of every compression method.
The train/test split is fixed: a seed-0 permutation, the last 360 images held out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlcompress.errors import InputError
from mlcompress.tasks.protocol import TensorTask

TEST_SIZE = 360


class DigitsMLP(nn.Module):
    """64 -> 64 (ReLU) -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def digits_task(data: Path | str | None = None) -> TensorTask:
    """The ``mlp-digits`` task. It has no external data, so ``data`` must be left unset."""
    if data is not None:
        raise InputError("task mlp-digits uses scikit-learn's bundled digits; drop --data")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError(
            "task mlp-digits needs scikit-learn", hint="pip install scikit-learn"
        ) from None
    bunch = load_digits()
    # Pixel values are 0..16; scale to [0, 1] so default learning rates behave.
    inputs = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    targets = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(inputs)))
    train, test = order[:-TEST_SIZE], order[-TEST_SIZE:]
    return TensorTask(
        name="mlp-digits",
        model_factory=DigitsMLP,
        train_inputs=inputs[train],
        train_targets=targets[train],
        test_inputs=inputs[test],
        test_targets=targets[test],
        batch_size=64,
        lr=3e-3,
        epochs=40,
    )
