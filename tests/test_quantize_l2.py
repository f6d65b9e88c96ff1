"""L² end to end on mlp-digits, and the quantize/prune library entry points (short runs)."""

from __future__ import annotations

import pytest
import torch

from mlcompress.container import open_mrc
from mlcompress.errors import InputError
from mlcompress.quant.calibrate import L2Config, l2_compress
from mlcompress.quant.plan import uniform_plan, write_plan
from mlcompress.quant.quantize import dequantize_uniform
from mlcompress.tasks import evaluate_model, get_task, load_task_model, train_task_model


@pytest.fixture(scope="module")
def digits():
    task = get_task("mlp-digits")
    model = train_task_model(task, epochs=40, seed=0, device="cpu").model.cpu().eval()
    return task, model


@pytest.fixture(scope="module")
def l2_run(digits, tmp_path_factory):
    task, model = digits
    config = L2Config(target_ratio=11.0, rounds=2, transform_steps=100, weight_steps=60, remeasure_every=40)
    result = l2_compress(model, task.calibration(500), config)
    path = tmp_path_factory.mktemp("l2") / "digits.mrc"
    size = write_plan(path, result.tensors, result.plan, {})
    acc = evaluate_model(task, load_task_model(task, result.dequantized), device="cpu").metric
    return result, size, acc, path


def test_l2_decodes_exactly_to_the_evaluated_weights(l2_run):
    result, _, _, path = l2_run
    decoded = open_mrc(path).tensors()
    assert decoded.keys() == result.dequantized.keys()
    for name, t in result.dequantized.items():
        assert torch.equal(decoded[name], t), name


def test_l2_meets_target_and_prunes(l2_run):
    result, size, _, _ = l2_run
    assert size.fp32_ratio >= 11.0
    assert result.sparsity > 0.2  # the dead zone prunes


def test_l2_beats_data_free_at_equal_accuracy(digits, l2_run):
    """L² reaches a higher file ratio than any data-free bit width that is at least as accurate."""
    task, model = digits
    _, l2_size, l2_acc, _ = l2_run
    base = evaluate_model(task, model, device="cpu").metric
    assert l2_acc >= base - 0.05  # a short run at 11x (data-free 3-bit: ~9x); still usable
    tensors = {k: v.detach() for k, v in model.state_dict().items()}
    best_uniform = 0.0
    for bits in (8, 6, 5, 4, 3, 2, 1):
        plan = uniform_plan(tensors, bits)
        acc = evaluate_model(task, load_task_model(task, dequantize_uniform(tensors, plan)), device="cpu").metric
        if acc >= l2_acc:
            best_uniform = max(best_uniform, write_plan(None, tensors, plan, {}).fp32_ratio)
    assert l2_size.fp32_ratio > best_uniform


def test_empty_calibration_set(digits):
    _, model = digits
    with pytest.raises(InputError, match="calibration set is empty"):
        l2_compress(model, torch.empty(0, 64), L2Config(rounds=1, transform_steps=1, weight_steps=1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_l2_on_cuda_decodes_exactly(digits, tmp_path):
    task, model = digits
    config = L2Config(target_ratio=5.0, rounds=1, transform_steps=20, weight_steps=20)
    result = l2_compress(model, task.calibration(100), config, device="cuda")
    path = tmp_path / "cuda.mrc"
    write_plan(path, result.tensors, result.plan, {})
    decoded = open_mrc(path).tensors()
    for name, t in result.dequantized.items():
        assert t.device.type == "cpu" and torch.equal(decoded[name], t), name
