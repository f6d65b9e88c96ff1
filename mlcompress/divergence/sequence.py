"""Sequence-level divergence between language models (seed 001 §4.5).

For a fixed length L the models define joint distributions over token sequences,
P^(L)(t) = prod_i P(t_i | t_<i). Two ways to get at KL(P^(L) || Q^(L)):

* ``exact``: enumerate all V^L sequences (tiny vocabularies only) and sum
  P(t) (log P(t) - log Q(t)) directly; JS and total variation of the joint distributions come
  out the same way. The chain-rule breakdown (the expected conditional KL at each position) is
  reported too; its sum equals the joint KL.
* ``sample``: draw N sequences from the reference and average. Two unbiased estimators are
  reported: the plain Monte Carlo mean of log P(t) - log Q(t), and the chain-rule (Rao-Blackwell)
  mean of sum_i KL(P(.|t_<i) || Q(.|t_<i)), which has far lower variance and is the headline.
  By the seed's proposition (eq. 16) the per-token value, joint / L, is what the dataset-averaged
  KL estimates on data drawn from P.

Every sequence starts from a begin-of-sequence token (``bos``): a model cannot be run on an
empty context, so "the distribution of the first token" is the one after ``bos``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from mlcompress.divergence.lm import check_vocab, safe_logits
from mlcompress.divergence.measures import token_measures
from mlcompress.divergence.models import LanguageModel
from mlcompress.divergence.stats import mean_stderr
from mlcompress.errors import UsageError

MAX_EXACT_SEQUENCES = 1 << 20


def _vocab(ref: LanguageModel, cmp: LanguageModel, bos: int) -> int:
    probe = torch.tensor([[bos]], dtype=torch.long)
    v_ref = safe_logits(ref, probe).shape[-1]
    v_cmp = safe_logits(cmp, probe).shape[-1]
    if v_ref != v_cmp:
        check_vocab(v_ref, v_cmp, False)  # sequences over different vocabularies: no joint KL
    if not 0 <= bos < v_ref:
        raise UsageError(f"--bos {bos} is outside the vocabulary of {v_ref} tokens")
    return v_ref


def _sequence_logits(model: LanguageModel, seqs: torch.Tensor, bos: int) -> torch.Tensor:
    """Logits predicting each token of ``seqs`` ([N, L]) from bos + its prefix: [N, L, V]."""
    inputs = torch.cat([torch.full((seqs.shape[0], 1), bos, dtype=torch.long), seqs[:, :-1]], 1)
    return safe_logits(model, inputs)


def exact_sequence_divergence(
    ref: LanguageModel,
    cmp: LanguageModel,
    *,
    length: int,
    bos: int,
    batch_size: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Joint KL, reverse KL, JS and TV over all sequences of ``length`` tokens (float64)."""
    if length < 1:
        raise UsageError(f"--length must be at least 1 (got {length})")
    vocab = _vocab(ref, cmp, bos)
    total = vocab**length
    if total > MAX_EXACT_SEQUENCES:
        raise UsageError(
            f"--mode exact would enumerate {vocab}^{length} = {total:.3g} sequences "
            f"(limit {MAX_EXACT_SEQUENCES:,})",
            hint="use --mode sample, or a shorter --length",
        )
    log_p, log_q, by_pos = [], [], torch.zeros(length, dtype=torch.float64)
    for start in range(0, total, batch_size):
        codes = torch.arange(start, min(start + batch_size, total), dtype=torch.long)
        seqs = _decode_codes(codes, vocab, length)
        lp = torch.log_softmax(_sequence_logits(ref, seqs, bos).double().cpu(), -1)
        lq = torch.log_softmax(_sequence_logits(cmp, seqs, bos).double().cpu(), -1)
        idx = seqs.unsqueeze(-1)
        lp_seq = lp.gather(-1, idx).squeeze(-1).sum(-1)
        log_p.append(lp_seq)
        log_q.append(lq.gather(-1, idx).squeeze(-1).sum(-1))
        # Chain-rule breakdown: E_{t ~ P}[KL(P(.|t_<i) || Q(.|t_<i))] for each position i.
        kl_rows = token_measures(lp.reshape(-1, vocab), lq.reshape(-1, vocab)).kl.view(-1, length)
        by_pos += (lp_seq.exp().unsqueeze(-1) * kl_rows).sum(0)
        if progress is not None:
            progress(int(codes.numel()))
    lp_all, lq_all = torch.cat(log_p), torch.cat(log_q)
    p, q = lp_all.exp(), lq_all.exp()
    lm = torch.logaddexp(lp_all, lq_all) - math.log(2.0)
    kl = float((p * (lp_all - lq_all)).sum())
    report = {
        "mode": "exact",
        "length": length,
        "bos": bos,
        "vocab": vocab,
        "sequences": total,
        "joint_kl": kl,
        "per_token_kl": kl / length,
        "joint_reverse_kl": float((q * (lq_all - lp_all)).sum()),
        "joint_js": float(0.5 * (p * (lp_all - lm)).sum() + 0.5 * (q * (lq_all - lm)).sum()),
        "joint_tv": float(0.5 * (p - q).abs().sum()),
        "kl_by_position": by_pos.tolist(),
        "mass_ref": float(p.sum()),
        "mass_cmp": float(q.sum()),
    }
    report["headline"] = {
        k: report[k]
        for k in ("joint_kl", "per_token_kl", "joint_reverse_kl", "joint_js", "joint_tv")
    }
    report["headline"]["kl"] = report["per_token_kl"]
    return report


