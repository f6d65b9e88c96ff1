"""``diverge()``: the one library call behind ``mlcompress diverge``.

It decides what is being compared (classifiers of a task, or language models on data, on
sampled sequences, or on all sequences), loads both sides, runs the comparison and returns the
report. Gates and printing are left to the caller, so the Python API returns the same numbers
the command prints.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from mlcompress.atomic import atomic_output, check_destination
from mlcompress.device import resolve_device
from mlcompress.distributed import World, join
from mlcompress.divergence.cache import RefCacheWriter, compare_with_cache, load_ref_cache, tokens_digest
from mlcompress.divergence.classifier import (ClassifierOutcomes, classifier_outcomes, classifier_report,
                                              count_test_batches, load_classifier)
from mlcompress.divergence.data import SCORE_RULES, Window, read_documents, read_token_stream, windows as cut
from mlcompress.divergence.kld_file import KldWriter, looks_like_kld, read_kld
from mlcompress.divergence.llamacpp import (
    LlamaCppCollector,
    LlamaCppRun,
    LlamaCppTokens,
    base_windows,
    chunk_bos,
    chunk_windows,
    compare_with_base_file,
    first_target,
)
from mlcompress.divergence.lm import LmSettings, all_windows, compare_lms
from mlcompress.divergence.models import Tokenizer, find_tokenizer, load_one, load_pair
from mlcompress.divergence.report import lm_report, per_token_arrays
from mlcompress.divergence.sequence import exact_sequence_divergence, sampled_sequence_divergence
from mlcompress.divergence.sharding import LmShard, merge_lm, merge_timers, run_sharded, scored_before, window_share
from mlcompress.tasks import get_task
from mlcompress.errors import InputError, UsageError
from mlcompress.progress import Progress, report

MODES = ("data", "sample", "exact")
DEFAULT_CTX = 512
#: Reference files: our top-k cache (safetensors) or llama.cpp's .kld base file.
REF_FORMATS = ("mlcompress", "llama-cpp")

@dataclass(frozen=True)
class DivergeOptions:
    """Everything ``mlcompress diverge`` can be told; defaults are the command's defaults."""

    data: Path | None = None
    field: str = "text"
    tokenizer: Path | None = None
    ctx: int | None = None  # None: 512, capped at the model's maximum context
    stride: int | None = None  # None: ctx
    score: str = "llama-cpp"
    no_bos: bool = False  # --score llama-cpp: never replace token 0 of a chunk by BOS
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
    ref_format: str | None = None  # None: a .kld suffix (or, reading, the magic) means llama-cpp
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

    Under torchrun each process scores a share of whole batches and process 0 computes the
    report from all per-token values (:mod:`.sharding`); every process returns the report,
    process 0 alone the per-token arrays and the files.
    """
    o = options or DivergeOptions()
    world = join(o.device)
    _check_options(ref, o, main=world.is_main)
    with world.guard():  # a device missing on one machine stops every process
        device = resolve_device(o.device)
    if o.arch is not None and not Path(o.arch).exists():
        if ":" not in o.arch and ("/" in o.arch or Path(o.arch).suffix):
            raise InputError(
                f"--arch {o.arch}: no such file or directory",
                hint="give a model directory, a TorchScript file, or a task name such as lenet5",
            )
        return _classifier(ref, cmp, o, device, progress, world)
    if o.mode == "data":
        return _data_mode(ref, cmp, o, device, progress, world)
    if world.distributed:
        raise UsageError(f"--mode {o.mode} is not sharded; it runs in one process",
                         hint="launch it without torchrun (--mode data scales out)")
    return _sequence_mode(ref, cmp, o, device, progress)


def _check_options(ref: str | Path | None, o: DivergeOptions, *, main: bool = True) -> None:
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
    if o.ref_format is not None and o.ref_format not in REF_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(REF_FORMATS)} (got {o.ref_format!r})")
    if o.score == "llama-cpp" and o.stride is not None:
        raise UsageError("--stride does not apply to --score llama-cpp (its chunks are disjoint)")
    if o.no_bos and o.score != "llama-cpp":
        raise UsageError("--no-bos applies to --score llama-cpp only")
    if o.save_ref is not None:
        if _ref_format(o.save_ref, o.ref_format) == "llama-cpp" and o.score != "llama-cpp":
            raise UsageError("a llama.cpp .kld file holds --score llama-cpp positions only")
        if main:  # the one process that writes it (other machines may not have its directory)
            check_destination(o.save_ref, force=o.force)  # fail now, not after the whole run


def _ref_format(path: Path, given: str | None, *, reading: bool = False) -> str:
    """``--format``, else llama-cpp for a ``.kld`` name (or, reading, a file with its magic)."""
    if given is not None:
        return given
    if Path(path).suffix.lower() == ".kld" or (reading and looks_like_kld(path)):
        return "llama-cpp"
    return "mlcompress"


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


def _classifier(ref, cmp, o: DivergeOptions, device, progress, world: World) -> DivergeReport:
    if o.mode != "data" or o.save_ref or o.ref_logits:
        raise UsageError("classifier tasks support --mode data only, without reference caches")
    if ref is None:
        raise UsageError("give the reference model file")
    if o.data is not None and not Path(o.data).is_dir():
        raise UsageError(f"--data {o.data}: a task's data is a directory")
    batch_size = max(o.batch_size, 100)
    task = None

    def measure() -> ClassifierOutcomes:
        nonlocal task
        task = get_task(o.arch, o.data)
        ref_model = load_classifier(ref, task, device, unsafe_pickle=o.unsafe_pickle)
        cmp_model = load_classifier(cmp, task, device, unsafe_pickle=o.unsafe_pickle)
        share = world.share(count_test_batches(task, batch_size)) if world.distributed else None
        return classifier_outcomes(task, ref_model, cmp_model, device=device, batch_size=batch_size,
                                   progress=_progress_for(progress, None), batches=share)

    def finish(parts: list[ClassifierOutcomes]) -> DivergeReport:
        outcomes = parts[0] if len(parts) == 1 else ClassifierOutcomes.cat(parts, merge_timers([p.timer for p in parts]))
        report = classifier_report(task, outcomes)
        report.update({"ref": str(ref), "cmp": str(cmp)})
        return _counted(DivergeReport(report, per_token_arrays(outcomes.measures)), world)

    return run_sharded(world, measure, finish, light=_report_only)


def _counted(result: DivergeReport, world: World) -> DivergeReport:
    """A sharded run's report says how many processes measured it (in its timing, the one
    part that differs from one process's report anyway)."""
    if world.distributed:
        result.report["timing"]["processes"] = world.size
    return result


