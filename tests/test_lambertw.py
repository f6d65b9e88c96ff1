import math

import pytest
import torch

from mlcompress.posterior.lambertw import BRANCH_POINT, lambertw

LN2 = math.log(2.0)


@pytest.mark.parametrize(
    "x, branch, expected",
    [
        (1.0, 0, 0.5671432904097838),  # the omega constant
        (math.e, 0, 1.0),
        (2 * LN2, 0, LN2),
        (-LN2 / 2, 0, -LN2),  # -ln2 * e^{-ln2} = -ln2/2
        (-LN2 / 2, -1, -2 * LN2),  # -2ln2 * e^{-2ln2} = -ln2/2
        (BRANCH_POINT, 0, -1.0),
        (BRANCH_POINT, -1, -1.0),
        (0.0, 0, 0.0),
        (-0.1, -1, -3.577152063957297),
    ],
)
def test_known_values(x, branch, expected):
    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 2e-7)):
        got = lambertw(torch.tensor([x], dtype=dtype), branch)
        assert got.dtype == dtype
        assert abs(got.item() - expected) <= tol * max(1.0, abs(expected)) + (1e-6 if x == BRANCH_POINT and dtype == torch.float32 else 0)


def test_inverse_principal_branch():
    x = torch.cat(
        [
            torch.linspace(BRANCH_POINT, 0.0, 2001, dtype=torch.float64)[1:-1],
            torch.logspace(-12, 300, 2000, dtype=torch.float64),
        ]
    )
    w = lambertw(x, 0)
    assert bool((w >= -1).all())
    rel = (w * torch.exp(w) - x).abs() / x.abs()
    assert rel.max().item() < 1e-13


def test_inverse_lower_branch():
    x = -torch.cat(
        [
            torch.linspace(1e-3, -BRANCH_POINT, 2000, dtype=torch.float64),
            torch.logspace(-300, -3, 2000, dtype=torch.float64),
        ]
    )
    w = lambertw(x, -1)
    assert bool((w <= -1).all())
    rel = (w * torch.exp(w) - x).abs() / x.abs()
    assert rel.max().item() < 5e-13


def test_float32_matches_float64():
    x = torch.linspace(BRANCH_POINT + 1e-3, 50.0, 5000, dtype=torch.float64)
    w64 = lambertw(x, 0)
    w32 = lambertw(x.float(), 0).double()
    assert ((w32 - w64).abs() / w64.abs().clamp(min=1e-3)).max().item() < 1e-6


def test_out_of_domain_is_nan():
    assert torch.isnan(lambertw(torch.tensor([-0.5], dtype=torch.float64), 0)).all()
    assert torch.isnan(lambertw(torch.tensor([0.5, -0.5], dtype=torch.float64), -1)).all()
    with pytest.raises(ValueError):
        lambertw(torch.tensor([1.0]), 2)


def test_gradcheck_both_branches():
    x0 = torch.tensor([-0.3, -0.1, 0.0, 0.4, 2.0, 30.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lambertw(t, 0), (x0,))
    xm = torch.tensor([-0.35, -0.2, -0.05, -1e-4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lambertw(t, -1), (xm,))


def test_gradient_formula():
    x = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    w = lambertw(x)
    (g,) = torch.autograd.grad(w.sum(), x)
    assert abs(g.item() - w.item() / (x.item() * (1 + w.item()))) < 1e-14
