"""Per-position divergences and their statistics: the seed's worked numbers, invariants, chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlcompress.divergence.measures import log_normaliser, token_measures
from mlcompress.divergence.stats import binomial_rate, perplexity, summarize
from mlcompress.errors import InputError


def _dist(*rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_seed_001_worked_kl_and_js():
    # Seed 001 §4: P=(.5,.3,.2), Q=(.4,.4,.2): KL 0.02527 nats, JS 0.0064; the exercise
    # P=(.2,.5,.3), Q=(.1,.7,.2): KL 0.09203, JS 0.0219.
    m = token_measures(_dist((0.5, 0.3, 0.2), (0.2, 0.5, 0.3)), _dist((0.4, 0.4, 0.2), (0.1, 0.7, 0.2)))
    assert m.kl[0].item() == pytest.approx(0.02527, abs=5e-6)
    assert m.js[0].item() == pytest.approx(0.0064, abs=5e-5)
    assert m.kl[1].item() == pytest.approx(0.09203, abs=5e-6)
    assert m.js[1].item() == pytest.approx(0.0219, abs=5e-5)
    # Reverse KL and TV by hand: sum q log(q/p); half the L1 distance.
    assert m.rkl[0].item() == pytest.approx(0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.3), abs=1e-12)
    assert m.tv.tolist() == pytest.approx([0.1, 0.2], abs=1e-12)
    assert m.same_top.tolist() == [True, True]


def test_target_log_probs_and_float32_inputs():
    m = token_measures(_dist((0.5, 0.3, 0.2)).float(), _dist((0.4, 0.4, 0.2)).float(), torch.tensor([1]))
    assert m.ref_logp.item() == pytest.approx(math.log(0.3), abs=1e-6)
    assert m.cmp_logp.item() == pytest.approx(math.log(0.4), abs=1e-6)
    assert m.kl.dtype == torch.float32


def test_identical_inputs_give_exact_zeros_and_same_top():
    x = torch.randn(50, 300) * 4
    m = token_measures(x, x.clone(), torch.randint(0, 300, (50,)), vocab_chunk=64)
    for t in (m.kl, m.rkl, m.js, m.tv):
        assert torch.count_nonzero(t) == 0
    assert bool(m.same_top.all())
    assert torch.equal(m.ref_logp, m.cmp_logp)


def test_shift_invariance():
    # Logits are defined up to a per-row constant; the divergences must not see it.
    x = torch.randn(20, 100, dtype=torch.float64)
    y = x + 0.3 * torch.randn(20, 100, dtype=torch.float64)
    a = token_measures(x, y)
    b = token_measures(x + 7.0, y - 3.0)
    assert torch.allclose(a.kl, b.kl, atol=1e-12) and torch.allclose(a.js, b.js, atol=1e-12)


def _reference(x, y):
    lp, lq = x.double().log_softmax(-1), y.double().log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    lm = torch.logaddexp(lp, lq) - math.log(2)
    return (
        (p * (lp - lq)).sum(-1),
        (q * (lq - lp)).sum(-1),
        0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1),
        0.5 * (p - q).abs().sum(-1),
    )


def test_chunked_equals_unchunked_and_matches_float64_reference():
    torch.manual_seed(0)
    x = torch.randn(70, 1000) * 3
    y = x + 0.1 * torch.randn(70, 1000)
    whole = token_measures(x, y, vocab_chunk=10_000, block_elements=10**8)
    chunked = token_measures(x, y, vocab_chunk=37, block_elements=500)
    for name in ("kl", "rkl", "js", "tv"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), rtol=1e-4, atol=2e-7), name
    assert torch.equal(whole.same_top, chunked.same_top)
    kl, rkl, js, tv = _reference(x, y)
    assert torch.allclose(chunked.kl.double(), kl, rtol=1e-4, atol=5e-7)
    assert torch.allclose(chunked.rkl.double(), rkl, rtol=1e-4, atol=5e-7)
    assert torch.allclose(chunked.js.double(), js, rtol=1e-4, atol=5e-7)
    assert torch.allclose(chunked.tv.double(), tv, rtol=1e-4, atol=5e-7)


def test_log_normaliser_by_chunks_and_same_top_ties():
    x = torch.tensor([[1.0, 5.0, 5.0, 2.0], [0.0, 0.0, 0.0, 9.0], [3.0, 1.0, 0.0, 0.0]])
    mx, lsum = log_normaliser(x, vocab_chunk=3)
    assert torch.allclose(mx + lsum, torch.logsumexp(x, -1))
    y = torch.tensor([[0.0, 0.0, 7.0, 1.0], [9.0, 0.0, 0.0, 1.0], [3.0, 3.0, 0.0, 0.0]])
    # Row 0: x ties at 1 and 2, y's top is 2 -> agree; row 1 disagrees; row 2: y ties, one is x's.
    assert token_measures(x, y, vocab_chunk=3).same_top.tolist() == [True, False, True]


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(2, 40),
    scale=st.floats(0.01, 30.0),
    seed=st.integers(0, 2**31 - 1),
    chunk=st.integers(1, 50),
)
def test_bounds_on_random_logits(rows, vocab, scale, seed, chunk):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * scale
    y = torch.randn(rows, vocab, generator=g) * scale
    m = token_measures(x, y, vocab_chunk=chunk)
    assert bool((m.kl >= 0).all()) and bool((m.rkl >= 0).all())
    assert bool((m.js >= 0).all()) and bool((m.js <= math.log(2)).all())
    assert bool((m.tv >= 0).all()) and bool((m.tv <= 1).all())
    # An f-divergence is at most (f(0) + f*(0)) TV; for JS that is log 2 * TV.
    assert bool((m.js <= m.tv * math.log(2) + 1e-5).all())


def test_non_finite_logits_are_refused():
    x = torch.randn(3, 5)
    y = x.clone()
    y[2, 1] = float("nan")
    with pytest.raises(InputError, match="compared model produced non-finite logits .* position 2"):
        token_measures(x, y)
    x[0, 0] = float("inf")
    with pytest.raises(InputError, match="reference model produced non-finite"):
        token_measures(x, x)


def test_shape_mismatch_is_refused():
    with pytest.raises(InputError, match="equal shape"):
        token_measures(torch.zeros(2, 3), torch.zeros(2, 4))


def test_summary_statistics_match_numpy():
    v = np.arange(1, 101, dtype=np.float64)
    s = summarize(v)
    assert s.mean == 50.5 and s.n == 100
    assert s.stderr == pytest.approx(np.std(v, ddof=1) / 10)
    assert s.percentiles["max"] == 100 and s.percentiles["min"] == 1
    assert s.percentiles["median"] == 50.5
    assert s.percentiles["p99"] == pytest.approx(np.percentile(v, 99))
    assert list(s.percentiles) == ["max", "p99.9", "p99", "p95", "p90", "median", "p10", "p5", "p1", "p0.1", "min"]


def test_binomial_rate_and_perplexity():
    rate, se = binomial_rate(90, 100)
    assert rate == 0.9 and se == pytest.approx(math.sqrt(0.9 * 0.1 / 99))
    ref = np.log([0.5, 0.25])
    cmp = np.log([0.25, 0.25])
    p = perplexity(ref, cmp)
    assert p.ref == pytest.approx(math.sqrt(8))  # exp(-(ln .5 + ln .25)/2)
    assert p.cmp == pytest.approx(4.0)
    assert p.ratio == pytest.approx(4.0 / math.sqrt(8))
    assert p.ln_ratio == pytest.approx(math.log(4.0 / math.sqrt(8)))


@pytest.mark.slow
def test_compiled_kernel_matches_eager():
    # torch.compile takes ~20 s on the CPU the first time, hence slow (run with -m slow).
    torch.manual_seed(2)
    x = torch.randn(100, 5000) * 3
    y = x + 0.2 * torch.randn(100, 5000)
    eager = token_measures(x, y, torch.randint(0, 5000, (100,)))
    fused = token_measures(x, y, torch.randint(0, 5000, (100,)), compiled=True)
    for name in ("kl", "rkl", "js", "tv"):
        assert torch.allclose(getattr(eager, name), getattr(fused, name), rtol=1e-4, atol=1e-7), name
    assert torch.equal(eager.same_top, fused.same_top)