def _report_only(result: DivergeReport) -> DivergeReport:
    """What process 0 sends the others: the report; the per-token arrays (large) stay with it."""
    return DivergeReport(result.report)


# --- language models on data ---------------------------------------------------------------------


def _data_mode(ref, cmp, o: DivergeOptions, device, progress, world: World) -> DivergeReport:
    if o.ref_logits is not None:
        if _ref_format(o.ref_logits, o.ref_format, reading=True) == "llama-cpp":
            return _base_file_mode(ref, cmp, o, device, progress, world)
        return _cached_mode(ref, cmp, o, device, progress, world)
    if o.data is None:
        raise UsageError("--mode data needs --data (a .jsonl or text file)")
    fmt = _ref_format(o.save_ref, o.ref_format) if o.save_ref is not None else None
    run = _DataRun()

    def measure() -> LmShard:
        ref_model, cmp_model = load_pair(
            ref, cmp, arch=o.arch, device=device, unsafe_pickle=o.unsafe_pickle
        )
        tokenizer = find_tokenizer(o.tokenizer, ref_model, cmp_model, _arch_dir(o.arch))
        ctx = _context(o.ctx, ref_model.max_positions, cmp_model.max_positions)
        settings = LmSettings(
            ctx=ctx, stride=o.stride, score=o.score, batch_size=o.batch_size,
            shared_vocab=o.shared_vocab, compiled=o.compiled,
        )
        tokenize = tokenizer.encode if tokenizer else None
        extra: dict[str, Any] = {}
        if o.score == "llama-cpp":
            stream = read_token_stream(o.data, field=o.field, tokenize=tokenize)
            bos = chunk_bos(tokenizer, o.no_bos)
            windows: Any = chunk_windows(stream, ctx, bos)
            extra = {"bos": bos, "stream_tokens": len(stream), "chunks": len(windows),
                     "targets": f"{first_target(ctx)}..{ctx - 1}"}
        else:
            windows = all_windows(read_documents(o.data, field=o.field, tokenize=tokenize), settings)
            if world.distributed:
                windows = list(windows)  # to be shared out (token ids only: small)
        mine = window_share(world, windows, o.batch_size) if world.distributed else windows
        writer = RefCacheWriter(o.top_k) if fmt == "mlcompress" else None
        if fmt == "llama-cpp":
            # Process 0 writes the file (header, its records, then the others' in rank order);
            # the others write their records to a private temporary file, streamed to it later.
            if world.is_main:
                run.kld_file = run.files.enter_context(open(run.files.enter_context(atomic_output(o.save_ref, force=o.force)), "wb"))
            else:
                run.kld_file = run.files.enter_context(tempfile.TemporaryFile())
            run.kld_writer = KldWriter(run.kld_file, n_ctx=ctx, tokens=stream[: len(windows) * ctx],
                                       header=world.is_main)
        collector = LlamaCppCollector(writer=run.kld_writer) if o.score == "llama-cpp" else None
        comp = compare_lms(
            ref_model, cmp_model, mine, settings,
            progress=_progress_for(progress, None),
            on_batch=[h for h in (writer.add_batch if writer else None, collector) if h is not None],
        )
        run.windows, run.ctx, run.extra, run.settings = windows, ctx, extra, settings
        run.ref_model, run.tokenizer = ref_model, tokenizer
        return LmShard(comp, collector.tokens() if collector is not None else None, writer,
                       run.kld_writer.records if run.kld_writer is not None else 0)

    def send_kld_parts(_: LmShard) -> None:
        if fmt == "llama-cpp":
            world.append_files(None if world.is_main else run.kld_file, run.kld_file if world.is_main else None)

    def finish(shards: list[LmShard]) -> DivergeReport:
        merged = merge_lm(shards, run.windows)
        comp = merged.comp
        if run.kld_writer is not None:
            run.kld_writer.records = merged.kld_records
            run.kld_writer.finish()
        if o.score == "llama-cpp":
            comp.llama_cpp = _llama_cpp_run(merged.llama_cpp, run.ctx, run.extra)
            if comp.llama_cpp is None:
                comp.notes.append("no llama.cpp figures: its rule needs models with one vocabulary")
        report = lm_report(comp, ref=str(ref), cmp=str(cmp),
                           settings={**_settings(o, run.settings, run.tokenizer), **run.extra})
        writer = merged.cache
        if writer is not None:
            if comp.vocab_ref != comp.vocab_compared:
                raise UsageError("--save-ref needs models with identical vocabularies")
            writer.save(
                o.save_ref,
                {
                    "ref": str(ref),
                    "ref_fingerprint": run.ref_model.fingerprint(),
                    "tokenizer_fingerprint": run.tokenizer.fingerprint if run.tokenizer else "",
                    "settings": report["settings"],
                },
                force=o.force,
            )
        if o.save_ref is not None:
            report["saved_ref"] = str(o.save_ref)
            report["saved_ref_format"] = fmt
        run.files.close()  # publishes the .kld file, now that everything has succeeded
        return _counted(DivergeReport(report, per_token_arrays(comp.measures)), world)

    with run.files:
        return run_sharded(world, measure, finish, light=_report_only, between=send_kld_parts)


