"""The Mean-KL map: a weight's posterior from its mean and its own KL budget.

MIRACLE codes a sample of a diagonal Gaussian posterior ``q = N(mu, sigma^2)`` against a coding
prior ``p = N(nu, rho^2)``; the file costs about ``KL(q || p)`` nats per block. The Mean-KL
parameterization (arXiv 2307.07816; docs/rec.md) gives each weight its mean ``mu`` and its KL
``kappa`` (nats) instead of ``(mu, sigma)``, so a block's budget holds by construction. Solving
``KL(N(mu, sigma^2) || N(nu, rho^2)) = kappa`` for sigma: with ``s = sigma^2 / rho^2`` and
``c = 2 kappa + 1 - (mu - nu)^2 / rho^2`` the equation is ``s - log s = c``, so
``s = -W(-exp(-c))``. Branch ``W_0`` gives ``s <= 1`` (``sigma <= rho``, the usual choice: the
posterior is narrower than the prior), ``W_{-1}`` gives ``s >= 1``. A solution exists iff
``c >= 1``, i.e. ``|mu - nu| <= rho * sqrt(2 kappa)`` (:func:`mean_bound`).

All KLs here are in nats; a budget of ``C`` bits is ``C * ln 2`` nats. Every function is
elementwise with broadcasting, differentiable, and works on any device.
"""

from __future__ import annotations

import math

import torch

from mlcompress.errors import InputError
from mlcompress.posterior.lambertw import lambertw

__all__ = [
    "kl_gaussian",
    "mean_bound",
    "meankl_sigma",
    "meankl_log_sigma",
    "mean_from_shift",
    "NATS_PER_BIT",
]

#: ``ln 2``: multiply bits by this to get nats.
NATS_PER_BIT: float = math.log(2.0)

# Relative slack allowed on the existence condition c >= 1 before it counts as a violation: a mean
# placed exactly on the bound (tanh -> 1, or the data-free construction) lands a few ulps outside.
_BOUND_SLACK = 1e-5


def kl_gaussian(
    q_mu: torch.Tensor, q_sigma: torch.Tensor, p_mu: torch.Tensor, p_sigma: torch.Tensor
) -> torch.Tensor:
    """``KL(N(q_mu, q_sigma^2) || N(p_mu, p_sigma^2))`` in nats, elementwise.

    ``log(p_sigma / q_sigma) + (q_sigma^2 + (q_mu - p_mu)^2) / (2 p_sigma^2) - 1/2``.
    Sum over weights for a block's KL (a diagonal Gaussian's KL is the sum of its coordinates').
    """
    ratio = q_sigma / p_sigma
    delta = (q_mu - p_mu) / p_sigma
    return -torch.log(ratio) + 0.5 * (ratio * ratio + delta * delta) - 0.5


def mean_bound(kappa: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """Largest ``|mu - nu|`` a weight with KL ``kappa`` (nats) can have: ``rho * sqrt(2 kappa)``.

    At the bound the posterior has ``sigma = rho`` and spends its whole budget on the shift.
    """
    return rho * torch.sqrt(2.0 * kappa)


def _c(mu: torch.Tensor, kappa: torch.Tensor, nu: torch.Tensor, rho: torch.Tensor, strict: bool):
    delta = (mu - nu) / rho
    c = 2.0 * kappa + 1.0 - delta * delta
    if strict:
        worst = (c - 1.0) / (2.0 * kappa + 1.0)
        if bool((worst < -_BOUND_SLACK).any()) or bool(torch.isnan(c).any()):
            raise InputError(
                "Mean-KL: some weights' means lie outside |mu - nu| <= rho*sqrt(2*kappa) "
                "(or are NaN)",
                hint="give those weights more KL, or move their means toward the prior mean",
            )
    # At c = 1 the solution is s = 1; round-off just below is clamped onto it.
    return torch.clamp(c, min=1.0)


def meankl_log_sigma(
    mu: torch.Tensor,
    kappa: torch.Tensor,
    nu: torch.Tensor,
    rho: torch.Tensor,
    *,
    branch: int = 0,
    strict: bool = True,
) -> torch.Tensor:
    """``log sigma`` of the posterior with mean ``mu`` and ``KL(q || N(nu, rho^2)) = kappa`` nats.

    Prefer this over :func:`meankl_sigma` for large budgets: with ``c`` large, ``exp(-c)``
    underflows, but ``log s = s - c`` stays exact, so ``log sigma = log rho + (s - c) / 2`` is
    right however large ``kappa`` is. ``strict=True`` raises :class:`InputError` when a mean
    violates :func:`mean_bound` (beyond round-off); ``strict=False`` clamps it onto the bound
    (``sigma = rho`` there), which is what a training loop that keeps means inside the bound
    (e.g. :func:`mean_from_shift`) wants.
    """
    c = _c(mu, kappa, nu, rho, strict)
    s = -lambertw(-torch.exp(-c), branch)
    return torch.log(rho) + 0.5 * (s - c) if branch == 0 else torch.log(rho) + 0.5 * torch.log(s)


def meankl_sigma(
    mu: torch.Tensor,
    kappa: torch.Tensor,
    nu: torch.Tensor,
    rho: torch.Tensor,
    *,
    branch: int = 0,
    strict: bool = True,
) -> torch.Tensor:
    """Posterior std ``sigma`` such that ``KL(N(mu, sigma^2) || N(nu, rho^2)) == kappa`` (nats).

    ``branch=0`` (default) gives ``sigma <= rho``; ``branch=-1`` gives ``sigma >= rho``. See
    :func:`meankl_log_sigma` for ``strict`` and for large budgets.
    """
    return torch.exp(meankl_log_sigma(mu, kappa, nu, rho, branch=branch, strict=strict))


def mean_from_shift(
    nu: torch.Tensor, rho: torch.Tensor, kappa: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    """A mean that always satisfies the bound: ``nu + rho * sqrt(2 kappa) * tanh(gamma)``.

    ``gamma`` is an unconstrained "prior shift" parameter (the seed's gamma_w); pair it with
    per-block ``kappa = C_b * softmax(tau * a)`` so a block's KLs sum to its budget exactly.
    """
    return nu + mean_bound(kappa, rho) * torch.tanh(gamma)
