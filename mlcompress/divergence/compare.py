"""``diverge()``: the one library call behind ``mlcompress diverge``.

It decides what is being compared (classifiers of a task, or language models on data, on
sampled sequences, or on all sequences), loads both sides, runs the comparison and returns the
report. Gates and printing are left to the caller, so the Python API returns the same numbers
the command prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mlcompress.atomic import check_destination
from mlcompress.device import resolve_device
from mlcompress.divergence.cache import RefCacheWriter, compare_with_cache, load_ref_cache, tokens_digest
from mlcompress.divergence.classifier import compare_classifiers, load_classifier
from mlcompress.divergence.data import SCORE_RULES, read_documents, windows as cut
from mlcompress.divergence.lm import LmSettings, compare_lms
from mlcompress.divergence.models import find_tokenizer, load_one, load_pair
from mlcompress.divergence.report import lm_report, per_token_arrays
from mlcompress.divergence.sequence import exact_sequence_divergence, sampled_sequence_divergence
from mlcompress.tasks import get_task
from mlcompress.errors import InputError, UsageError
from mlcompress.progress import Progress, report

MODES = ("data", "sample", "exact")
DEFAULT_CTX = 512

@dataclass(frozen=True)
class DivergeOptions:
    """Everything ``mlcompress diverge`` can be told; defaults are the command's defaults."""

    data: Path | None = None
    field: str = "text"
    tokenizer: Path | None = None
    ctx: int | None = None  # None: 512, capped at the model's maximum context
    stride: int | None = None  # None: ctx
    score: str = "second-half"
    batch_size: int = 4
    device: str = "auto"
    mode: str = "data"
    samples: int = 100
    length: int = 32
    bos: int | None = None
    seed: int = 0
    save_ref: Path | None = None
    ref_logits: Path | None = None
    top_k: int = 64
    shared_vocab: bool = False
    arch: str | None = None
    unsafe_pickle: bool = False
    force: bool = False
    compiled: bool = False  # --compile: fuse the divergence arithmetic with torch.compile


@dataclass
class DivergeReport:
    """The report (JSON-able, with ``headline``) and per-position values kept for plots."""

    report: dict[str, Any]
    per_token: dict[str, np.ndarray] = field(default_factory=dict)


def diverge(
    ref: str | Path | None,
    cmp: str | Path,
    options: DivergeOptions | None = None,
    *,
    progress: Progress | None = None,
) -> DivergeReport:
    """Compare ``cmp`` with ``ref`` as ``options`` say (see :class:`DivergeOptions`).

    ``ref`` may be None only with ``options.ref_logits`` (a reference cache replaces it).
    """
    o = options or DivergeOptions()
    _check_options(ref, o)
    device = resolve_device(o.device)
    if o.arch is not None and not Path(o.arch).exists():
        if ":" not in o.arch and ("/" in o.arch or Path(o.arch).suffix):
            raise InputError(
                f"--arch {o.arch}: no such file or directory",
                hint="give a model directory, a TorchScript file, or a task name such as lenet5",
            )
        return _classifier(ref, cmp, o, device, progress)
    if o.mode == "data":
        return _data_mode(ref, cmp, o, device, progress)
    return _sequence_mode(ref, cmp, o, device, progress)


def _check_options(ref: str | Path | None, o: DivergeOptions) -> None:
    if o.mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)} (got {o.mode!r})")
    if o.score not in SCORE_RULES:
        raise UsageError(f"--score must be one of {', '.join(SCORE_RULES)} (got {o.score!r})")
    if o.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {o.batch_size})")
    if o.save_ref is not None and o.ref_logits is not None:
        raise UsageError("--save-ref and --ref-logits exclude each other")
    if (o.save_ref or o.ref_logits) and o.mode != "data":
        raise UsageError("reference caches (--save-ref, --ref-logits) work with --mode data only")
    if ref is None and o.ref_logits is None:
        raise UsageError("give the reference model, or a reference cache with --ref-logits")
    if o.ref_logits is not None and o.shared_vocab:
        raise UsageError("--shared-vocab cannot be combined with --ref-logits")
    if o.save_ref is not None:
        check_destination(o.save_ref, force=o.force)  # fail now, not after the whole run