@dataclass
class _DataRun:
    """What ``--mode data`` keeps between measuring a share and writing the report."""

    files: ExitStack = field(default_factory=ExitStack)  # the .kld output (or part) file
    kld_file: Any = None
    kld_writer: KldWriter | None = None
    windows: Any = None
    ctx: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    settings: LmSettings | None = None
    ref_model: Any = None
    tokenizer: Tokenizer | None = None


def _llama_cpp_run(tokens: LlamaCppTokens | None, ctx: int, extra: dict[str, Any]) -> LlamaCppRun | None:
    if tokens is None:
        return None
    run = LlamaCppRun(tokens, ctx, extra["chunks"], extra["bos"], extra["stream_tokens"])
    dropped = extra["stream_tokens"] - extra["chunks"] * ctx
    if dropped:
        run.notes.append(f"the last {dropped} tokens (less than one chunk of {ctx}) are not scored, as in llama.cpp")
    if extra["stream_tokens"] < 2 * ctx:
        run.notes.append(
            f"llama.cpp itself refuses data of fewer than 2 x ctx = {2 * ctx} tokens "
            f"(these have {extra['stream_tokens']}); the figures are what its rule gives"
        )
    return run


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


def _cached_mode(ref, cmp, o: DivergeOptions, device, progress, world: World) -> DivergeReport:
    run: dict[str, Any] = {}

    def measure() -> LmShard:
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
        run["cache"] = cache
        share = world.share(cache.first.numel(), unit=o.batch_size) if world.distributed else None
        return LmShard(compare_with_cache(cache, cmp_model, batch_size=o.batch_size,
                                          progress=_progress_for(progress, None), share=share))

    def finish(shards: list[LmShard]) -> DivergeReport:
        cache = run["cache"]
        comp = merge_lm(shards, cache.windows() if len(shards) > 1 else []).comp
        settings = json.loads(cache.metadata.get("settings", "{}"))
        settings["ref_logits"] = str(o.ref_logits)
        settings["top_k"] = int(cache.metadata["top_k"])
        report = lm_report(comp, ref=cache.metadata.get("ref", str(o.ref_logits)), cmp=str(cmp), settings=settings)
        return _counted(DivergeReport(report, per_token_arrays(comp.measures)), world)

    return run_sharded(world, measure, finish, light=_report_only)


