"""llama.cpp's scoring rule (``--score llama-cpp``) and its per-token KL against a quantized base.

Practitioners compare quantized models with llama.cpp's ``llama-perplexity --kl-divergence``, so
this mode reproduces what that tool measures, as tools/perplexity/perplexity.cpp does it:

* The data are one token stream (:func:`~mlcompress.divergence.data.read_token_stream`), cut
  into ``floor(N / ctx)`` disjoint chunks of ``ctx`` tokens; the tail is dropped.
* In each chunk, logit rows ``ctx/2 ... ctx-2`` predict targets ``ctx/2+1 ... ctx-1``:
  ``ctx - 1 - ctx/2`` targets (255 for 512). Target ``ctx/2`` is never scored.
* When the tokenizer adds BOS, token 0 of every chunk is replaced by BOS in the batch fed to
  the model (the stream itself, and the ``.kld`` file, keep the original token).
* Per token, llama.cpp's KL is taken against the base's log-probs *as stored in its file*
  (16-bit codes, :mod:`.kld_file`), summing only tokens whose decoded base log-prob is above
  -16; the base's perplexity and Δp also come from the codes, and same-top compares
  first-index argmaxes (of the compared logits and of the decoded base log-probs).

We keep our exact full-vocabulary KL as the main figure and report this one beside it
(:mod:`.llamacpp_stats` turns the per-token values into llama.cpp's statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mlcompress.divergence.data import Window
from mlcompress.divergence.kld_file import KldFile, KldWriter, QuantizedRows, quantize_rows
from mlcompress.divergence.lm import BatchLogits, LmComparison, PhaseTimer, SequenceLikelihood, add_likelihoods
from mlcompress.divergence.lm import check_ids, compared_batches
from mlcompress.divergence.measures import TokenMeasures, row_blocks
from mlcompress.divergence.models import LanguageModel, Tokenizer
from mlcompress.errors import InputError

#: llama.cpp leaves out of its KL sum every token whose decoded base log-prob is not above this.
LOG_PROB_FLOOR = -16.0


def first_target(ctx: int) -> int:
    """Index of the first scored target of a chunk, ``ctx/2 + 1`` (``Window.first``)."""
    return ctx // 2 + 1


def chunk_bos(tokenizer: Tokenizer | None, no_bos: bool) -> int | None:
    """The token that replaces token 0 of every chunk, or None: the one the tokenizer puts before
    a text (llama.cpp: "the vocabulary adds BOS"), unless ``--no-bos``."""
    if no_bos or tokenizer is None:
        return None
    return tokenizer.added_bos


def chunk_windows(stream: Sequence[int], ctx: int, bos: int | None) -> list[Window]:
    """The ``floor(len(stream) / ctx)`` chunks as windows scoring targets ``ctx/2+1 ... ctx-1``,
    token 0 replaced by ``bos`` when given; ``Window.doc`` is the chunk's index."""
    if ctx < 3:
        raise InputError(f"--score llama-cpp needs --ctx of at least 3 to score a token (got {ctx})")
    n_chunk = len(stream) // ctx
    if n_chunk == 0:
        raise InputError(
            f"--score llama-cpp needs at least {ctx} tokens for one chunk of --ctx {ctx}; the data "
            f"tokenize to {len(stream)}",
            hint="give more text or a smaller --ctx",
        )
    ids = torch.tensor(list(stream[: n_chunk * ctx]), dtype=torch.long).view(n_chunk, ctx)
    if bos is not None:
        ids[:, 0] = bos
    return [Window(doc=i, ids=ids[i], first=first_target(ctx)) for i in range(n_chunk)]