def _progress_for(progress: Progress | None, total: int | None) -> Callable[[int], None] | None:
    """The scoring loops count units (examples, windows, sequences) as they finish; turn those
    increments into absolute :class:`~mlcompress.progress.Update` s."""
    if progress is None:
        return None
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        report(progress, "scoring", done, total)

    return advance


# --- classifiers -------------------------------------------------------------------------------


def _classifier(ref, cmp, o: DivergeOptions, device, progress) -> DivergeReport:
    if o.mode != "data" or o.save_ref or o.ref_logits:
        raise UsageError("classifier tasks support --mode data only, without reference caches")
    if ref is None:
        raise UsageError("give the reference model file")
    if o.data is not None and not Path(o.data).is_dir():
        raise UsageError(f"--data {o.data}: a task's data is a directory")
    task = get_task(o.arch, o.data)
    ref_model = load_classifier(ref, task, device, unsafe_pickle=o.unsafe_pickle)
    cmp_model = load_classifier(cmp, task, device, unsafe_pickle=o.unsafe_pickle)
    report, measures = compare_classifiers(
        task, ref_model, cmp_model, device=device, batch_size=max(o.batch_size, 100),
        progress=_progress_for(progress, None),
    )
    report.update({"ref": str(ref), "cmp": str(cmp)})
    return DivergeReport(report, per_token_arrays(measures))


# --- language models on data ---------------------------------------------------------------------


def _data_mode(ref, cmp, o: DivergeOptions, device, progress) -> DivergeReport:
    if o.ref_logits is not None:
        return _cached_mode(ref, cmp, o, device, progress)
    if o.data is None:
        raise UsageError("--mode data needs --data (a .jsonl or text file)")
    ref_model, cmp_model = load_pair(
        ref, cmp, arch=o.arch, device=device, unsafe_pickle=o.unsafe_pickle
    )
    tokenizer = find_tokenizer(o.tokenizer, ref_model, cmp_model, _arch_dir(o.arch))
    ctx = _context(o.ctx, ref_model.max_positions, cmp_model.max_positions)
    settings = LmSettings(
        ctx=ctx, stride=o.stride, score=o.score, batch_size=o.batch_size,
        shared_vocab=o.shared_vocab, compiled=o.compiled,
    )
    documents = read_documents(o.data, field=o.field, tokenize=tokenizer.encode if tokenizer else None)
    writer = RefCacheWriter(o.top_k) if o.save_ref is not None else None
    comp = compare_lms(
        ref_model, cmp_model, documents, settings,
        progress=_progress_for(progress, None),
        on_ref_batch=writer.add_batch if writer is not None else None,
    )
    report = lm_report(comp, ref=str(ref), cmp=str(cmp), settings=_settings(o, settings, tokenizer))
    if writer is not None:
        if comp.vocab_ref != comp.vocab_compared:
            raise UsageError("--save-ref needs models with identical vocabularies")
        writer.save(
            o.save_ref,
            {
                "ref": str(ref),
                "ref_fingerprint": ref_model.fingerprint(),
                "tokenizer_fingerprint": tokenizer.fingerprint if tokenizer else "",
                "settings": report["settings"],
            },
            force=o.force,
        )
        report["saved_ref"] = str(o.save_ref)
    return DivergeReport(report, per_token_arrays(comp.measures))


def _arch_dir(arch: str | None) -> Path | None:
    return Path(arch) if arch is not None and Path(arch).is_dir() else None


def _context(requested: int | None, *limits: int | None) -> int:
    known = [n for n in limits if n]
    cap = min(known) if known else None
    if requested is None:
        return min(DEFAULT_CTX, cap) if cap else DEFAULT_CTX
    if cap is not None and requested > cap:
        raise UsageError(f"--ctx {requested} is longer than the models' maximum context of {cap}")
    return requested


def _settings(o: DivergeOptions, settings, tokenizer) -> dict[str, Any]:
    return {
        "data": str(o.data) if o.data else None,
        "field": o.field,
        "ctx": settings.ctx,
        "stride": settings.effective_stride,
        "score": settings.score,
        "batch_size": settings.batch_size,
        "shared_vocab": settings.shared_vocab,
        "tokenizer": tokenizer.source if tokenizer else None,
    }


