"""Statistical correctness of REC: decoded samples follow q when K >> exp(KL); bias at K = exp(KL).

Trials must be independent draws of the coding scheme. Blocks of one encode share candidates, so
trial ``t`` gets its own coordinates ``[t*D, (t+1)*D)`` of the candidate vectors (coordinates are
independent) -- many independent trials in one batched encode -- or, for ordered random coding
(whose arrival times are shared by blocks), its own seed. ``importance sampling`` and ``ordered random coding`` are both meant to sample q;
greedy is not (it returns the mode of the candidates' weights) and is not tested here.
"""

import math

import pytest
import torch

from mlcompress.posterior.meankl import NATS_PER_BIT, kl_gaussian, meankl_sigma
from mlcompress.rec.encoder import score_coefficients, select_candidates
from mlcompress.codecs.rec.sampler import candidate_weights, candidates

D64 = torch.float64


from single_thread import one_thread  # noqa: F401  (autouse fixture)


def _decoded(mu, sigma, nu, rho, bits, selection, trials, seed0=1000):
    """Decoded weights [trials, D] of independent trials (see the module docstring)."""
    a, b = score_coefficients(mu, sigma, nu, rho)
    d = mu.numel()
    if selection == "orc":
        out = []
        for t in range(trials):
            k = select_candidates(a[None], b[None], bits=bits, seed=seed0 + t, selection=selection)
            out.append(candidate_weights(candidates(seed0 + t, k, d)[0], nu.float(), rho.float()))
        return torch.stack(out).double()
    a_all = torch.zeros(trials, trials * d)
    b_all = torch.zeros(trials, trials * d)
    for t in range(trials):
        a_all[t, t * d : (t + 1) * d] = a
        b_all[t, t * d : (t + 1) * d] = b
    k = select_candidates(a_all, b_all, bits=bits, seed=seed0, selection=selection)
    z = candidates(seed0, k, trials * d).view(trials, trials, d)
    own = z[torch.arange(trials), torch.arange(trials)]
    return candidate_weights(own, nu.float(), rho.float()).double()


def _ks(x: torch.Tensor, mu: float, sigma: float) -> float:
    x, _ = x.sort()
    n = x.numel()
    cdf = 0.5 * (1 + torch.erf((x - mu) / (sigma * math.sqrt(2))))
    hi = torch.arange(1, n + 1, dtype=D64) / n
    return max((hi - cdf).abs().max().item(), (cdf - (hi - 1 / n)).abs().max().item())


@pytest.mark.parametrize("selection", ["is", "orc"])
def test_one_dimensional_posterior_is_sampled(selection):
    # q = N(1.5, sigma^2) vs p = N(0, 1) with KL = 2 bits; K = 2^10 >> e^KL = 4.
    mu, nu, rho = torch.tensor([1.5], dtype=D64), torch.zeros(1, dtype=D64), torch.ones(1, dtype=D64)
    sigma = meankl_sigma(mu, torch.tensor([2 * NATS_PER_BIT], dtype=D64), nu, rho)
    n = 1500 if selection == "is" else 400
    w = _decoded(mu, sigma, nu, rho, bits=10, selection=selection, trials=n)[:, 0]
    s = sigma.item()
    assert abs(w.mean().item() - 1.5) < 4 * s / math.sqrt(n)
    assert abs(w.std().item() / s - 1) < 4 / math.sqrt(2 * n) + 0.02
    assert _ks(w, 1.5, s) < 1.63 / math.sqrt(n)  # 1% critical value