@dataclass
class LlamaCppTokens:
    """llama.cpp's per-token values, in the precision it keeps them: ``kld`` its double sum,
    ``nll``/``nll_base`` (negative log-likelihoods of the compared model and of the decoded base)
    and ``p_diff`` (p - p_base of the observed token) float32; ``same_top`` first-index argmaxes."""

    kld: torch.Tensor
    nll: torch.Tensor
    nll_base: torch.Tensor
    p_diff: torch.Tensor
    same_top: torch.Tensor

    @staticmethod
    def cat(parts: list["LlamaCppTokens"]) -> "LlamaCppTokens":
        if not parts:
            z = torch.zeros(0)
            return LlamaCppTokens(z.double(), z, z, z, torch.zeros(0, dtype=torch.bool))
        return LlamaCppTokens(*(torch.cat([getattr(p, f) for p in parts]) for f in _TOKEN_FIELDS))

    def to(self, device: str | torch.device) -> "LlamaCppTokens":
        return LlamaCppTokens(*(getattr(self, f).to(device) for f in _TOKEN_FIELDS))


_TOKEN_FIELDS = ("kld", "nll", "nll_base", "p_diff", "same_top")


@dataclass
class LlamaCppRun:
    """What ``--score llama-cpp`` measured the llama.cpp way (see :mod:`.llamacpp_stats`)."""

    tokens: LlamaCppTokens
    ctx: int
    chunks: int
    bos: int | None
    stream_tokens: int | None = None  # None when the stream came from a .kld file
    notes: list[str] = field(default_factory=list)