def _decode_codes(codes: torch.Tensor, vocab: int, length: int) -> torch.Tensor:
    """Sequence number -> tokens, most significant first (lexicographic order)."""
    out = torch.empty(codes.numel(), length, dtype=torch.long)
    rest = codes.clone()
    for pos in range(length - 1, -1, -1):
        out[:, pos] = rest % vocab
        rest //= vocab
    return out


@torch.no_grad()
def sample_sequences(
    model: LanguageModel, *, n: int, length: int, bos: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` sequences of ``length`` tokens sampled autoregressively from ``model`` after bos."""
    seqs = torch.full((n, 1), bos, dtype=torch.long)
    for _ in range(length):
        logits = safe_logits(model, seqs)[:, -1].double().cpu()
        probs = torch.softmax(logits, -1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        seqs = torch.cat([seqs, nxt], 1)
    return seqs[:, 1:]


def sampled_sequence_divergence(
    ref: LanguageModel,
    cmp: LanguageModel,
    *,
    samples: int,
    length: int,
    bos: int,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Monte Carlo estimates of the joint KL from ``samples`` sequences drawn from ``ref``."""
    if samples < 2:
        raise UsageError(f"--samples must be at least 2 for a standard error (got {samples})")
    if length < 1:
        raise UsageError(f"--length must be at least 1 (got {length})")
    _vocab(ref, cmp, bos)
    generator = torch.Generator().manual_seed(seed)
    log_ratio, chain_kl, chain_js, chain_tv, same = [], [], [], [], []
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        seqs = sample_sequences(ref, n=n, length=length, bos=bos, generator=generator)
        lr = _sequence_logits(ref, seqs, bos)
        lc = _sequence_logits(cmp, seqs, bos)
        v = lr.shape[-1]
        m = token_measures(lr.reshape(-1, v), lc.reshape(-1, v), seqs.reshape(-1).to(lr.device))
        m = m.to("cpu")
        log_ratio.append((m.ref_logp.double() - m.cmp_logp.double()).view(n, length).sum(1))
        chain_kl.append(m.kl.double().view(n, length).sum(1))
        chain_js.append(m.js.double().view(n, length).mean(1))
        chain_tv.append(m.tv.double().view(n, length).mean(1))
        same.append(m.same_top.double().view(n, length).mean(1))
        if progress is not None:
            progress(n)
    stats = {}
    for name, values in (
        ("joint_kl", chain_kl),
        ("joint_kl_logratio", log_ratio),
        ("per_token_js", chain_js),
        ("per_token_tv", chain_tv),
        ("same_top", same),
    ):
        mean, se = mean_stderr(torch.cat(values).numpy())
        stats[name] = {"mean": mean, "stderr": se}
    report: dict[str, Any] = {
        "mode": "sample",
        "length": length,
        "bos": bos,
        "samples": samples,
        "seed": seed,
        **stats,
        "per_token_kl": {
            "mean": stats["joint_kl"]["mean"] / length,
            "stderr": stats["joint_kl"]["stderr"] / length,
        },
    }
    report["headline"] = {
        "kl": report["per_token_kl"]["mean"],
        "joint_kl": stats["joint_kl"]["mean"],
        "joint_kl_logratio": stats["joint_kl_logratio"]["mean"],
        "js": stats["per_token_js"]["mean"],
        "tv": stats["per_token_tv"]["mean"],
        "same_top": stats["same_top"]["mean"],
    }
    return report
