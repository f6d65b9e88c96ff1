"""Built-in task ``lenet5``: the Caffe LeNet-5 on an MNIST-format data set.

This is the network of the MIRACLE and Mean-KL papers (431,080 parameters): no activation after
the convolutions, as in Caffe's ``lenet_train_test.prototxt``, so results are comparable with
theirs. ``lenet5:conv_relu=yes`` is the variant most PyTorch LeNet-5s are: the same parameters
with a ReLU after each convolution. A checkpoint of one evaluated as the other loads without
complaint (the tensors are the same) and scores far lower (0.57-0.78 instead of 0.88 on two
models trained here), so the variant has to be named. Data: any directory of IDX files (MNIST, Fashion-MNIST, KMNIST); the default is
Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` when it is installed, because
nothing may be downloaded at run time.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from mlcompress.errors import InputError
from mlcompress.tasks.idx import find_idx, read_idx
from mlcompress.tasks.protocol import TensorTask

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class LeNet5(nn.Module):
    """conv 1->20 5x5, max-pool 2, conv 20->50 5x5, max-pool 2, fc 800->500, ReLU, fc 500->10;
    with ``conv_relu`` a ReLU after each convolution too (before or after the max-pool is the
    same function: both are monotone)."""

    def __init__(self, conv_relu: bool = False) -> None:
        super().__init__()
        self.conv_relu = conv_relu
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        if self.conv_relu:
            x = torch.relu(x)
        x = self.pool(self.conv2(x))
        if self.conv_relu:
            x = torch.relu(x)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def _to_unit_images(images: torch.Tensor) -> torch.Tensor:
    # Stored as uint8 [N, 28, 28]; the model wants float [N, 1, 28, 28] in [0, 1] (Caffe scales
    # by 1/256; 1/255 is the same up to 0.4%).
    return images.unsqueeze(1).float().div_(255.0)


def load_idx_directory(directory: Path) -> dict[str, torch.Tensor]:
    """The four MNIST-format arrays in ``directory``, checked for consistent sizes."""
    arrays = {}
    for key, stem in _FILES.items():
        path = find_idx(directory, stem)
        if path is None:
            raise InputError(
                f"{directory} has no {stem}[.gz]",
                hint="pass --data with a directory holding the four MNIST-format IDX files",
            )
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or images.dtype != torch.uint8:
            raise InputError(f"{directory}: {split} images must be uint8 28x28, got {tuple(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise InputError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
        if labels.numel() and int(labels.max()) > 9:
            raise InputError(f"{directory}: {split} labels must be 0..9")
    return arrays


_YES, _NO = ("yes", "true", "1"), ("no", "false", "0")


def _flag(name: str, value: bool | str | None) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    text = value.strip().lower()
    if text in _YES or text in _NO:
        return text in _YES
    raise InputError(f"task lenet5: {name} must be yes or no, got {value!r}")


def lenet5_task(data: Path | str | None = None, *, conv_relu: bool | str | None = None) -> TensorTask:
    """The ``lenet5`` task on the IDX files in ``data`` (default: installed Fashion-MNIST);
    ``conv_relu`` (``lenet5:conv_relu=yes``) puts a ReLU after each convolution."""
    relu = _flag("conv_relu", conv_relu)
    if data is None:
        if not DEFAULT_DATA.is_dir():
            raise InputError(
                f"no data for task lenet5: {DEFAULT_DATA} does not exist",
                hint="install it with `apt-get install dataset-fashion-mnist` or pass --data DIR"
                " with MNIST-format IDX files",
            )
        directory = DEFAULT_DATA
    else:
        directory = Path(data)
        if not directory.is_dir():
            raise InputError(
                f"data directory {directory} does not exist or is not a directory",
                hint="pass --data DIR with MNIST-format IDX files, or `apt-get install"
                " dataset-fashion-mnist` and omit --data",
            )
    arrays = load_idx_directory(directory)
    return TensorTask(
        name="lenet5:conv_relu=yes" if relu else "lenet5",  # the spec that builds it again
        model_factory=partial(LeNet5, conv_relu=relu),
        train_inputs=arrays["train_images"],
        train_targets=arrays["train_labels"].long(),
        test_inputs=arrays["test_images"],
        test_targets=arrays["test_labels"].long(),
        prepare=_to_unit_images,
        batch_size=128,
        lr=1e-3,
        epochs=3,
    )
