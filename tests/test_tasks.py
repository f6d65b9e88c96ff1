"""Tasks: built-ins, plug-ins, state-dict checks, IDX reading, training and evaluation."""

from __future__ import annotations

import gzip
import struct
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from single_thread import one_thread  # noqa: F401  (autouse fixture)

from mlcompress.errors import CheckpointError, InputError, UsageError
from mlcompress.tasks import (
    Task,
    TensorTask,
    check_state_dict_fits,
    evaluate_model,
    get_task,
    load_task_model,
    train_task_model,
)
from mlcompress.tasks.idx import read_idx
from mlcompress.tasks.lenet5 import LeNet5, lenet5_task


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def _tiny_mnist_dir(root: Path, n_train: int = 64, n_test: int = 32) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    _write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train, dtype=np.uint8))
    # Uncompressed and MNIST's original dotted spelling must work too.
    _write_idx(root / "t10k-images.idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), compress=False)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test, dtype=np.uint8))
    return root


def test_lenet5_is_the_caffe_network_with_431080_parameters():
    model = LeNet5()
    assert sum(p.numel() for p in model.parameters()) == 431_080
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_lenet5_conv_relu_variant_has_the_same_tensors_and_another_function(tmp_path):
    """``lenet5:conv_relu=yes`` loads the same state dict and differs exactly by the ReLUs after
    the convolutions; its name is the spec that builds it again, and a bad value is one line."""
    import pickle

    torch.manual_seed(0)
    plain, relu = LeNet5(), LeNet5(conv_relu=True)
    relu.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 28, 28)
    assert not torch.allclose(plain(x), relu(x))
    manual = torch.relu(plain.pool(plain.conv2(torch.relu(plain.pool(plain.conv1(x)))))).flatten(1)
    assert torch.allclose(relu(x), plain.fc2(torch.relu(plain.fc1(manual))), atol=1e-6)
    data = _tiny_mnist_dir(tmp_path / "data")
    task = get_task("lenet5:conv_relu=yes", data=data)
    assert task.name == "lenet5:conv_relu=yes" and get_task("lenet5:conv_relu=no", data=data).name == "lenet5"
    model = task.make_model()
    assert model.conv_relu and sum(p.numel() for p in model.parameters()) == 431_080
    assert pickle.loads(pickle.dumps(task.model_factory))().conv_relu  # worker processes rebuild it
    assert get_task(task.name, data=data).name == task.name
    with pytest.raises(InputError, match="conv_relu must be yes or no"):
        get_task("lenet5:conv_relu=maybe", data=data)


def test_lenet5_reads_an_idx_directory(tmp_path):
    task = lenet5_task(_tiny_mnist_dir(tmp_path / "data"))
    assert isinstance(task, Task)
    assert task.input_shape == (1, 28, 28)
    inputs, targets = next(task.test_batches(10))
    assert inputs.dtype == torch.float32 and inputs.shape == (10, 1, 28, 28)
    assert 0.0 <= float(inputs.min()) and float(inputs.max()) <= 1.0
    assert targets.dtype == torch.int64
    assert sum(len(t) for _, t in task.test_batches(10)) == 32


def test_idx_reader_round_trips_dtypes(tmp_path):
    for dtype in ("u1", "i1", ">i4", ">f4"):
        array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        _write_idx(tmp_path / "a.idx", array, compress=dtype == ">i4")
        out = read_idx(tmp_path / "a.idx")
        np.testing.assert_array_equal(out.numpy(), array)


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    _write_idx(tmp_path / "a.idx", np.zeros((4, 28, 28), dtype=np.uint8), compress=False)
    raw = (tmp_path / "a.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(raw[:-5])
    with pytest.raises(InputError, match="needs"):
        read_idx(tmp_path / "a.idx")
    (tmp_path / "b.idx").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(InputError, match="not an IDX"):
        read_idx(tmp_path / "b.idx")


def test_missing_data_directory_says_how_to_get_fashion_mnist(tmp_path, monkeypatch):
    with pytest.raises(InputError) as info:
        get_task("lenet5", data=tmp_path / "nope")
    assert "apt-get install dataset-fashion-mnist" in info.value.one_line()
    assert "--data" in info.value.one_line()
    import mlcompress.tasks.lenet5 as lenet5_module

    monkeypatch.setattr(lenet5_module, "DEFAULT_DATA", tmp_path / "absent")
    with pytest.raises(InputError) as info:
        get_task("lenet5")
    assert "apt-get install dataset-fashion-mnist" in info.value.one_line()
    assert "--data" in info.value.one_line()


def test_directory_without_idx_files_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="train-images-idx3-ubyte"):
        get_task("lenet5", data=tmp_path)


