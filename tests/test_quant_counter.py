"""The differentiable counter and the L² transform: convergence, rate accuracy, gradients."""

from __future__ import annotations

import pytest
import torch

from mlcompress.codecs import entropy
from mlcompress.errors import UsageError
from mlcompress.codecs.quant import l2
from mlcompress.quant import counter


@pytest.fixture(scope="module")
def trained_digits():
    from mlcompress.tasks import get_task, train_task_model

    return train_task_model(get_task("mlp-digits"), epochs=10, seed=0, device="cpu").model


@pytest.mark.parametrize("kernel", counter.KERNELS)
def test_soft_counts_converge_to_hard_histogram(kernel):
    torch.manual_seed(0)
    c = torch.randn(5000, dtype=torch.float64) * 3
    hard_levels = torch.round(c).long()
    errors = []
    for delta in (0.4, 0.1, 0.01, 1e-4):
        counts, lo = counter.soft_counts(c, delta, kernel)
        hard = torch.bincount(hard_levels - lo, minlength=counts.numel()).double()
        assert abs(float(counts.sum()) - c.numel()) < 1e-6  # mass is conserved
        errors.append(float((counts - hard).abs().sum()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1.0 and errors[0] > 50


def test_rate_converges_to_empirical_entropy():
    torch.manual_seed(1)
    c = torch.randn(4000, dtype=torch.float64) * 2
    exact = counter.hard_entropy_bits(torch.round(c))
    assert abs(float(counter.rate_bits(c, delta=1e-5)) - exact) < 1e-3 * exact


def test_rate_tracks_constriction_on_trained_weights(trained_digits):
    """Estimate within 5% of the ANS coder's real size, for every kernel and several step sizes."""
    w = trained_digits.fc1.weight.detach()
    for div in (256, 64, 16, 8):
        e, s = l2.initial_edge_step(w)
        e, s = e * 256 / div * 1.5, s * 256 / div
        c = l2.transform(w, torch.tensor(e), torch.tensor(s))
        actual = entropy.coded_bits(l2.levels(w, e, s).numpy())
        for kernel in counter.KERNELS:
            est = float(counter.rate_bits(c, kernel=kernel))
            assert abs(est / actual - 1) < 0.05, (div, kernel, est, actual)


def test_rate_is_differentiable_and_pushes_towards_fewer_levels():
    torch.manual_seed(2)
    w = torch.randn(2000) * 0.1
    log_s = torch.tensor(-4.0, requires_grad=True)
    s = log_s.exp()
    rate = counter.rate_bits(l2.transform(w, s, s))
    rate.backward()
    assert log_s.grad is not None and float(log_s.grad) < 0  # a larger step lowers the rate


def test_unknown_kernel():
    with pytest.raises(UsageError, match="kernel"):
        counter.rate_bits(torch.randn(10), kernel="gauss")


def test_l2_transform_levels_and_reconstruction():
    e, s = 0.3, 0.2
    w = torch.tensor([0.0, 0.29, -0.3, 0.31, 0.49, 0.51, -0.75, 1.0])
    n = l2.levels(w, e, s)
    assert n.tolist() == [0, 0, 0, 1, 1, 2, -3, 4]
    rec = l2.dequantize_levels(n, e, s, torch.float64)
    e32, s32 = float(torch.tensor(e)), float(torch.tensor(s))
    assert rec.tolist() == [0.0, 0.0, 0.0, e32 + 0.5 * s32, e32 + 0.5 * s32, e32 + 1.5 * s32, -(e32 + 2.5 * s32), e32 + 3.5 * s32]


def test_fake_quantize_matches_hard_path_and_passes_gradients():
    torch.manual_seed(3)
    w = (torch.randn(300) * 0.2).requires_grad_()
    e = torch.tensor(0.1, requires_grad=True)
    s = torch.tensor(0.07, requires_grad=True)
    w_hat, c = l2.fake_quantize(w, e, s)
    ef, sf = float(e.detach()), float(s.detach())
    hard = l2.dequantize_levels(l2.levels(w, ef, sf), ef, sf)
    assert torch.allclose(w_hat.detach(), hard, atol=1e-6)
    w_hat.pow(2).sum().backward()
    assert w.grad is not None and bool((w.grad != 0).any()) and e.grad is not None and s.grad is not None
