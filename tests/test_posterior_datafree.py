"""The data-free posterior: exact block budgets, the mean constraint, distortion-optimal shape."""

import math

import pytest
import torch

from mlcompress.errors import CodecError
from mlcompress.posterior.datafree import datafree_posterior
from mlcompress.posterior.meankl import NATS_PER_BIT, kl_gaussian
from mlcompress.codecs.rec.layout import BlockLayout


def _blocks(layout: BlockLayout, values: torch.Tensor) -> torch.Tensor:
    """Per-block sums of a flat per-weight quantity."""
    block_of = torch.repeat_interleave(torch.arange(layout.num_blocks), layout.block_sizes())
    return torch.zeros(layout.num_blocks, dtype=torch.float64).index_add_(0, block_of, values[layout.flat_index()].double())


@pytest.mark.parametrize("bits, blocks", [(8, 50), (16, 300), (20, 40)])
def test_every_block_meets_its_budget_exactly(bits, blocks):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 100, generator=g) * 0.1
    w[0, :5] = 3.0  # a few weights far in the tail
    layout = BlockLayout(w.numel(), blocks, seed=4)
    mean, std, rho, kl = datafree_posterior(w, layout, bits)
    assert rho == pytest.approx(float(torch.sqrt((w.double() ** 2).mean())))
    assert torch.allclose(kl, torch.full_like(kl, bits * NATS_PER_BIT), rtol=1e-9)
    # recomputed from the float32 mean/std actually returned
    per_weight = kl_gaussian(mean.double().flatten(), std.double().flatten(), torch.zeros(()), torch.tensor(rho))
    assert torch.allclose(_blocks(layout, per_weight), kl, rtol=1e-4)
    assert bool((std > 0).all()) and bool((std <= rho * (1 + 1e-6)).all())


def test_means_shrink_when_the_budget_cannot_hold_them():
    # 1 bit per 100 weights: the means cannot stay put; they move toward the prior mean (0)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(100, 100, generator=g)
    layout = BlockLayout(w.numel(), 100, seed=2)
    mean, std, rho, kl = datafree_posterior(w, layout, 1)
    ratio = (mean.flatten() / w.flatten())
    assert bool((ratio >= 0).all()) and bool((ratio < 0.5).all())
    # a generous budget (1.6 bits/weight) keeps means near the weights (alpha ~ 1 - D) and the
    # expected squared error near the Gaussian rate-distortion bound 2^(-2R) = 0.11 rho^2
    layout = BlockLayout(w.numel(), 1000, seed=2)
    mean, std, rho, kl = datafree_posterior(w, layout, 16)
    assert bool(((mean.flatten() / w.flatten()) > 0.7).all())
    distortion = (((mean - w) ** 2 + std**2).mean() / rho**2).item()
    assert 0.11 < distortion < 0.2


def test_common_sigma_per_block_and_golden_section_optimum():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2000, generator=g).reshape(40, 50)
    layout = BlockLayout(w.numel(), 20, seed=1)
    mean, std, rho, _ = datafree_posterior(w, layout, 12)
    slots = layout.block_index_matrix()
    for b in range(3):
        s = std.flatten()[slots[b]]
        assert (s.max() - s.min()).item() <= 1e-6 * s.max().item()
        alpha = (mean.flatten()[slots[b]] / w.flatten()[slots[b]]).double()
        assert (alpha.max() - alpha.min()).item() < 1e-5
    # perturbing alpha of block 0 does not lower its expected error (it is the optimum)
    from mlcompress.posterior.datafree import _variance_ratio

    d = float(slots.shape[1])
    x = w.flatten()[slots[0]].double()
    m = float((x * x).sum() / (2 * rho * rho))
    a0 = float((mean.flatten()[slots[0]][0] / x[0]))

    def err(a):
        s = _variance_ratio(12 * NATS_PER_BIT, torch.tensor([a * a * m], dtype=torch.float64), torch.tensor([d], dtype=torch.float64))
        return float(d * s + 2 * m * (1 - a) ** 2)

    assert err(a0) <= min(err(a0 - 0.01), err(min(a0 + 0.01, math.sqrt(12 * NATS_PER_BIT / m) - 1e-9))) + 1e-9


def test_unusable_tensors_refused():
    layout = BlockLayout(10, 2, seed=0)
    with pytest.raises(CodecError, match="all-zero"):
        datafree_posterior(torch.zeros(10), layout, 8)
    with pytest.raises(CodecError, match="NaN or Inf"):
        datafree_posterior(torch.tensor([1.0] * 9 + [float("nan")]), layout, 8)
