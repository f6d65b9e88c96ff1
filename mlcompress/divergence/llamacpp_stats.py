"""llama.cpp's KL-divergence statistics, computed the way ``llama-perplexity --kl-divergence``
computes them (tools/perplexity/perplexity.cpp, ``kl_divergence()``), so the figures can be put
next to llama.cpp's own output and agree with it digit for digit, quirks included:

* Uncertainties come from running sums: ``f = S/N``, ``var = S2/N - f^2`` and
  ``sqrt(var/(N-1))`` -- zero when ``var <= 0`` or ``N <= 10``; a mean of nothing is 0 +- 0.
* The covariance of the two mean log-likelihoods is ``(Sab/N - Sa/N * Sb/N)/(N-1)``, zero when
  ``N < 10`` (a different threshold: at exactly N = 10 the covariance is used while both
  uncertainties are 0, which makes the correlation infinite or NaN, as in llama.cpp).
* The running lines (one per chunk in llama.cpp, cumulative): PPL(Q), ln(PPL(Q)/PPL(base)), KLD,
  RMS Δp and same-top, each +- its uncertainty. The summary (ratios, difference, correlation,
  percentiles) is printed only when N >= 100 ("we do not wish to do statistics on so few values").
* Percentiles: sort the float32 values; ``p = fraction * (N - 1)`` in float32 (fractions are
  float32 constants such as 0.999f), then linear interpolation between ``v[floor p]`` and the
  next value, in float32; ``max``/``min`` are the ends; the median is the middle value or the
  float32 mean of the two middle ones.
* RMS Δp is ``sqrt(mean Δp^2)`` with uncertainty ``0.5 / RMS * se(Δp^2)``; same-top's
  uncertainty is ``sqrt(p (1 - p) / (N - 1))`` with no small-N rule.

Sums are taken in float64 of the float32 products llama.cpp forms (``nll * nll`` is a float
product there). IEEE arithmetic is kept (a division by zero gives inf or NaN, as in C, and NaN
is reported as null in JSON).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlcompress.divergence.llamacpp import LlamaCppRun, LlamaCppTokens

#: Fewest scored tokens for which llama.cpp prints its summary.
SUMMARY_MIN_COUNT = 100
#: (label, fraction) in the order llama.cpp prints them; None marks the median.
KLD_PERCENTILES: tuple[tuple[str, float | None], ...] = (
    ("max", 1.0), ("p99.9", 0.999), ("p99", 0.990), ("p95", 0.950), ("p90", 0.900),
    ("median", None), ("p10", 0.100), ("p5", 0.050), ("p1", 0.010), ("p0.1", 0.001), ("min", 0.0),
)
DELTA_P_PERCENTILES: tuple[tuple[str, float | None], ...] = (
    ("max", 1.0), ("p99.9", 0.999), ("p99", 0.990), ("p95", 0.950), ("p90", 0.900), ("p75", 0.750),
    ("median", None), ("p25", 0.250), ("p10", 0.100), ("p5", 0.050), ("p1", 0.010), ("p0.1", 0.001),
    ("min", 0.0),
)

_f64 = np.float64


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama.cpp's mean and standard error from a sum and a sum of squares (rules above)."""
    if count < 1:
        return 0.0, 0.0
    with np.errstate(all="ignore"):
        f = _f64(total) / count
        df = _f64(total2) / count - f * f
        df = np.sqrt(df / (count - 1)) if df > 0 and count > 10 else _f64(0.0)
    return float(f), float(df)


def covariance(total_a: float, total_b: float, total_ab: float, count: int) -> float:
    """Covariance of the two means, llama.cpp's way (0 below 10 values)."""
    if count < 10:
        return 0.0
    with np.errstate(all="ignore"):
        var = _f64(total_ab) / count - (_f64(total_a) / count) * (_f64(total_b) / count)
        return float(var / (count - 1))


