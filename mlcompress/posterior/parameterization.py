"""The two ways to parameterize a diagonal Gaussian posterior under a per-block KL budget.

Both work on the flat vector of all coded weights (the REC block layout assigns each to a block)
and produce per-weight ``(mu, sigma)`` against a zero-mean coding prior ``N(0, rho^2)`` whose
``rho`` (one per tensor) is learned elsewhere (:mod:`mlcompress.posterior.variational`).

* :class:`MeanVar` -- MIRACLE's classic ``(mu, log sigma)``; the budget is met by penalising
  ``sum_b beta_b KL_b`` with every ``beta_b`` annealed multiplicatively toward the point where
  ``KL_b`` sits at its budget ``C_b``.
* :class:`MeanKL` -- the seed's Mean-KL (arXiv 2307.07816): each weight gets its own KL
  ``kappa_w = C_b * softmax(tau)_w`` over its block, so ``sum_{w in b} kappa_w = C_b`` exactly,
  a mean ``mu = rho sqrt(2 kappa) tanh(gamma)`` that always satisfies the existence bound, and
  ``sigma`` from the Lambert W map. No penalty, no annealing: training minimises the task loss.

The distributions are computed in float64: ``sigma`` comes from ``W`` near its branch point when
a weight's KL is small, and float32 there would lose the "KL = budget to 1e-5" guarantee.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mlcompress.posterior.meankl import kl_gaussian, mean_bound, meankl_sigma
from mlcompress.posterior.segments import segment_softmax, segment_sum

MEAN_KL = "mean-kl"
MEAN_VAR = "mean-var"
PARAMETERIZATIONS = (MEAN_KL, MEAN_VAR)

# Mean-KL: a floor on each weight's share of its block's budget, and a cap on |tanh(gamma)|.
# Both keep c = 1 + 2 kappa (1 - tanh^2) strictly above 1, i.e. W away from its branch point,
# where the derivative of sigma is infinite and a float64 step would turn the gradient into NaN.
_KAPPA_FLOOR = 1e-6
_TANH_CAP = 1.0 - 1e-4
# Mean-KL initialisation: kappa_w proportional to (w/rho)^2 + this, so large weights get the
# budget they need to keep their trained value and small ones share an even remainder.
_INIT_KAPPA_OFFSET = 0.1
# Mean-KL initialisation: a trained weight is placed at most this fraction of the way to the
# bound (at the bound sigma = rho exactly and gamma would be infinite).
_INIT_TANH_LIMIT = 0.95


class MeanKL(nn.Module):
    """Mean-KL parameterization: per weight ``tau`` (KL-share logits) and ``gamma`` (prior shift)."""

    kind = MEAN_KL

    def __init__(self, init: torch.Tensor, rho: torch.Tensor, block_of: torch.Tensor,
                 budget_nats: torch.Tensor) -> None:
        super().__init__()
        self.num_blocks = len(budget_nats)
        self.register_buffer("block_of", block_of.clone(), persistent=False)
        self.register_buffer("budget_nats", budget_nats.to(torch.float64).clone(), persistent=False)
        self.register_buffer("sizes", torch.bincount(block_of, minlength=self.num_blocks), persistent=False)
        delta2 = (init.to(torch.float64) / rho.to(torch.float64)) ** 2
        tau = torch.log(delta2 + _INIT_KAPPA_OFFSET)
        self.tau = nn.Parameter(tau.to(torch.float32))
        kappa = self._kappa(self.tau.detach())
        ratio = init.to(torch.float64) / (rho.to(torch.float64) * torch.sqrt(2.0 * kappa))
        gamma = torch.atanh(ratio.clamp(-_INIT_TANH_LIMIT, _INIT_TANH_LIMIT) / _TANH_CAP)
        self.gamma = nn.Parameter(gamma.to(torch.float32))

    def _kappa(self, tau: torch.Tensor) -> torch.Tensor:
        share = segment_softmax(tau.to(torch.float64), self.block_of, self.num_blocks)
        floor = _KAPPA_FLOOR / self.sizes.to(torch.float64)[self.block_of]
        # (1 - f) * softmax + f / n still sums to exactly 1 over each block.
        return self.budget_nats[self.block_of] * ((1.0 - _KAPPA_FLOOR) * share + floor)

    def kappa(self) -> torch.Tensor:
        """Per-weight KL in nats (float64); sums to the block's budget over every block."""
        return self._kappa(self.tau)

    def distribution(self, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-weight ``(mu, sigma)`` in float64 given the per-weight prior std ``rho``."""
        rho = rho.to(torch.float64)
        kappa = self.kappa()
        zero = torch.zeros((), dtype=torch.float64, device=rho.device)
        # mu = nu + rho sqrt(2 kappa) tanh(gamma) with nu = 0, tanh scaled by _TANH_CAP.
        mu = mean_bound(kappa, rho) * (_TANH_CAP * torch.tanh(self.gamma.to(torch.float64)))
        sigma = meankl_sigma(mu, kappa, zero, rho, strict=False)
        return mu, sigma

    @torch.no_grad()
    def load_distribution(self, mu: torch.Tensor, sigma: torch.Tensor, rho: torch.Tensor) -> None:
        """Take the posterior ``(mu, sigma)``: each block's budget becomes its KL, the shares and
        prior shifts are those of the given weights (inverting :meth:`distribution` up to the
        Lambert W branch: a weight with ``sigma > rho`` comes back with the other root)."""
        mu, sigma, rho = (t.to(torch.float64) for t in (mu, sigma, rho))
        kappa = kl_gaussian(mu, sigma, torch.zeros((), dtype=torch.float64, device=mu.device), rho)
        budget = segment_sum(kappa, self.block_of, self.num_blocks)
        self.budget_nats.copy_(budget)
        floor = _KAPPA_FLOOR / self.sizes.to(torch.float64)[self.block_of]
        share = (kappa / budget[self.block_of] - floor) / (1.0 - _KAPPA_FLOOR)
        self.tau.copy_(torch.log(share.clamp(min=1e-300)).to(self.tau.dtype))
        ratio = mu / (mean_bound(self._kappa(self.tau.detach()), rho) * _TANH_CAP)
        self.gamma.copy_(torch.atanh(ratio.clamp(-1 + 1e-7, 1 - 1e-7)).to(self.gamma.dtype))

    def penalty(self, kl_per_block: torch.Tensor, num_train: int) -> torch.Tensor:
        """Mean-KL meets the budget by construction: nothing to add to the task loss."""
        return kl_per_block.new_zeros(())

    def after_step(self, kl_per_block: torch.Tensor, beta_step: float) -> None:
        """No annealing state."""


class MeanVar(nn.Module):
    """Mean-Var parameterization with per-block beta annealing (MIRACLE).

    ``beta`` weighs each block's KL against the training set's summed log-likelihood, as in
    MIRACLE's objective ``E_q[log p(D|w)] - sum_b beta_b KL_b``; divided by the training set
    size it adds to a per-example mean loss. After every step ``beta_b`` is multiplied by
    ``1 + beta_step`` where ``KL_b`` exceeds its budget and divided by it elsewhere (the step
    size is the training loop's schedule, :meth:`after_step`).
    """

    kind = MEAN_VAR

    def __init__(self, init: torch.Tensor, rho: torch.Tensor, block_of: torch.Tensor,
                 budget_nats: torch.Tensor, *, beta_init: float = 1e-8) -> None:
        super().__init__()
        if not beta_init > 0:
            raise ValueError("beta_init must be positive")
        self.num_blocks = len(budget_nats)
        self.register_buffer("block_of", block_of.clone(), persistent=False)
        self.register_buffer("budget_nats", budget_nats.to(torch.float64).clone(), persistent=False)
        self.register_buffer("beta", torch.full((self.num_blocks,), float(beta_init), dtype=torch.float64))
        # Start from the posterior Mean-KL starts from: every block exactly at its budget, means
        # at the trained weights as far as the budget allows. Both parameterizations then begin
        # at the same distribution, and annealing only has to hold the budget, not find it.
        with torch.no_grad():
            mu, sigma = MeanKL(init, rho, block_of, budget_nats).distribution(rho)
        self.mu = nn.Parameter(mu.to(torch.float32))
        self.log_sigma = nn.Parameter(torch.log(sigma).to(torch.float32))

    def distribution(self, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu.to(torch.float64), torch.exp(self.log_sigma.to(torch.float64))

    @torch.no_grad()
    def load_distribution(self, mu: torch.Tensor, sigma: torch.Tensor, rho: torch.Tensor) -> None:
        """Take the posterior ``(mu, sigma)`` as it is; each block's budget becomes its KL (as
        for Mean-KL), so annealing holds the blocks at what they cost now."""
        self.mu.copy_(mu.to(self.mu.dtype))
        self.log_sigma.copy_(torch.log(sigma.to(torch.float64)).to(self.log_sigma.dtype))
        self.budget_nats.copy_(block_kl(mu.to(torch.float64), sigma.to(torch.float64), rho, self.block_of,
                                        self.num_blocks))

    def penalty(self, kl_per_block: torch.Tensor, num_train: int) -> torch.Tensor:
        return (self.beta * kl_per_block).sum() / num_train

    @torch.no_grad()
    def after_step(self, kl_per_block: torch.Tensor, beta_step: float) -> None:
        """MIRACLE's update: ``beta_b *= 1 + beta_step`` where ``KL_b > C_b``, else ``/=``."""
        factor = math.log1p(beta_step)
        over = kl_per_block.detach() > self.budget_nats
        self.beta.mul_(torch.exp(torch.where(over, factor, -factor)))


def block_kl(mu: torch.Tensor, sigma: torch.Tensor, rho: torch.Tensor, block_of: torch.Tensor,
             num_blocks: int) -> torch.Tensor:
    """``KL(q || p)`` of every block in nats (float64): what the REC encoder pays per block."""
    kl = kl_gaussian(mu, sigma, torch.zeros((), dtype=mu.dtype, device=mu.device), rho.to(mu.dtype))
    return segment_sum(kl, block_of, num_blocks)