def _cached_mode(ref, cmp, o: DivergeOptions, device, progress) -> DivergeReport:
    cache = load_ref_cache(o.ref_logits)
    sources = []
    if ref is not None:
        # The reference is not run: it only lends its architecture (and is checked against the
        # cache, so that a cache made with another model cannot be used by mistake).
        ref_model, cmp_model = load_pair(ref, cmp, arch=o.arch, device=device, unsafe_pickle=o.unsafe_pickle)
        if ref_model.fingerprint() != cache.metadata.get("ref_fingerprint"):
            raise InputError(
                f"{o.ref_logits} was made with a different reference model than {ref}",
                hint="rebuild the cache with --save-ref, or give the reference it was made with",
            )
        sources.append(ref_model)
    else:
        cmp_model = load_one(cmp, arch=o.arch, device=device, unsafe_pickle=o.unsafe_pickle)
    tokenizer = find_tokenizer(o.tokenizer, *sources, cmp_model, _arch_dir(o.arch))
    cached_tok = cache.metadata.get("tokenizer_fingerprint", "")
    if tokenizer is not None and cached_tok and tokenizer.fingerprint != cached_tok:
        raise InputError(
            f"the compared model's tokenizer ({tokenizer.source}) differs from the one the "
            f"reference cache {o.ref_logits} was made with"
        )
    if o.data is not None:
        _check_same_data(cache, o, tokenizer)
    comp = compare_with_cache(
        cache, cmp_model, batch_size=o.batch_size, progress=_progress_for(progress, None)
    )
    settings = json.loads(cache.metadata.get("settings", "{}"))
    settings["ref_logits"] = str(o.ref_logits)
    settings["top_k"] = int(cache.metadata["top_k"])
    report = lm_report(comp, ref=cache.metadata.get("ref", str(o.ref_logits)), cmp=str(cmp), settings=settings)
    return DivergeReport(report, per_token_arrays(comp.measures))


def _check_same_data(cache, o: DivergeOptions, tokenizer) -> None:
    """With --data next to --ref-logits, make sure it is the data the cache was made from."""

    settings = json.loads(cache.metadata.get("settings", "{}"))
    ids, lengths = [], [0]
    for doc in read_documents(o.data, field=o.field, tokenize=tokenizer.encode if tokenizer else None):
        for w in cut(doc, ctx=settings["ctx"], stride=settings["stride"], score=settings["score"]):
            ids.append(w.ids.to(torch.int32))
            lengths.append(w.ids.numel())
    if not ids or tokens_digest(torch.cat(ids), torch.tensor(lengths).cumsum(0)) != cache.metadata.get("tokens_sha256"):
        raise InputError(
            f"--data {o.data} is not the data the reference cache {o.ref_logits} was made from",
            hint="drop --data to use the cache's own tokens",
        )


# --- sequence modes ------------------------------------------------------------------------------


def _sequence_mode(ref, cmp, o: DivergeOptions, device, progress) -> DivergeReport:
    ref_model, cmp_model = load_pair(ref, cmp, arch=o.arch, device=device, unsafe_pickle=o.unsafe_pickle)
    bos = o.bos
    if bos is None:
        bos = ref_model.bos_token_id
    if bos is None:
        tok = find_tokenizer(o.tokenizer, ref_model, cmp_model, _arch_dir(o.arch))
        bos = tok.bos_token_id if tok else None
    if bos is None:
        raise UsageError(
            f"--mode {o.mode} needs the begin-of-sequence token id", hint="pass --bos ID"
        )
    if o.mode == "exact":
        report = exact_sequence_divergence(
            ref_model, cmp_model, length=o.length, bos=bos, progress=_progress_for(progress, None)
        )
    else:
        report = sampled_sequence_divergence(
            ref_model, cmp_model, samples=o.samples, length=o.length, bos=bos,
            batch_size=max(1, o.batch_size), seed=o.seed, progress=_progress_for(progress, o.samples),
        )
    report.update({"ref": str(ref), "cmp": str(cmp), "notes": []})
    return DivergeReport(report)