def test_multidimensional_posterior_is_sampled():
    # a 4-D block, KL ~ 2.2 nats in total; K = 2^12 >> e^KL ~ 10
    mu = torch.tensor([0.3, -0.5, 0.0, 0.8], dtype=D64)
    sigma = torch.tensor([0.4, 0.5, 0.3, 0.6], dtype=D64)
    nu, rho = torch.zeros(4, dtype=D64), torch.ones(4, dtype=D64)
    kl = kl_gaussian(mu, sigma, nu, rho).sum().item()
    assert 2.0 < kl < 2.5
    n = 600
    w = _decoded(mu, sigma, nu, rho, bits=12, selection="is", trials=n)
    z = (w - mu) / sigma
    assert (z.mean(0).abs() < 4 / math.sqrt(n)).all()
    assert ((z.std(0) - 1).abs() < 4 / math.sqrt(2 * n) + 0.03).all()
    corr = torch.corrcoef(z.T)
    assert (corr - torch.eye(4, dtype=D64)).abs().max().item() < 4 / math.sqrt(n)
    for j in range(4):
        assert _ks(w[:, j], mu[j].item(), sigma[j].item()) < 1.63 / math.sqrt(n) * 1.1


def _theorem_bound(mu, sigma, kl, t):
    """MIRACLE / Chatterjee-Diaconis: |E f - E_q f| <= ||f||_q (e^{-t/4} + 2 sqrt(P_q(log q/p > KL + t/2)))
    for K = exp(KL + t); P estimated on a fine grid (1-D, p = N(0, 1))."""
    x = torch.linspace(mu - 12 * sigma, mu + 12 * sigma, 200_001, dtype=D64)
    logq = -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma)
    logp = -0.5 * x**2
    dens = torch.exp(logq) / math.sqrt(2 * math.pi)
    tail = (dens * (logq - logp > kl + t / 2)).sum().item() * (x[1] - x[0]).item()
    return math.exp(-t / 4) + 2 * math.sqrt(tail)


def test_bias_at_k_equal_exp_kl_within_theorem():
    # K = 2^4 = exp(KL) exactly: KL = 4 bits, the mean far in the prior's tail (|mu| = 2 rho)
    mu, nu, rho = torch.tensor([2.0], dtype=D64), torch.zeros(1, dtype=D64), torch.ones(1, dtype=D64)
    kl = 4 * NATS_PER_BIT
    sigma = meankl_sigma(mu, torch.tensor([kl], dtype=D64), nu, rho).item()
    n = 3000
    w = _decoded(mu, torch.tensor([sigma], dtype=D64), nu, rho, bits=4, selection="is", trials=n)[:, 0]
    f = (w - 2.0) / sigma  # ||f||_q = 1
    bias = abs(f.mean().item())
    assert bias <= _theorem_bound(2.0, sigma, kl, 0.0) + 4 / math.sqrt(n)
    # and the bias shrinks as K grows past exp(KL): K = 2^10 = exp(KL + 6 ln 2)
    w10 = _decoded(mu, torch.tensor([sigma], dtype=D64), nu, rho, bits=10, selection="is", trials=n, seed0=9000)[:, 0]
    bias10 = abs(((w10 - 2.0) / sigma).mean().item())
    assert bias10 <= _theorem_bound(2.0, sigma, kl, 6 * NATS_PER_BIT) + 4 / math.sqrt(n)
    assert bias10 < bias


def test_orc_indices_are_small():
    # ordered random coding: index ~ exp(KL) typically, far below K, which entropy coding exploits
    mu, nu, rho = torch.tensor([0.5, -0.5], dtype=D64), torch.zeros(2, dtype=D64), torch.ones(2, dtype=D64)
    sigma = torch.tensor([0.5, 0.5], dtype=D64)
    a, b = score_coefficients(mu, sigma, nu, rho)
    idx = torch.stack([select_candidates(a[None], b[None], bits=16, seed=s, selection="orc")[0] for s in range(100)])
    kl = kl_gaussian(mu, sigma, nu, rho).sum().item()
    # E[log2(k+1)] is about KL/ln2 + O(log KL): well under the 16 bits of a fixed-width index
    assert torch.log2(idx.double() + 1).mean().item() < kl / NATS_PER_BIT + 3
