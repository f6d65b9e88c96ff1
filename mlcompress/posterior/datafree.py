"""Data-free posterior: a REC posterior for a plain checkpoint, with no training data.

``mlcompress encode model.pt --bits-per-block 16`` must work on any checkpoint, so each coded
tensor gets a posterior centred on its trained weights whose KL meets every block's budget
*exactly*:

* Prior: ``p = N(0, rho^2)`` with one ``rho`` per tensor, the tensor's RMS (a zero-mean Gaussian
  with the weights' own second moment -- MIRACLE's per-layer prior, fitted without data).
* Posterior in block ``b`` (``D`` weights ``w``, budget ``C`` nats): ``q_w = N(alpha_b * w, sigma_b^2)``,
  one shrink factor ``alpha_b`` and one std ``sigma_b`` per block.

Why a common sigma: the decoded weight is (about) a sample of ``q``, so its expected squared
error is ``sum_w sigma_w^2 + (1 - alpha)^2 w^2``. Minimising ``sum sigma_w^2`` subject to
``sum_w KL_w = C`` gives equal ``sigma_w`` (the Lagrangian's stationarity condition does not
depend on ``w``). With ``s = sigma^2 / rho^2`` and ``M = sum w^2 / (2 rho^2)`` the budget reads
``(D/2)(s - log s - 1) + alpha^2 M = C``, so ``s = -W_0(-exp(-c))`` with
``c = 1 + 2 (C - alpha^2 M) / D``: the Lambert W again.

Why shrink: a block whose weights are large relative to ``rho`` cannot keep its means and meet the
budget (the Mean-KL constraint ``|mu - nu| <= rho sqrt(2 kappa)``, summed: ``alpha^2 M <= C``),
and even when it could, pulling the means toward the prior frees budget to narrow sigma. So
``alpha_b`` minimises the block's expected squared error ``D s + 2 M (1 - alpha)^2`` (in units of
``rho^2``) over ``[0, min(1, sqrt(C / M))]`` by golden-section search. Each weight's KL is then
``kappa_w = KL(N(alpha w, sigma^2) || N(0, rho^2))`` -- the per-weight allocation -- and sigma
is recovered through the Mean-KL map (:func:`mlcompress.posterior.meankl.meankl_sigma`), which
checks the construction end to end.
"""

from __future__ import annotations

import math

import torch

from mlcompress.errors import CodecError
from mlcompress.posterior.lambertw import lambertw
from mlcompress.posterior.meankl import NATS_PER_BIT, kl_gaussian, meankl_sigma
from mlcompress.codecs.rec.layout import BlockLayout

__all__ = ["datafree_posterior", "default_prior_std"]

_GOLDEN_STEPS = 60


def default_prior_std(weight: torch.Tensor) -> float:
    """The tensor's RMS; a tensor that is all zeros or not finite is refused."""
    w = weight.detach().to(torch.float64)
    if not torch.isfinite(w).all():
        raise CodecError("cannot REC-code a tensor with NaN or Inf values", hint="clean the checkpoint, or store it --lossless")
    rms = float(torch.sqrt(torch.mean(w * w)))
    if rms == 0.0:
        raise CodecError("cannot REC-code an all-zero tensor (its prior would have std 0)", hint="store it lossless")
    return rms


def _variance_ratio(budget: float, shrunk: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``s = sigma^2 / rho^2`` of blocks spending ``shrunk = alpha^2 M`` nats on their means."""
    c = 1.0 + 2.0 * (budget - shrunk) / sizes
    return -lambertw(-torch.exp(-c.clamp(min=1.0)), 0)


def datafree_posterior(
    weight: torch.Tensor,
    layout: BlockLayout,
    bits_per_block: int,
    *,
    prior_std: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """``(mean, std, prior_std, kl_per_block_nats)`` for ``weight`` split by ``layout``.

    ``mean``/``std`` are float32 tensors shaped like ``weight``; ``kl_per_block_nats`` (float64
    ``[num_blocks]``) equals ``bits_per_block * ln 2`` for every block up to float rounding.
    """
    rho = default_prior_std(weight) if prior_std is None else float(prior_std)
    if not (rho > 0 and math.isfinite(rho)):
        raise CodecError(f"prior std must be finite and > 0, got {rho}")
    budget = bits_per_block * NATS_PER_BIT
    flat = weight.detach().reshape(-1).to(torch.float64)
    block_of = torch.repeat_interleave(torch.arange(layout.num_blocks), layout.block_sizes())
    position = layout.position_of()
    block_of_weight = block_of[position]  # block of each flat weight
    sizes = layout.block_sizes().to(torch.float64)
    m = torch.zeros(layout.num_blocks, dtype=torch.float64).index_add_(
        0, block_of_weight, flat * flat / (2.0 * rho * rho)
    )

    def error(alpha: torch.Tensor) -> torch.Tensor:
        s = _variance_ratio(budget, alpha * alpha * m, sizes)
        return sizes * s + 2.0 * m * (1.0 - alpha) ** 2

    # Golden-section search of alpha in [0, hi] per block (the error is unimodal in alpha: the
    # shift term falls and the variance term rises, both monotonically).
    hi = torch.where(m > 0, torch.sqrt(budget / m.clamp(min=1e-300)).clamp(max=1.0), torch.ones_like(m))
    lo = torch.zeros_like(m)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = error(x1), error(x2)
    for _ in range(_GOLDEN_STEPS):
        left = f1 < f2
        hi = torch.where(left, x2, hi)
        lo = torch.where(left, lo, x1)
        x2n = torch.where(left, x1, lo + g * (hi - lo))
        x1n = torch.where(left, hi - g * (hi - lo), x2)
        x1, x2 = x1n, x2n
        f1, f2 = error(x1), error(x2)
    alpha = 0.5 * (lo + hi)
    # Keep the mean budget strictly inside C so sigma stays positive.
    alpha = torch.minimum(alpha, torch.sqrt(budget * (1 - 1e-9) / m.clamp(min=1e-300)))

    s = _variance_ratio(budget, alpha * alpha * m, sizes)
    mean = alpha[block_of_weight] * flat
    sigma_block = rho * torch.sqrt(s)[block_of_weight]
    rho_t = torch.full_like(flat, rho)
    kappa = kl_gaussian(mean, sigma_block, torch.zeros_like(flat), rho_t)
    # The Mean-KL map recovers the same sigma from each weight's KL (and checks the bound).
    sigma = meankl_sigma(mean, kappa, torch.zeros_like(flat), rho_t, strict=True)
    kl_blocks = torch.zeros(layout.num_blocks, dtype=torch.float64).index_add_(0, block_of_weight, kappa)
    shape = weight.shape
    return (
        mean.to(torch.float32).reshape(shape),
        sigma.to(torch.float32).reshape(shape),
        rho,
        kl_blocks,
    )
