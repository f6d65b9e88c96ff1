"""Lambert W in torch: both real branches, differentiable, accurate to the input's precision.

Why we need it: the Mean-KL parameterization (``mlcompress.posterior.meankl``) turns a weight's KL
budget into its posterior std by solving ``s - log s = c``, whose solution is ``s = -W(-e^{-c})``.
torch has no Lambert W, and training needs gradients through it, so this module provides

* :func:`lambertw` -- ``W_0`` (principal branch, ``x >= -1/e``, ``W >= -1``) or ``W_{-1}``
  (``-1/e <= x < 0``, ``W <= -1``), elementwise, for float32 and float64 tensors on any device;
* a custom autograd Function whose backward uses ``W'(x) = W / (x (1 + W)) = e^{-W} / (1 + W)``
  (the second form, used here, is finite at ``x = 0``).

How: start from a series that is good where it is used (the branch-point expansion near
``x = -1/e``, ``log1p`` or the asymptotic ``log x - log log x`` elsewhere), then a fixed number of
Halley steps computed in float64. A fixed count (not "until converged") keeps the work and the
result independent of the data, so a batch and its parts give identical values. Out-of-domain
inputs give NaN, like ``torch.log`` of a negative number; callers that take user input check the
domain themselves and raise a clear error.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lambertw", "BRANCH_POINT"]

#: ``-1/e``: the left end of the real domain and the point where the two real branches meet.
BRANCH_POINT: float = -math.exp(-1.0)

# Halley's method converges cubically; from the starting points below three steps reach a relative
# error of ~1e-14 and four float64 round-off everywhere we tested (tests/test_lambertw.py, and a
# sweep of 240,000 points over both branches against eight steps). Each step is a full pass over
# every weight in Mean-KL training, so no margin steps.
_HALLEY_STEPS = 4


def _branch_point_series(p: torch.Tensor, sign: float) -> torch.Tensor:
    """W near -1/e as a series in p = sqrt(2 (e x + 1)); sign +1 gives W_0, -1 gives W_{-1}."""
    q = sign * p
    return -1.0 + q - q * q / 3.0 + (11.0 / 72.0) * q * q * q


def _initial_guess(x: torch.Tensor, branch: int) -> torch.Tensor:
    p = torch.sqrt(torch.clamp(2.0 * (math.e * x + 1.0), min=0.0))
    if branch == 0:
        near = _branch_point_series(p, 1.0)
        guess = torch.where(x < -0.25, near, torch.log1p(torch.clamp(x, min=-0.9)))
        if bool((x >= 3.0).any()):  # Mean-KL never gets here (its x lie in [-1/e, 0)): skip the passes
            big_l1 = torch.log(torch.clamp(x, min=3.0))
            big = big_l1 - torch.log(big_l1) + torch.log(big_l1) / big_l1
            guess = torch.where(x < 3.0, guess, big)
        return guess
    near = _branch_point_series(p, -1.0)
    l1 = torch.log(torch.clamp(-x, min=1e-300))
    l2 = torch.log(-l1.clamp(max=-1e-300))
    far = l1 - l2 + l2 / l1
    return torch.where(x < -0.25, near, far)


def _solve(x: torch.Tensor, branch: int) -> torch.Tensor:
    """W_branch(x) in float64 (no autograd)."""
    w = _initial_guess(x, branch)
    for _ in range(_HALLEY_STEPS):
        ew = torch.exp(w)
        f = w * ew - x
        wp1 = w + 1.0
        denom = ew * wp1 - (w + 2.0) * f / (2.0 * wp1)
        step = f / denom
        # At the branch point itself w = -1 exactly solves the equation and the step is 0/0.
        w = w - torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
    if branch == 0:
        w = torch.where(x == BRANCH_POINT, torch.full_like(w, -1.0), w)
    else:
        w = torch.where(x == 0, torch.full_like(w, -math.inf), w)
        w = w.clamp(max=-1.0)
    # Keep the branch: a Halley step may overshoot the branch point by round-off.
    if branch == 0:
        w = torch.where(x >= BRANCH_POINT, w.clamp(min=-1.0), torch.full_like(w, math.nan))
    else:
        in_domain = (x >= BRANCH_POINT) & (x <= 0)
        w = torch.where(in_domain, w, torch.full_like(w, math.nan))
    return w


class _LambertW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, branch: int) -> torch.Tensor:  # type: ignore[override]
        x64 = x.detach().to(torch.float64)
        # -1/e is not representable: an input within a few ulps (of its own dtype) below it is
        # the branch point rounded, not an out-of-domain value.
        slack = 4.0 * torch.finfo(x.dtype).eps * -BRANCH_POINT
        x64 = torch.where((x64 < BRANCH_POINT) & (x64 >= BRANCH_POINT - slack), BRANCH_POINT, x64)
        w = _solve(x64, branch).to(x.dtype)
        ctx.save_for_backward(w)
        return w

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        # W' = W / (x (1 + W)) = e^{-W} / (1 + W): finite at x = 0, infinite at the branch point.
        return grad * torch.exp(-w) / (1.0 + w), None


def lambertw(x: torch.Tensor, branch: int = 0) -> torch.Tensor:
    """Lambert W of ``x`` elementwise: the ``w`` with ``w * exp(w) == x`` on the chosen branch.

    ``branch=0`` is the principal branch (defined for ``x >= -1/e``, values ``>= -1``);
    ``branch=-1`` the lower branch (defined for ``-1/e <= x < 0``, values ``<= -1``, ``-inf`` at 0).
    Inputs outside a branch's domain give NaN, except that values within a few ulps below ``-1/e``
    count as ``-1/e`` (which no float represents exactly). Floating dtypes only; the result has ``x``'s dtype
    and device and is accurate to that dtype's precision (the iteration runs in float64).
    Differentiable; the gradient is ``e^{-W} / (1 + W)``.
    """
    if branch not in (0, -1):
        raise ValueError(f"lambertw: branch must be 0 or -1, got {branch!r}")
    if not torch.is_floating_point(x):
        raise TypeError(f"lambertw: expected a floating-point tensor, got {x.dtype}")
    return _LambertW.apply(x, branch)