def _check_same_data(cache, o: DivergeOptions, tokenizer) -> None:
    """With --data next to --ref-logits, make sure it is the data the cache was made from."""

    settings = json.loads(cache.metadata.get("settings", "{}"))
    ids, lengths = [], [0]
    for w in _cache_windows(o, settings, tokenizer):
        ids.append(w.ids.to(torch.int32))
        lengths.append(w.ids.numel())
    if not ids or tokens_digest(torch.cat(ids), torch.tensor(lengths).cumsum(0)) != cache.metadata.get("tokens_sha256"):
        raise InputError(
            f"--data {o.data} is not the data the reference cache {o.ref_logits} was made from",
            hint="drop --data to use the cache's own tokens",
        )


def _cache_windows(o: DivergeOptions, settings: dict[str, Any], tokenizer: Tokenizer | None) -> Iterator[Window]:
    """The windows ``settings`` (a cache's) cut from ``--data``."""
    tokenize = tokenizer.encode if tokenizer else None
    if settings.get("score") == "llama-cpp":
        stream = read_token_stream(o.data, field=o.field, tokenize=tokenize)
        yield from chunk_windows(stream, settings["ctx"], settings.get("bos"))
        return
    for doc in read_documents(o.data, field=o.field, tokenize=tokenize):
        yield from cut(doc, ctx=settings["ctx"], stride=settings["stride"], score=settings["score"])


def _base_file_mode(ref, cmp, o: DivergeOptions, device, progress, world: World) -> DivergeReport:
    """CMP against a llama.cpp base file (``--ref-logits base.kld``), on its tokens."""
    if o.score != "llama-cpp":
        raise UsageError(f"a llama.cpp base file is scored with --score llama-cpp (got --score {o.score})")
    run: dict[str, Any] = {}

    def measure() -> LmShard:
        base = read_kld(o.ref_logits)
        where = str(o.ref_logits)
        if o.ctx is not None and o.ctx != base.n_ctx:
            raise InputError(
                f"--ctx {o.ctx} differs from n_ctx {base.n_ctx} of {where}", hint="drop --ctx to use the file's"
            )
        sources = []
        if ref is not None:  # REF is not run: it only lends an architecture or a tokenizer
            ref_model, cmp_model = load_pair(ref, cmp, arch=o.arch, device=device, unsafe_pickle=o.unsafe_pickle)
            sources.append(ref_model)
        else:
            cmp_model = load_one(cmp, arch=o.arch, device=device, unsafe_pickle=o.unsafe_pickle)
        if cmp_model.vocab_size is not None and cmp_model.vocab_size != base.n_vocab:
            raise InputError(
                f"{where} has n_vocab {base.n_vocab} but the compared model {cmp} has {cmp_model.vocab_size} tokens",
                hint="a .kld base compares models with the same vocabulary",
            )
        if cmp_model.max_positions and base.n_ctx > cmp_model.max_positions:
            raise InputError(f"{where} has n_ctx {base.n_ctx}, longer than the model's maximum context of {cmp_model.max_positions}")
        tokenizer = find_tokenizer(o.tokenizer, *sources, cmp_model, _arch_dir(o.arch))
        bos = chunk_bos(tokenizer, o.no_bos)
        if o.data is not None:
            stream = read_token_stream(o.data, field=o.field, tokenize=tokenizer.encode if tokenizer else None)
            stored = base.tokens.reshape(-1)
            if len(stream) < stored.size or not np.array_equal(np.asarray(stream[: stored.size]), stored):
                raise InputError(
                    f"--data {o.data} does not tokenize to the tokens stored in {where}",
                    hint="drop --data to use the file's own tokens",
                )
        run.update(base=base, bos=bos, tokenizer=tokenizer)
        share = world.share(base.n_chunk, unit=o.batch_size) if world.distributed else None
        return LmShard(compare_with_base_file(base, cmp_model, bos=bos, batch_size=o.batch_size,
                                              progress=_progress_for(progress, None), share=share))

    def finish(shards: list[LmShard]) -> DivergeReport:
        base, bos, tokenizer, where = run["base"], run["bos"], run["tokenizer"], str(o.ref_logits)
        comp = merge_lm(shards, base_windows(base, bos) if len(shards) > 1 else []).comp
        if tokenizer is None and not o.no_bos:
            comp.notes.append("no tokenizer, so token 0 of each chunk is not replaced by BOS (pass --tokenizer)")
        settings = {
            "ref_logits": where, "ref_format": "llama-cpp", "score": "llama-cpp", "ctx": base.n_ctx,
            "chunks": base.n_chunk, "targets": f"{first_target(base.n_ctx)}..{base.n_ctx - 1}", "bos": bos,
            "batch_size": o.batch_size, "tokenizer": tokenizer.source if tokenizer else None,
        }
        report = lm_report(comp, ref=where, cmp=str(cmp), settings=settings)
        return _counted(DivergeReport(report, per_token_arrays(comp.measures)), world)

    return run_sharded(world, measure, finish, light=_report_only)


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
