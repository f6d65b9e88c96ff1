"""Per-position divergences between two next-token (or class) distributions given as logits.

Why this shape: a language model's logits for one batch are ``[positions x vocab]``; turning them
into probabilities, mixtures and differences all at once would hold several such float32 arrays
(GiBs for a 50k-token vocabulary and a few thousand positions). Everything here therefore walks
the positions in row blocks and the vocabulary in column chunks, in two passes: the first finds
each row's log-normaliser (a streaming logsumexp) and argmax, the second accumulates the sums that
make up each divergence. Only O(rows x chunk) temporaries ever exist.

All quantities are computed in log space (log-softmax via the normaliser, the JS mixture via
softplus of the log-ratio, i.e. ``log m = log p + log 2 - softplus(log q - log p)``, which is the
two-term logsumexp written relative to ``log p`` so that nearly equal distributions do not cancel).
Units are nats throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from mlcompress.errors import InputError

LOG2 = math.log(2.0)

# Elements per temporary in the second pass; 2^18 float32 = 1 MiB keeps a chunk in cache.
DEFAULT_BLOCK_ELEMENTS = 1 << 18
DEFAULT_VOCAB_CHUNK = 4096


@dataclass
class TokenMeasures:
    """Measures for each scored position (1-D tensors of equal length, on the logits' device).

    ``kl`` is KL(ref || cmp), the headline; ``rkl`` is KL(cmp || ref); ``js`` the Jensen-Shannon
    divergence (bounded by log 2); ``tv`` total variation (bounded by 1); ``same_top`` whether both
    argmaxes agree. ``ref_logp``/``cmp_logp`` are the log-probabilities of the observed target
    token (None when no targets were given).
    """

    kl: torch.Tensor
    rkl: torch.Tensor
    js: torch.Tensor
    tv: torch.Tensor
    same_top: torch.Tensor
    ref_logp: torch.Tensor | None = None
    cmp_logp: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> "TokenMeasures":
        """A copy with every tensor moved to ``device`` (e.g. to collect results on the CPU)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TokenMeasures(*(move(getattr(self, f)) for f in _FIELDS))

    @staticmethod
    def cat(parts: list["TokenMeasures"]) -> "TokenMeasures":
        """Concatenate measures of consecutive batches."""
        if not parts:
            empty = torch.zeros(0)
            return TokenMeasures(empty, empty, empty, empty, torch.zeros(0, dtype=torch.bool))
        out = []
        for f in _FIELDS:
            values = [getattr(p, f) for p in parts]
            out.append(None if any(v is None for v in values) else torch.cat(values))
        return TokenMeasures(*out)


_FIELDS = ("kl", "rkl", "js", "tv", "same_top", "ref_logp", "cmp_logp")


class _NonFinite(Exception):
    def __init__(self, who: str, row: int) -> None:
        self.who, self.row = who, row


def check_finite(logits: torch.Tensor, who: str) -> None:
    """Raise (internally) naming the first row of ``logits`` holding NaN or inf, if any."""
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        raise _NonFinite(who, int(bad.any(dim=-1).nonzero()[0, 0]))


def _chunk_max_sum(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maxima of one chunk and the sums of exp(part - max)."""
    part_max = part.amax(dim=-1)
    return part_max, (part - part_max.unsqueeze(-1)).exp_().sum(-1)


def log_normaliser(
    logits: torch.Tensor, vocab_chunk: int = DEFAULT_VOCAB_CHUNK, *, compiled: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise ``(max, log sum exp(logits - max))`` of ``[rows, vocab]`` logits, by chunks.

    The log-normaliser is returned as two parts on purpose: forming ``max + log_sum`` rounds to
    the precision of a number of size ``max`` (about 1e-6 for logits near 10 in float32), and
    that rounding would leak into every log-probability and show up as a spurious KL of that size
    between identical-but-differently-chunked computations. Keeping the parts apart lets callers
    subtract them one after the other, so each log-probability is rounded only at its own size.
    """
    max_sum = kernel(_chunk_max_sum, compiled)
    maxes, sums = None, None
    for start in range(0, logits.shape[-1], vocab_chunk):
        part_max, part_sum = max_sum(_as_float(logits[:, start : start + vocab_chunk]))
        if maxes is None:
            maxes, sums = part_max, part_sum
            continue
        new_max = torch.maximum(part_max, maxes)
        sums = sums * torch.exp(maxes - new_max) + part_sum * torch.exp(part_max - new_max)
        maxes = new_max
    return maxes, torch.log(sums)


def token_measures(
    ref_logits: torch.Tensor,
    cmp_logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    rows: torch.Tensor | None = None,
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    compiled: bool = False,
) -> TokenMeasures:
    """Divergences between the distributions ``softmax(ref_logits)`` and ``softmax(cmp_logits)``.

    ``ref_logits``/``cmp_logits``: ``[positions, vocab]`` (any float dtype; half precision is
    promoted to float32, float64 stays float64). ``rows``: optional int64 indices of the positions
    to measure, so a caller can score a scattered subset of a batch's logits without copying them
    (only one row block is ever gathered). ``targets``: optional observed token ids, one per
    measured position, for the log-likelihoods and delta-p. Log-probabilities are valid logits,
    so the seed's worked examples are ``token_measures(P.log(), Q.log())``. ``compiled`` fuses
    the arithmetic with torch.compile (see :func:`kernel`).
    """
    if ref_logits.shape != cmp_logits.shape or ref_logits.dim() != 2:
        raise InputError(
            f"reference logits {tuple(ref_logits.shape)} and compared logits "
            f"{tuple(cmp_logits.shape)} must both be [positions, vocab] of equal shape"
        )
    if vocab_chunk < 1 or block_elements < 1:
        raise ValueError("vocab_chunk and block_elements must be positive")
    n = ref_logits.shape[0] if rows is None else rows.numel()
    if rows is not None:
        rows = rows.to(ref_logits.device)
    block_rows = max(1, block_elements // min(vocab_chunk, max(ref_logits.shape[1], 1)))
    parts = []
    for r0 in range(0, n, block_rows):
        if rows is None:
            x, y = ref_logits[r0 : r0 + block_rows], cmp_logits[r0 : r0 + block_rows]
        else:
            idx = rows[r0 : r0 + block_rows]
            x, y = ref_logits.index_select(0, idx), cmp_logits.index_select(0, idx)
        tgt = None if targets is None else targets[r0 : r0 + block_rows]
        try:
            parts.append(_block_measures(x, y, tgt, vocab_chunk, compiled))
        except _NonFinite as exc:
            raise InputError(
                f"the {exc.who} model produced non-finite logits (NaN or inf) at measured "
                f"position {r0 + exc.row}",
                hint="check the checkpoint for damaged weights or run on another --device",
            ) from None
        except Exception as exc:
            if not compiled:
                raise
            raise InputError(
                f"--compile: torch.compile failed ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})",
                hint="drop --compile (it needs a C++ compiler on the CPU, Triton on CUDA)",
            ) from None
    if not parts:
        z = ref_logits.new_zeros(0, dtype=_as_float(ref_logits[:0]).dtype)
        zt = None if targets is None else z
        return TokenMeasures(z, z, z, z, torch.zeros(0, dtype=torch.bool), zt, zt)
    return TokenMeasures.cat(parts)


def _chunk_sums(
    cx: torch.Tensor,
    cy: torch.Tensor,
    max_x: torch.Tensor,
    lsum_x: torch.Tensor,
    max_y: torch.Tensor,
    lsum_y: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One vocabulary chunk's contributions to KL, reverse KL, 2 JS, 2 TV and same-top.

    The only place the divergence arithmetic lives: run eagerly, or fused into one loop by
    torch.compile (``compiled=True``), ~4x faster on the CPU where eager mode makes ~30 passes
    over each chunk.
    """
    p = (cx - max_x).sub_(lsum_x).exp_()
    q = (cy - max_y).sub_(lsum_y).exp_()
    # Same top: some token is a maximum of both rows (an argmax is ~10x slower than this on
    # the CPU; with ties, agreeing on any tied top token counts as agreement).
    same = ((cx == max_x) & (cy == max_y)).any(-1)
    d = (cx - cy).sub_(shift)  # log p - log q
    kl = torch.linalg.vecdot(p, d)
    rkl = -torch.linalg.vecdot(q, d)
    # JS terms, log p - log m = log 2 - softplus(-d) and log q - log m = log 2 - softplus(d)
    # with m = (p + q) / 2, written as softplus(+-d) = relu(+-d) + log1p(exp(-|d|)): each term
    # is formed from d directly (no large numbers cancel, whatever the distributions), and
    # it is several times cheaper than two softplus calls on the CPU.
    b = d.abs().neg_().exp_().log1p_().neg_().add_(LOG2)  # log 2 - log1p(exp(-|d|))
    mix = torch.linalg.vecdot(p, torch.clamp(d, max=0.0).add_(b))
    mix = mix + torch.linalg.vecdot(q, torch.clamp(d, min=0.0).neg_().add_(b))
    tv = p.sub_(q).abs_().sum(-1)
    return kl, rkl, mix, tv, same


_compiled: dict[Callable, Callable] = {}


def kernel(fn: Callable, compiled: bool = False) -> Callable:
    """``fn`` itself, or ``fn`` compiled once per process (compilation takes ~20 s on the CPU
    the first time and needs a C++ compiler there, Triton on CUDA)."""
    if not compiled:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def _block_measures(
    x: torch.Tensor,
    y: torch.Tensor,
    targets: torch.Tensor | None,
    vocab_chunk: int,
    compiled: bool = False,
) -> TokenMeasures:
    max_x, lsum_x = log_normaliser(x, vocab_chunk, compiled=compiled)
    max_y, lsum_y = log_normaliser(y, vocab_chunk, compiled=compiled)
    chunk_sums = kernel(_chunk_sums, compiled)
    same = torch.zeros_like(max_x, dtype=torch.bool)
    kl = torch.zeros_like(max_x)
    rkl = torch.zeros_like(max_x)
    tv = torch.zeros_like(max_x)
    mix = torch.zeros_like(max_x)
    # log p - log q = (x - y) - shift, with the shift formed from small differences only.
    shift = ((max_x - max_y) + (lsum_x - lsum_y)).unsqueeze(-1)
    max_x, lsum_x = max_x.unsqueeze(-1), lsum_x.unsqueeze(-1)
    max_y, lsum_y = max_y.unsqueeze(-1), lsum_y.unsqueeze(-1)
    for start in range(0, x.shape[-1], vocab_chunk):
        cx = _as_float(x[:, start : start + vocab_chunk])
        cy = _as_float(y[:, start : start + vocab_chunk])
        c_kl, c_rkl, c_mix, c_tv, c_same = chunk_sums(cx, cy, max_x, lsum_x, max_y, lsum_y, shift)
        kl += c_kl
        rkl += c_rkl
        mix += c_mix
        tv += c_tv
        same |= c_same
    js = 0.5 * mix
    # Non-finite logits make some of these NaN/inf (NaN or +inf poison the normaliser; a -inf
    # logit gives 0 * inf); finite logits never do. Checking the outputs costs nothing, whereas
    # isfinite() over the logits would cost more than all the arithmetic above.
    if not bool(torch.isfinite(kl + rkl + mix + tv + lsum_x.squeeze(-1) + lsum_y.squeeze(-1)).all()):
        check_finite(x, "reference")
        check_finite(y, "compared")
    # Each quantity is non-negative and bounded in exact arithmetic; rounding can step a hair
    # outside, which would only confuse gates and percentiles.
    out = TokenMeasures(
        kl=kl.clamp_(min=0.0),
        rkl=rkl.clamp_(min=0.0),
        js=js.clamp_(0.0, LOG2),
        tv=(0.5 * tv).clamp_(0.0, 1.0),
        same_top=same,
    )
    if targets is not None:
        idx = targets.to(device=x.device, dtype=torch.long).unsqueeze(-1)
        out.ref_logp = ((_as_float(x.gather(-1, idx)) - max_x) - lsum_x).squeeze(-1)
        out.cmp_logp = ((_as_float(y.gather(-1, idx)) - max_y) - lsum_y).squeeze(-1)
    return out


def row_blocks(n: int, vocab: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> range:
    """Start offsets of row blocks holding about ``block_elements`` logits each."""
    return range(0, n, max(1, block_elements // max(1, min(DEFAULT_VOCAB_CHUNK, vocab))))


def target_log_probs(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits[rows])[targets], gathering one row block at a time (float32+)."""
    rows = rows.to(logits.device)
    targets = targets.to(logits.device, torch.long)
    out = []
    starts = row_blocks(rows.numel(), logits.shape[-1])
    step = starts.step
    for r0 in starts:
        block = logits.index_select(0, rows[r0 : r0 + step])
        mx, lsum = log_normaliser(block)
        picked = _as_float(block.gather(-1, targets[r0 : r0 + step].unsqueeze(-1))).squeeze(-1)
        out.append((picked - mx) - lsum)
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """Half/bfloat16 logits lose too much in exp/log; compute in float32 (float64 stays)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
