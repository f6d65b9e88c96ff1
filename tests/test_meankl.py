import math

import pytest
import torch

from mlcompress.errors import InputError
from mlcompress.posterior.meankl import (
    NATS_PER_BIT,
    kl_gaussian,
    mean_bound,
    mean_from_shift,
    meankl_log_sigma,
    meankl_sigma,
)

D = torch.float64


def test_kl_gaussian_closed_form():
    # KL(N(1, 0.5^2) || N(0, 1)) = log 2 + (0.25 + 1)/2 - 1/2
    got = kl_gaussian(torch.tensor(1.0, dtype=D), torch.tensor(0.5, dtype=D), torch.tensor(0.0, dtype=D), torch.tensor(1.0, dtype=D))
    assert abs(got.item() - (math.log(2) + 0.625 - 0.5)) < 1e-15
    assert kl_gaussian(*(torch.tensor(v, dtype=D) for v in (0.3, 2.0, 0.3, 2.0))).item() == 0.0


@pytest.mark.parametrize("branch", [0, -1])
def test_meankl_hits_the_budget(branch):
    g = torch.Generator().manual_seed(0)
    kappa = torch.rand(1000, generator=g, dtype=D) * 5 + 1e-3
    rho = torch.rand(1000, generator=g, dtype=D) + 0.1
    nu = torch.randn(1000, generator=g, dtype=D) * 0.1
    frac = torch.rand(1000, generator=g, dtype=D) * 2 - 1
    mu = nu + frac * mean_bound(kappa, rho)
    sigma = meankl_sigma(mu, kappa, nu, rho, branch=branch)
    assert torch.allclose(kl_gaussian(mu, sigma, nu, rho), kappa, rtol=1e-10, atol=1e-12)
    if branch == 0:
        assert bool((sigma <= rho * (1 + 1e-12)).all())
    else:
        assert bool((sigma >= rho * (1 - 1e-12)).all())


def test_mean_on_bound_gives_prior_std():
    kappa = torch.tensor([0.5, 2.0], dtype=D)
    rho = torch.tensor([1.0, 0.3], dtype=D)
    mu = mean_bound(kappa, rho)
    assert torch.allclose(meankl_sigma(mu, kappa, torch.zeros(2, dtype=D), rho), rho)


def test_large_budget_log_sigma_is_exact():
    # 60 bits on one weight: exp(-c) underflows float32, log sigma must not.
    kappa = torch.tensor([60 * NATS_PER_BIT], dtype=torch.float32)
    ls = meankl_log_sigma(torch.zeros(1), kappa, torch.zeros(1), torch.ones(1))
    # s - log s = 2 kappa + 1 with s ~ 0: log s = -(2 kappa + 1) (+ s, negligible)
    assert abs(ls.item() - (-(2 * kappa.item() + 1) / 2)) < 1e-5


def test_violated_bound_is_a_clear_error():
    with pytest.raises(InputError, match="outside"):
        meankl_sigma(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    # non-strict clamps onto the bound: sigma = rho
    s = meankl_sigma(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), strict=False)
    assert abs(s.item() - 1.0) < 1e-6


def test_shift_parameterization_and_gradients():
    logits = torch.randn(50, dtype=D, requires_grad=True)
    gamma = torch.randn(50, dtype=D, requires_grad=True)
    budget = 20 * NATS_PER_BIT
    kappa = budget * torch.softmax(logits, 0)
    nu, rho = torch.zeros(50, dtype=D), torch.full((50,), 0.1, dtype=D)
    mu = mean_from_shift(nu, rho, kappa, gamma)
    sigma = meankl_sigma(mu, kappa, nu, rho)
    assert abs(kl_gaussian(mu, sigma, nu, rho).sum().item() - budget) < 1e-10
    (sigma.sum() + mu.sum()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(gamma.grad).all()
    assert torch.autograd.gradcheck(
        lambda m, k: meankl_sigma(m, k, nu[:3], rho[:3]),
        (torch.tensor([0.01, -0.02, 0.0], dtype=D, requires_grad=True), torch.tensor([0.5, 1.0, 2.0], dtype=D, requires_grad=True)),
    )
