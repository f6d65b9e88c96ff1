"""Comparing two language models over a data set, window by window.

The loop is: tokenized documents -> windows -> batches -> both models' logits -> per-window views
of the scored rows -> :func:`~mlcompress.diverge.measures.token_measures`. Logits exist for one
batch at a time, and the measures never copy them (each window's scored rows are a view), so
memory is bounded by ``batch_size x ctx x vocab`` no matter how large the data set is; what grows
with the data is only a handful of floats per scored token (needed for percentiles).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from mlcompress.diverge.data import Document, Window, batches, pad_batch, windows
from mlcompress.diverge.measures import TokenMeasures, token_measures
from mlcompress.diverge.models import LanguageModel
from mlcompress.errors import InputError

Progress = Callable[[int], None]  # called with the number of tokens just scored


@dataclass
class LmSettings:
    """How the data are cut and scored (see :mod:`mlcompress.diverge.data`)."""

    ctx: int = 512
    stride: int | None = None  # None: equal to ctx (non-overlapping windows, as llama.cpp)
    score: str = "second-half"
    batch_size: int = 4
    shared_vocab: bool = False

    @property
    def effective_stride(self) -> int:
        return self.ctx if self.stride is None else self.stride


@dataclass
class SequenceLikelihood:
    """Log-likelihood (nats) of one document's scored tokens under each model."""

    doc: int
    tokens: int
    ref: float
    cmp: float


@dataclass
class LmComparison:
    """Everything measured on the data set; :mod:`.report` turns it into statistics."""

    measures: TokenMeasures
    sequences: list[SequenceLikelihood]
    windows: int
    vocab_ref: int
    vocab_cmp: int
    vocab_compared: int
    seconds_forward: float = 0.0
    seconds_measures: float = 0.0
    notes: list[str] = field(default_factory=list)


def check_vocab(vocab_ref: int, vocab_cmp: int, shared_vocab: bool) -> int:
    """The vocabulary size compared: both must agree unless ``shared_vocab`` allows the prefix."""
    if vocab_ref == vocab_cmp:
        return vocab_ref
    if not shared_vocab:
        raise InputError(
            f"the models' vocabularies differ: reference {vocab_ref} tokens, compared {vocab_cmp}",
            hint=f"pass --shared-vocab to compare over the first {min(vocab_ref, vocab_cmp)} tokens",
        )
    return min(vocab_ref, vocab_cmp)


def check_ids(ids: torch.Tensor, vocab: int | None, who: str, where: str) -> None:
    """Token ids beyond a model's embedding table would crash it (or read garbage on CUDA)."""
    if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
        raise InputError(
            f"{where}: token id {int(ids.max())} is outside the {who} model's vocabulary of "
            f"{vocab}",
            hint="use the tokenizer that belongs to the models (--tokenizer)",
        )


def safe_logits(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits; a model crashing on valid input is reported as the model's problem."""
    try:
        return model.logits(ids)
    except InputError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise InputError(
            f"{model.source} failed on a batch of shape {tuple(ids.shape)}: "
            f"{text[0] if text else type(exc).__name__}",
            hint="is --ctx longer than the model supports, or the data tokenized for another model?",
        ) from None


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so that wall-clock timings mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scored_rows(logits: torch.Tensor, row: int, window: Window) -> torch.Tensor:
    """Rows of ``logits`` that predict the window's scored targets (a view, no copy)."""
    return logits[row, window.first - 1 : window.ids.numel() - 1]


def all_windows(documents: Iterable[Document], settings: LmSettings) -> Iterator[Window]:
    for doc in documents:
        yield from windows(
            doc, ctx=settings.ctx, stride=settings.effective_stride, score=settings.score
        )


def compare_lms(
    ref: LanguageModel,
    cmp: LanguageModel,
    documents: Iterable[Document],
    settings: LmSettings,
    *,
    progress: Progress | None = None,
    on_ref_window: Callable[[Window, torch.Tensor, TokenMeasures], None] | None = None,
) -> LmComparison:
    """Run both models over every window and measure each scored position.

    ``on_ref_window(window, ref_rows, measures)`` receives the reference's scored logit rows of
    each window and their measures (used to build a reference cache while comparing).
    """
    if ref.vocab_size is not None and cmp.vocab_size is not None:
        check_vocab(ref.vocab_size, cmp.vocab_size, settings.shared_vocab)
    parts: list[TokenMeasures] = []
    lls: dict[int, SequenceLikelihood] = {}
    n_windows = 0
    t_forward = t_measures = 0.0
    vocab = None
    for batch in batches(all_windows(documents, settings), settings.batch_size):
        ids = pad_batch(batch)
        where = f"document {batch[0].doc}"
        check_ids(ids, ref.vocab_size, "reference", where)
        check_ids(ids, cmp.vocab_size, "compared", where)
        t0 = time.perf_counter()
        ref_logits = safe_logits(ref, ids)
        cmp_logits = safe_logits(cmp, ids)
        sync(ref.device)
        t1 = time.perf_counter()
        if vocab is None:
            vocab = check_vocab(ref_logits.shape[-1], cmp_logits.shape[-1], settings.shared_vocab)
        for row, window in enumerate(batch):
            rows_ref = scored_rows(ref_logits, row, window)
            rows_cmp = scored_rows(cmp_logits, row, window)
            targets = window.ids[window.first :].to(rows_ref.device)
            m = _window_measures(rows_ref, rows_cmp, targets, vocab)
            parts.append(m.to("cpu"))
            add_likelihood(lls, window, m)
            if on_ref_window is not None:
                on_ref_window(window, rows_ref, m)
            n_windows += 1
        sync(ref.device)
        t_forward += t1 - t0
        t_measures += time.perf_counter() - t1
        if progress is not None:
            progress(sum(w.n_scored for w in batch))
    return LmComparison(
        measures=TokenMeasures.cat(parts),
        sequences=[lls[k] for k in sorted(lls)],
        windows=n_windows,
        vocab_ref=int(ref.vocab_size or 0),
        vocab_cmp=int(cmp.vocab_size or 0),
        vocab_compared=int(vocab or 0),
        seconds_forward=t_forward,
        seconds_measures=t_measures,
    )


def _window_measures(
    rows_ref: torch.Tensor, rows_cmp: torch.Tensor, targets: torch.Tensor, vocab: int
) -> TokenMeasures:
    """Divergences over the compared vocabulary; likelihoods under each model's own full one."""
    if rows_ref.shape[-1] == vocab and rows_cmp.shape[-1] == vocab:
        return token_measures(rows_ref, rows_cmp, targets)
    m = token_measures(rows_ref[:, :vocab], rows_cmp[:, :vocab])
    idx = targets.unsqueeze(-1)
    m.ref_logp = (rows_ref.gather(-1, idx).squeeze(-1).float() - rows_ref.float().logsumexp(-1))
    m.cmp_logp = (rows_cmp.gather(-1, idx).squeeze(-1).float() - rows_cmp.float().logsumexp(-1))
    return m


def add_likelihood(lls: dict[int, SequenceLikelihood], window: Window, m: TokenMeasures) -> None:
    """Add one window's scored log-likelihoods to its document's totals."""
    entry = lls.setdefault(window.doc, SequenceLikelihood(window.doc, 0, 0.0, 0.0))
    entry.tokens += window.n_scored
    entry.ref += float(m.ref_logp.double().sum())
    entry.cmp += float(m.cmp_logp.double().sum())
