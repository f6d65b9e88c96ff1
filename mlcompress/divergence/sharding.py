"""Data-parallel diverge: each process scores a contiguous share of whole batches; process 0
puts the shares back together into what one process would have measured.

Why whole batches: a window's logits depend on the batch it is padded into (its shape picks
the kernels), so a share that starts mid-batch would give float round-off differences. Shares
of whole batches, in order, give process 0 the per-token values of one process bit for bit
(at the same threads per process, docs/scale.md), and every statistic is then computed once, on
all of them, exactly as in one process: percentiles and means cannot be merged from per-share
summaries without changing their rounding, and percentiles not at all.

What is merged: per-token measures (concatenated in window order), per-document likelihoods
(recomputed from those, window by window, in one process's order), window counts, llama.cpp's
per-token values, top-k reference-cache rows, and the timers (wall time of the slowest
process, CPU time summed over all).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, TypeVar

from mlcompress.distributed import World
from mlcompress.divergence.cache import RefCacheWriter
from mlcompress.divergence.data import Window
from mlcompress.divergence.llamacpp import LlamaCppTokens
from mlcompress.divergence.lm import LmComparison, PhaseTimer, SequenceLikelihood, add_likelihoods
from mlcompress.divergence.measures import TokenMeasures

T = TypeVar("T")
R = TypeVar("R")

#: The ``RefCacheWriter`` lists that hold rows, in window order.
_CACHE_LISTS = ("ids", "first", "doc", "topk_ids", "topk_logp", "tail_logp", "target_logp")


def window_share(world: World, windows: list[Window], batch_size: int) -> list[Window]:
    """This process's windows: a contiguous run of whole batches."""
    share = world.share(len(windows), unit=batch_size)
    return windows[share.start : share.stop]


def scored_before(windows: list[Window], index: int) -> int:
    """Scored positions of the windows before ``index`` (where a share starts in a reference
    file's rows)."""
    return sum(w.n_scored for w in windows[:index])


def run_sharded(world: World, measure: Callable[[], T], finish: Callable[[list[T]], R],
                light: Callable[[R], R] = lambda result: result,
                between: Callable[[T], None] | None = None) -> R:
    """``measure`` on every process, ``finish`` of all their results on process 0; process 0
    returns that result and the others ``light(result)`` (what is worth sending). ``between``
    runs on every process after the gather (to stream files to process 0). A failure in
    ``measure`` or ``finish`` stops all processes (:meth:`World.guard`). One process:
    ``finish([measure()])``."""
    with world.guard():
        local = measure()
    parts = world.gather(local)
    if between is not None:
        between(local)
    result = None
    with world.guard():
        if world.is_main:
            assert parts is not None
            result = finish(parts)
    shared = world.broadcast(light(result) if world.is_main and world.distributed else None)
    return result if world.is_main else shared


@dataclass
class LmShard:
    """What one process measured on its windows, sent to process 0."""

    comp: LmComparison
    llama_cpp: LlamaCppTokens | None = None  # --score llama-cpp: llama.cpp's per-token values
    cache: RefCacheWriter | None = None  # --save-ref (mlcompress format): the top-k rows
    kld_records: int = 0  # --save-ref .kld: records this process wrote to its part file


def merge_lm(shards: list[LmShard], windows: list[Window]) -> LmShard:
    """The shards of ``windows`` (all of them, in order) as one process's measurement."""
    if len(shards) == 1:
        return shards[0]
    first = shards[0].comp
    measures = TokenMeasures.cat([s.comp.measures for s in shards])
    lls: dict[int, SequenceLikelihood] = {}
    add_likelihoods(lls, windows, measures)  # per window, in window order: one process's sums
    comp = dataclasses.replace(
        first,
        measures=measures,
        sequences=[lls[k] for k in sorted(lls)],
        windows=sum(s.comp.windows for s in shards),
        timer=merge_timers([s.comp.timer for s in shards]),
        notes=list(first.notes),
    )
    if first.llama_cpp is not None:  # a .kld base file: llama.cpp's values are the measures
        tokens = LlamaCppTokens.cat([s.comp.llama_cpp.tokens for s in shards])
        comp.llama_cpp = dataclasses.replace(first.llama_cpp, tokens=tokens)
    parts = [s.llama_cpp for s in shards if s.llama_cpp is not None]
    return LmShard(
        comp,
        llama_cpp=LlamaCppTokens.cat(parts) if parts else None,
        cache=_merge_caches([s.cache for s in shards]),
        kld_records=sum(s.kld_records for s in shards),
    )


def merge_timers(timers: list[PhaseTimer | None]) -> PhaseTimer | None:
    """Wall time of the slowest process (what the run took), CPU time of all processes."""
    known = [t for t in timers if t is not None]
    if not known:
        return None
    return PhaseTimer(
        known[0].device,
        forward_s=max(t.forward_s for t in known),
        measures_s=max(t.measures_s for t in known),
        forward_cpu_s=sum(t.forward_cpu_s for t in known),
        measures_cpu_s=sum(t.measures_cpu_s for t in known),
    )


def _merge_caches(writers: list[RefCacheWriter | None]) -> RefCacheWriter | None:
    present = [w for w in writers if w is not None]
    if not present:
        return None
    merged = RefCacheWriter(present[0].top_k)
    merged.vocab = next((w.vocab for w in present if w.vocab is not None), None)
    for name in _CACHE_LISTS:
        setattr(merged, name, [item for w in present for item in getattr(w, name)])
    return merged

