"""Comparing two language models over a data set, window by window.

The loop is: tokenized documents -> windows -> batches -> both models' logits -> per-window views
of the scored rows -> :func:`~mlcompress.divergence.measures.token_measures`. Logits exist for one
batch at a time, and the measures never copy them (each window's scored rows are a view), so
memory is bounded by ``batch_size x ctx x vocab`` no matter how large the data set is; what grows
with the data is only a handful of floats per scored token (needed for percentiles).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from mlcompress.divergence.data import Document, Window, batches, pad_batch, windows
from mlcompress.divergence.measures import TokenMeasures, target_log_probs, token_measures
from mlcompress.divergence.models import LanguageModel
from mlcompress.errors import InputError

Progress = Callable[[int], None]  # called with the number of tokens just scored


@dataclass
class LmSettings:
    """How the data are cut and scored (see :mod:`mlcompress.divergence.data`)."""

    ctx: int = 512
    stride: int | None = None  # None: equal to ctx (non-overlapping windows, as llama.cpp)
    score: str = "second-half"
    batch_size: int = 4
    shared_vocab: bool = False
    compiled: bool = False  # fuse the measures with torch.compile

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
    timer: "PhaseTimer | None" = None
    notes: list[str] = field(default_factory=list)
    #: Measures the reference side could not provide (their report entries are null), e.g.
    #: reverse KL against a llama.cpp base file, which keeps only log-probs near the top.
    missing: tuple[str, ...] = ()
    #: ``--score llama-cpp``: a :class:`~mlcompress.divergence.llamacpp.LlamaCppRun` (typed
    #: loosely because that module builds on this one).
    llama_cpp: Any = None


@dataclass
class BatchLogits:
    """One batch as both models saw it, for hooks that keep more than the measures (reference
    caches, llama.cpp's quantized-base rule): ``ref``/``cmp`` are flat ``[batch * width, vocab]``
    logits, ``rows`` the scored rows in window order and ``targets`` their tokens."""

    windows: list[Window]
    ref: torch.Tensor
    cmp: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    measures: TokenMeasures


@dataclass
class PhaseTimer:
    """Wall-clock and process CPU seconds spent in the forward passes and in the measures.

    CPU time is reported next to wall time because on a shared machine the wall clock also counts
    waiting for a core; the ratio of the two phases is what the benchmark compares.
    """

    device: torch.device
    forward_s: float = 0.0
    measures_s: float = 0.0
    forward_cpu_s: float = 0.0
    measures_cpu_s: float = 0.0

    def start(self) -> None:
        self._mark = (time.perf_counter(), time.process_time())

    def _lap(self) -> tuple[float, float]:
        sync(self.device)
        now = (time.perf_counter(), time.process_time())
        wall, cpu = now[0] - self._mark[0], now[1] - self._mark[1]
        self._mark = now
        return wall, cpu

    def forward_done(self) -> None:
        wall, cpu = self._lap()
        self.forward_s += wall
        self.forward_cpu_s += cpu

    def measures_done(self) -> None:
        wall, cpu = self._lap()
        self.measures_s += wall
        self.measures_cpu_s += cpu


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


def compared_batches(
    model: LanguageModel, windows: Iterable[Window], batch_size: int, timer: PhaseTimer, vocab: int, against: str
) -> Iterator[tuple[list[Window], torch.Tensor]]:
    """Batches of ``windows`` with ``model``'s logits, for comparisons against a stored
    reference (``against`` names it): the forward time goes to ``timer``, and a vocabulary other
    than the reference's ``vocab`` is refused."""
    for batch in batches(iter(windows), batch_size):
        ids = pad_batch(batch)
        timer.start()
        logits = safe_logits(model, ids)
        timer.forward_done()
        if logits.shape[-1] != vocab:
            raise InputError(
                f"the compared model has {logits.shape[-1]} tokens but {against} has {vocab}",
                hint="a stored reference compares models with the same vocabulary",
            )
        yield batch, logits


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so that wall-clock timings mean what they say."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scored_index(batch: list[Window], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices (into ``[batch * width, vocab]`` logits) predicting each window's scored
    targets, and those targets; windows in order, so results split back by ``n_scored``."""
    rows, targets = [], []
    for b, w in enumerate(batch):
        rows.append(torch.arange(b * width + w.first - 1, b * width + w.ids.numel() - 1))
        targets.append(w.ids[w.first :])
    return torch.cat(rows), torch.cat(targets)


def all_windows(documents: Iterable[Document], settings: LmSettings) -> Iterator[Window]:
    """The per-document windows (``--score second-half`` / ``all``) of every document."""
    for doc in documents:
        yield from windows(
            doc, ctx=settings.ctx, stride=settings.effective_stride, score=settings.score
        )


def compare_lms(
    ref: LanguageModel,
    cmp: LanguageModel,
    windows: Iterable[Window],
    settings: LmSettings,
    *,
    progress: Progress | None = None,
    on_batch: Iterable[Callable[[BatchLogits], None]] = (),
) -> LmComparison:
    """Run both models over every window and measure each scored position.

    Each hook in ``on_batch`` sees every batch's logits (:class:`BatchLogits`) before they are
    dropped: that is how a reference cache is written, or llama.cpp's rule applied, in the same
    pass.
    """
    if ref.vocab_size is not None and cmp.vocab_size is not None:
        check_vocab(ref.vocab_size, cmp.vocab_size, settings.shared_vocab)
    parts: list[TokenMeasures] = []
    lls: dict[int, SequenceLikelihood] = {}
    n_windows = 0
    timer = PhaseTimer(ref.device)
    vocab = None
    for batch in batches(iter(windows), settings.batch_size):
        ids = pad_batch(batch)
        where = f"document {batch[0].doc}"
        check_ids(ids, ref.vocab_size, "reference", where)
        check_ids(ids, cmp.vocab_size, "compared", where)
        timer.start()
        ref_logits = safe_logits(ref, ids)
        cmp_logits = safe_logits(cmp, ids)
        timer.forward_done()
        if vocab is None:
            vocab = check_vocab(ref_logits.shape[-1], cmp_logits.shape[-1], settings.shared_vocab)
        ref_flat = ref_logits.reshape(-1, ref_logits.shape[-1])
        cmp_flat = cmp_logits.reshape(-1, cmp_logits.shape[-1])
        rows, targets = scored_index(batch, ids.shape[1])
        m = _batch_measures(ref_flat, cmp_flat, rows, targets, vocab, settings.compiled)
        for hook in on_batch:
            hook(BatchLogits(batch, ref_flat, cmp_flat, rows, targets, m))
        m = m.to("cpu")
        parts.append(m)
        add_likelihoods(lls, batch, m)
        n_windows += len(batch)
        timer.measures_done()
        if progress is not None:
            progress(int(rows.numel()))
    return LmComparison(
        measures=TokenMeasures.cat(parts),
        sequences=[lls[k] for k in sorted(lls)],
        windows=n_windows,
        vocab_ref=int(ref.vocab_size or 0),
        vocab_cmp=int(cmp.vocab_size or 0),
        vocab_compared=int(vocab or 0),
        timer=timer,
    )


def _batch_measures(
    ref_flat: torch.Tensor,
    cmp_flat: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    vocab: int,
    compiled: bool = False,
) -> TokenMeasures:
    """Divergences over the compared vocabulary; likelihoods under each model's own full one."""
    targets = targets.to(ref_flat.device)
    if ref_flat.shape[-1] == vocab and cmp_flat.shape[-1] == vocab:
        return token_measures(ref_flat, cmp_flat, targets, rows=rows, compiled=compiled)
    m = token_measures(ref_flat[:, :vocab], cmp_flat[:, :vocab], rows=rows, compiled=compiled)
    m.ref_logp = target_log_probs(ref_flat, rows, targets)
    m.cmp_logp = target_log_probs(cmp_flat, rows, targets)
    return m


def add_likelihoods(
    lls: dict[int, SequenceLikelihood], batch: list[Window], m: TokenMeasures
) -> None:
    """Add each window's scored log-likelihoods to its document's totals."""
    sizes = [w.n_scored for w in batch]
    ref_sums = m.ref_logp.double().split(sizes)
    cmp_sums = m.cmp_logp.double().split(sizes)
    for w, r, c in zip(batch, ref_sums, cmp_sums):
        entry = lls.setdefault(w.doc, SequenceLikelihood(w.doc, 0, 0.0, 0.0))
        entry.tokens += w.n_scored
        entry.ref += float(r.sum())
        entry.cmp += float(c.sum())