def percentile(ordered: np.ndarray, fraction: float) -> float:
    """llama.cpp's interpolated percentile of sorted float32 values, in float32."""
    if fraction <= 0:
        return float(ordered[0])
    if fraction >= 1:
        return float(ordered[-1])
    p = np.float32(fraction) * np.float32(ordered.size - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    upper = ordered[min(ip + 1, ordered.size - 1)]
    return float((np.float32(1) - p) * ordered[ip] + p * upper)


def median(ordered: np.ndarray) -> float:
    """The middle value, or the float32 mean of the two middle values."""
    n = ordered.size
    if n % 2:
        return float(ordered[n // 2])
    return float(np.float32(0.5) * (ordered[n // 2] + ordered[n // 2 - 1]))


def percentile_set(values: np.ndarray, labels: tuple[tuple[str, float | None], ...]) -> dict[str, float]:
    ordered = np.sort(np.asarray(values, dtype=np.float32))
    return {label: median(ordered) if f is None else percentile(ordered, f) for label, f in labels}


@dataclass
class Sums:
    """llama.cpp's running sums (``kl_divergence_result``) over the first ``count`` tokens."""

    nll: float
    nll2: float
    nll_base: float
    nll_base2: float
    nll_nll_base: float
    kld: float
    kld2: float
    p_diff: float
    p_diff2: float
    p_diff4: float
    same_top: int
    count: int


def running_sums(t: LlamaCppTokens, ends: list[int]) -> list[Sums]:
    """The sums after each of ``ends`` tokens (chunk ends, or just the total)."""
    nll = t.nll.float().numpy()
    base = t.nll_base.float().numpy()
    kld = t.kld.double().numpy()
    pd = t.p_diff.float().numpy()
    pd2 = (pd * pd).astype(np.float64)
    terms = {
        "nll": nll.astype(np.float64),
        "nll2": (nll * nll).astype(np.float64),
        "nll_base": base.astype(np.float64),
        "nll_base2": (base * base).astype(np.float64),
        "nll_nll_base": (nll * base).astype(np.float64),
        "kld": kld,
        "kld2": kld * kld,
        "p_diff": pd.astype(np.float64),
        "p_diff2": pd2,
        "p_diff4": pd2 * pd2,
    }
    cums = {k: np.concatenate([[0.0], np.cumsum(v)]) for k, v in terms.items()}
    same = np.concatenate([[0], np.cumsum(t.same_top.numpy().astype(np.int64))])
    return [Sums(**{k: float(c[e]) for k, c in cums.items()}, same_top=int(same[e]), count=e) for e in ends]


def _value(value: float, uncertainty: float) -> dict[str, float]:
    return {"value": float(value), "uncertainty": float(uncertainty)}


def _log_ppls(s: Sums) -> tuple[float, float, float, float, float]:
    """Mean NLL of Q and of the base with their uncertainties, and the covariance of the two."""
    log_ppl, log_ppl_se = mean_and_uncertainty(s.nll, s.nll2, s.count)
    log_base, log_base_se = mean_and_uncertainty(s.nll_base, s.nll_base2, s.count)
    return log_ppl, log_ppl_se, log_base, log_base_se, covariance(s.nll, s.nll_base, s.nll_nll_base, s.count)


def running_line(s: Sums) -> dict[str, dict[str, float]]:
    """The five figures llama.cpp prints after each chunk (cumulative), each with uncertainty."""
    n = s.count
    log_ppl, log_ppl_se, log_base, log_base_se, cov = _log_ppls(s)
    with np.errstate(all="ignore"):
        ppl = np.exp(_f64(log_ppl))
        ratio_se = np.sqrt(_f64(log_ppl_se) ** 2 + _f64(log_base_se) ** 2 - 2.0 * cov)
        mse, mse_se = mean_and_uncertainty(s.p_diff2, s.p_diff4, n)
        rms = np.sqrt(_f64(mse))
        top = _f64(s.same_top) / n if n else _f64(np.nan)
        return {
            "ppl": _value(ppl, ppl * log_ppl_se),
            "ln_ppl_ratio": _value(log_ppl - log_base, ratio_se),
            "kld": _value(*mean_and_uncertainty(s.kld, s.kld2, n)),
            "rms_delta_p": _value(rms, 0.5 / rms * mse_se),
            "same_top": _value(top, np.sqrt(top * (1 - top) / _f64(n - 1))),
        }


def summary(s: Sums, t: LlamaCppTokens) -> dict[str, Any]:
    """llama.cpp's final statistics (its ``====== ... statistics ======`` blocks)."""
    line = running_line(s)
    log_ppl, log_ppl_se, log_base, log_base_se, cov = _log_ppls(s)
    ln_ratio, ln_ratio_se = line["ln_ppl_ratio"]["value"], line["ln_ppl_ratio"]["uncertainty"]
    with np.errstate(all="ignore"):
        ppl, ppl_base = np.exp(_f64(log_ppl)), np.exp(_f64(log_base))
        ppl_se, ppl_base_se = ppl * log_ppl_se, ppl_base * log_base_se
        ratio = np.exp(_f64(ln_ratio))
        diff_se = np.sqrt(ppl_se**2 + ppl_base_se**2 - 2.0 * (ppl * ppl_base * cov))
        dp, dp_se = mean_and_uncertainty(s.p_diff, s.p_diff2, s.count)
        return {
            "ppl_cmp": line["ppl"],
            "ppl_base": _value(ppl_base, ppl_base_se),
            "ln_ppl_correlation": float(cov / (_f64(log_ppl_se) * log_base_se)),
            "ln_ppl_ratio": line["ln_ppl_ratio"],
            "ppl_ratio": _value(ratio, ratio * ln_ratio_se),
            "ppl_difference": _value(ppl - ppl_base, diff_se),
            "kld": {"mean": line["kld"]["value"], "uncertainty": line["kld"]["uncertainty"],
                    "percentiles": percentile_set(t.kld.double().numpy().astype(np.float32), KLD_PERCENTILES)},
            "delta_p": {"mean": dp, "uncertainty": dp_se,
                        "percentiles": percentile_set(t.p_diff.float().numpy(), DELTA_P_PERCENTILES)},
            "rms_delta_p": line["rms_delta_p"],
            "same_top": line["same_top"],
        }


def statistics(run: LlamaCppRun) -> dict[str, Any]:
    """The report's ``llama_cpp`` block: llama.cpp's figures for this run (see the module
    docstring); ``summary`` is false, and only the running figures are given, below 100 tokens."""
    t = run.tokens
    n = int(t.nll.numel())
    per_chunk = n // run.chunks if run.chunks else 0
    ends = [per_chunk * (i + 1) for i in range(run.chunks)] if per_chunk else []
    sums = running_sums(t, ends or [n])
    total = sums[-1]
    out: dict[str, Any] = {
        "positions": n,
        "chunks": run.chunks,
        "ctx": run.ctx,
        "targets_per_chunk": per_chunk,
        "bos": run.bos,
        "summary": n >= SUMMARY_MIN_COUNT,
    }
    if n >= SUMMARY_MIN_COUNT:
        out.update(summary(total, t))
    else:  # what llama.cpp prints then: its last running line
        line = running_line(total)
        out.update({"ppl_cmp": line["ppl"], "ln_ppl_ratio": line["ln_ppl_ratio"],
                    "kld": {"mean": line["kld"]["value"], "uncertainty": line["kld"]["uncertainty"]},
                    "rms_delta_p": line["rms_delta_p"], "same_top": line["same_top"]})
    out["by_chunk"] = [{"chunk": i + 1, **running_line(s)} for i, s in enumerate(sums)] if ends else []
    return out
