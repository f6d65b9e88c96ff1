"""Summary statistics for per-position measures, matching what llama.cpp's KL report prints.

Practitioners compare against llama.cpp's ``--kl-divergence`` output, so the same quantities are
reported: mean with its standard error, the percentile set below, RMS of delta-p, the same-top
rate with its binomial standard error, and the perplexities with their ratio. Percentiles use
linear interpolation between order statistics (numpy's default). These summarise our exact
measures; llama.cpp's own figures, with its small-N rules and float32 percentiles, are in
:mod:`.llamacpp_stats`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

# The llama.cpp percentile set, in the order it prints them: (label, percentile in [0, 100]).
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("max", 100.0),
    ("p99.9", 99.9),
    ("p99", 99.0),
    ("p95", 95.0),
    ("p90", 90.0),
    ("median", 50.0),
    ("p10", 10.0),
    ("p5", 5.0),
    ("p1", 1.0),
    ("p0.1", 0.1),
    ("min", 0.0),
)


@dataclass
class Summary:
    """Mean +- standard error of the mean, and the percentile set, of one per-position measure."""

    mean: float
    stderr: float
    n: int
    percentiles: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def mean_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error sqrt(var / n), var with n - 1 (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if n < 2:
        return mean, 0.0
    return mean, float(values.std(ddof=1) / math.sqrt(n))


def summarize(values: np.ndarray, *, percentiles: bool = True) -> Summary:
    """Mean, standard error and (optionally) the llama.cpp percentile set of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    mean, stderr = mean_stderr(values)
    pct: dict[str, float] = {}
    if percentiles and values.size:
        qs = np.percentile(values, [q for _, q in PERCENTILES])
        pct = {label: float(v) for (label, _), v in zip(PERCENTILES, qs)}
    return Summary(mean=mean, stderr=stderr, n=int(values.size), percentiles=pct)


def rms(values: np.ndarray) -> float:
    """Root mean square (llama.cpp's 'RMS delta-p')."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.sqrt(np.mean(values**2))) if values.size else math.nan


def binomial_rate(successes: int, n: int) -> tuple[float, float]:
    """Rate and its binomial standard error sqrt(r (1 - r) / (n - 1)), as llama.cpp reports it."""
    if n == 0:
        return math.nan, math.nan
    rate = successes / n
    if n < 2:
        return rate, 0.0
    return rate, math.sqrt(rate * (1.0 - rate) / (n - 1))


@dataclass
class Perplexity:
    """Perplexities of both models on the same scored tokens, and how they relate.

    ``ln_ratio`` is the mean of ln p_ref(t) - ln p_cmp(t) over tokens, i.e. ln(PPL_cmp/PPL_ref),
    with its standard error; ``ratio`` is its exponential. ``correlation`` is Pearson's r between
    the two models' per-token log-probabilities (llama.cpp's "cor(ln PPL(Q), ln PPL(base))").
    """

    ref: float
    ref_stderr: float
    cmp: float
    cmp_stderr: float
    ratio: float
    ln_ratio: float
    ln_ratio_stderr: float
    correlation: float

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity(ref_logp: np.ndarray, cmp_logp: np.ndarray) -> Perplexity:
    """Perplexities from per-token log-probabilities of the observed tokens.

    The standard errors of the perplexities use the delta method: PPL * stderr(mean NLL).
    """
    ref_logp = np.asarray(ref_logp, dtype=np.float64)
    cmp_logp = np.asarray(cmp_logp, dtype=np.float64)
    ref_nll, ref_se = mean_stderr(-ref_logp)
    cmp_nll, cmp_se = mean_stderr(-cmp_logp)
    ln_ratio, ln_se = mean_stderr(ref_logp - cmp_logp)
    if ref_logp.size > 1 and ref_logp.std() > 0 and cmp_logp.std() > 0:
        corr = float(np.corrcoef(ref_logp, cmp_logp)[0, 1])
    else:
        corr = 1.0 if np.array_equal(ref_logp, cmp_logp) else math.nan
    ppl_ref, ppl_cmp = math.exp(ref_nll), math.exp(cmp_nll)
    return Perplexity(
        ref=ppl_ref,
        ref_stderr=ppl_ref * ref_se,
        cmp=ppl_cmp,
        cmp_stderr=ppl_cmp * cmp_se,
        ratio=math.exp(ln_ratio),
        ln_ratio=ln_ratio,
        ln_ratio_stderr=ln_se,
        correlation=corr,
    )