def first_argmax(rows: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum of each row (C's ``if (x > best)`` scan); spelt out because
    torch does not promise which of tied maxima ``argmax`` returns."""
    index = torch.arange(rows.shape[-1], device=rows.device).expand_as(rows)
    return torch.where(rows == top.unsqueeze(-1), index, rows.shape[-1]).amin(-1)


def score_rows(base: QuantizedRows, cmp_rows: torch.Tensor, targets: torch.Tensor) -> LlamaCppTokens:
    """llama.cpp's per-token values for ``[S, V]`` compared logits against base records, in
    float32 where llama.cpp uses float (so the figures match it to float32 rounding)."""
    dev = cmp_rows.device
    y = cmp_rows.float()
    top = y.amax(-1)
    lse = torch.exp(y - top.unsqueeze(-1)).double().sum(-1).log().float()
    t = targets.to(dev).long().unsqueeze(-1)
    nll = (top + lse) - y.gather(-1, t).squeeze(-1)
    base = QuantizedRows(base.scale.to(dev), base.min_log_prob.to(dev), base.codes.to(dev))
    log_p_base = base.log_probs()
    nll_base = -log_p_base.gather(-1, t).squeeze(-1)
    norm = (top + lse).unsqueeze(-1)
    terms = torch.exp(log_p_base) * ((log_p_base - y) + norm)
    kld = torch.where(log_p_base > LOG_PROB_FLOOR, terms, torch.zeros_like(terms)).double().sum(-1)
    same = first_argmax(y, top) == first_argmax(log_p_base, log_p_base.amax(-1))
    p_diff = torch.exp(-nll) - torch.exp(-nll_base)
    return LlamaCppTokens(kld, nll, nll_base, p_diff, same)


def _in_blocks(
    base_rows: Callable[[slice], QuantizedRows], cmp_rows: torch.Tensor, targets: torch.Tensor
) -> list[LlamaCppTokens]:
    """:func:`score_rows` over row blocks, so temporaries stay at about a MiB per tensor."""
    out = []
    starts = row_blocks(cmp_rows.shape[0], cmp_rows.shape[-1])
    for r0 in starts:
        sl = slice(r0, r0 + starts.step)
        out.append(score_rows(base_rows(sl), cmp_rows[sl], targets[sl]).to("cpu"))
    return out


class LlamaCppCollector:
    """Hook for :func:`~mlcompress.divergence.lm.compare_lms`: quantizes each batch's reference
    rows as llama.cpp stores them, writes them to a ``.kld`` file if asked, and applies
    llama.cpp's rule to the compared rows (unless the vocabularies differ: llama.cpp's rule
    has one vocabulary)."""

    def __init__(self, *, writer: KldWriter | None = None, measure: bool = True) -> None:
        self.writer = writer
        self.measure = measure
        self.parts: list[LlamaCppTokens] = []

    def __call__(self, b: BatchLogits) -> None:
        rows = b.rows.to(b.ref.device)
        starts = row_blocks(rows.numel(), b.ref.shape[-1])
        for r0 in starts:
            idx = rows[r0 : r0 + starts.step]
            q = quantize_rows(b.ref.index_select(0, idx))
            if self.writer is not None:
                self.writer.add(q)
            if self.measure and b.cmp.shape[-1] == b.ref.shape[-1]:
                cmp_rows = b.cmp.index_select(0, idx.to(b.cmp.device))
                self.parts.append(score_rows(q, cmp_rows, b.targets[r0 : r0 + starts.step]).to("cpu"))

    def tokens(self) -> LlamaCppTokens | None:
        return LlamaCppTokens.cat(self.parts) if self.parts else None


def base_windows(base: KldFile, bos: int | None) -> list[Window]:
    """The chunks of a ``.kld`` file as windows (its own tokens, BOS applied as for data)."""
    return chunk_windows(base.tokens.reshape(-1).tolist(), base.n_ctx, bos)


def compare_with_base_file(
    base: KldFile,
    cmp: LanguageModel,
    *,
    bos: int | None,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
    share: range | None = None,
) -> LmComparison:
    """Compare ``cmp`` with a llama.cpp base file, on the file's own chunks (or the chunks
    numbered ``share``, a data-parallel process's), the way ``llama-perplexity
    --kl-divergence`` does.

    Only llama.cpp's measures exist here: the file keeps 16-bit log-probs within 16 nats of the
    top, so the full-vocabulary KL, reverse KL, JS and TV cannot be formed (left null)."""
    windows = base_windows(base, bos)
    if share is not None:
        windows = windows[share.start : share.stop]
    check_ids(torch.from_numpy(base.tokens), cmp.vocab_size, "compared", str(base.path))
    parts: list[LlamaCppTokens] = []
    measures: list[TokenMeasures] = []
    lls: dict[int, SequenceLikelihood] = {}
    timer = PhaseTimer(cmp.device)
    first = first_target(base.n_ctx)
    for batch, logits in compared_batches(cmp, windows, batch_size, timer, base.n_vocab, f"{base.path}'s n_vocab"):
        batch_parts = []
        for row, w in enumerate(batch):
            records = base.chunk(w.doc)
            targets = w.ids[first:]
            batch_parts += _in_blocks(
                lambda sl: QuantizedRows(records.scale[sl], records.min_log_prob[sl], records.codes[sl]),
                logits[row, first - 1 : base.n_ctx - 1], targets,
            )
        t = LlamaCppTokens.cat(batch_parts)
        nan = torch.full_like(t.nll, float("nan"))
        m = TokenMeasures(t.kld.float(), nan, nan, nan, t.same_top, -t.nll_base, -t.nll)
        add_likelihoods(lls, batch, m)
        parts.append(t)
        measures.append(m)
        timer.measures_done()
        if progress is not None:
            progress(int(t.nll.numel()))
    tokens = LlamaCppTokens.cat(parts)
    comp = LmComparison(
        measures=TokenMeasures.cat(measures),
        sequences=[lls[k] for k in sorted(lls)],
        windows=len(windows),
        vocab_ref=base.n_vocab,
        vocab_cmp=base.n_vocab,
        vocab_compared=base.n_vocab,
        timer=timer,
        missing=("reverse_kl", "js", "tv"),
    )
    comp.llama_cpp = LlamaCppRun(tokens, base.n_ctx, base.n_chunk, bos)
    comp.notes.append(
        f"reference from llama.cpp base file {base.path.name}: every measure is llama.cpp's, against "
        "the 16-bit base log-probs (KL over tokens with base log-prob above -16, not renormalised); "
        "reverse KL, JS and TV need the full base distribution and are not reported"
    )
    return comp