def test_unknown_task_lists_the_builtins():
    with pytest.raises(InputError) as info:
        get_task("resnet999")
    assert "lenet5" in info.value.one_line() and "mlp-digits" in info.value.one_line()
    assert "package.module:factory" in info.value.one_line()


def test_digits_split_is_fixed_and_disjoint():
    a, b = get_task("mlp-digits"), get_task("mlp-digits")
    assert torch.equal(a.test_inputs, b.test_inputs)
    assert len(a.train_inputs) == 1437 and len(a.test_inputs) == 360
    train_rows = {tuple(row.tolist()) for row in a.train_inputs}
    overlap = sum(tuple(row.tolist()) in train_rows for row in a.test_inputs)
    assert overlap < 5  # the digits set has a couple of exact duplicate images, nothing more
    with pytest.raises(InputError, match="drop --data"):
        get_task("mlp-digits", data="/tmp")


def test_calibration_is_deterministic_and_bounded():
    task = get_task("mlp-digits")
    assert torch.equal(task.calibration(50), task.calibration(50))
    assert task.calibration(50).shape == (50, 64)
    with pytest.raises(InputError):
        task.calibration(0)
    with pytest.raises(InputError):
        task.calibration(10_000)


def test_train_is_deterministic_and_learns():
    task = get_task("mlp-digits")
    a = train_task_model(task, steps=150, seed=3, device="cpu")
    b = train_task_model(task, steps=150, seed=3, device="cpu")
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    assert a.steps == 150
    assert a.test.metric > 0.85  # chance is 0.1
    again = evaluate_model(task, a.model, device="cpu")
    assert again.metric == pytest.approx(a.test.metric)
    assert again.examples == 360


def test_train_rejects_bad_lengths_and_reports_divergence():
    task = get_task("mlp-digits")
    with pytest.raises(UsageError):
        train_task_model(task, steps=5, epochs=1)
    with pytest.raises(UsageError):
        train_task_model(task, steps=0)
    with pytest.raises(InputError, match="diverged"):
        train_task_model(task, steps=50, lr=1e30, device="cpu")


def test_check_state_dict_fits_names_and_shapes():
    task = get_task("mlp-digits")
    good = task.make_model().state_dict()
    check_state_dict_fits(task, good)
    check_state_dict_fits(task, {k: v.half() for k, v in good.items()})  # dtype may differ

    missing = {k: v for k, v in good.items() if k != "fc2.bias"}
    with pytest.raises(CheckpointError, match="missing fc2.bias"):
        check_state_dict_fits(task, missing)
    extra = dict(good, **{"fc3.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected fc3.weight"):
        check_state_dict_fits(task, extra)
    reshaped = dict(good, **{"fc1.weight": torch.zeros(32, 64)})
    with pytest.raises(CheckpointError, match=r"fc1.weight is \(32, 64\) not \(64, 64\)"):
        check_state_dict_fits(task, reshaped)
    with pytest.raises(CheckpointError, match="mlp-digits"):
        check_state_dict_fits(task, LeNet5().state_dict())


def test_load_task_model_casts_and_evaluates():
    task = get_task("mlp-digits")
    torch.manual_seed(0)
    state = {k: v.double() for k, v in task.make_model().state_dict().items()}
    model = load_task_model(task, state)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training


def test_plugin_task_is_loaded_and_validated(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from mlcompress.tasks import TensorTask

            def make(data=None):
                g = torch.Generator().manual_seed(0)
                x = torch.randn(40, 3, generator=g)
                y = (x[:, 0] > 0).long()
                return TensorTask(name="toy", model_factory=lambda: nn.Linear(3, 2),
                                  train_inputs=x[:30], train_targets=y[:30],
                                  test_inputs=x[30:], test_targets=y[30:])

            def no_data():
                return make()

            def broken():
                return object()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("my_plugin:make")
    assert task.name == "toy" and task.input_shape == (3,)
    assert get_task("my_plugin:make", data=tmp_path).name == "toy"
    with pytest.raises(InputError, match="takes no data"):
        get_task("my_plugin:no_data", data=tmp_path)
    with pytest.raises(InputError, match="without name"):
        get_task("my_plugin:broken")
    with pytest.raises(InputError, match="no callable"):
        get_task("my_plugin:absent")
    with pytest.raises(InputError, match="cannot import"):
        get_task("no_such_module_xyz:make")
    sys.modules.pop("my_plugin", None)


def test_tensor_task_validates_its_data():
    with pytest.raises(InputError, match="empty"):
        TensorTask("t", lambda: torch.nn.Linear(1, 1), torch.zeros(0, 1), torch.zeros(0),
                   torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(InputError, match="targets"):
        TensorTask("t", lambda: torch.nn.Linear(1, 1), torch.zeros(3, 1), torch.zeros(2),
                   torch.zeros(2, 1), torch.zeros(2))
